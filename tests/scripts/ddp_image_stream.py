"""Run by tests/test_image_recipe.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo).

Runs recipes/image_classification.py (argv after the output folder) with a callback that records, on each rank, a hash
of every training input it distils on and, at the end, a hash of the student's parameters.
"""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

from hf_kdsearch import DistillationCallback

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "image_classification_recipe", ROOT / "recipes" / "image_classification.py"
)
recipe = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = recipe
spec.loader.exec_module(recipe)


class Record(DistillationCallback):
    def __init__(self):
        self.samples, self.initial = [], None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.initial = [p.detach().clone() for p in model.parameters()]

    def on_distill_batch(self, trainer, model, inputs):
        for x in inputs["pixel_values"]:
            self.samples.append(hashlib.sha256(x.detach().contiguous().cpu().numpy().tobytes()).hexdigest())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        params = [p.detach() for p in model.parameters()]
        digest = hashlib.sha256(b"".join(p.contiguous().cpu().numpy().tobytes() for p in params)).hexdigest()
        moved = max((p - q).abs().max().item() for p, q in zip(params, self.initial))
        with open(Path(sys.argv[1]) / f"rank{args.process_index}.json", "w") as f:
            json.dump({"samples": self.samples, "params": digest, "moved": moved}, f)


recipe.main(sys.argv[2:], callbacks=[Record()])
