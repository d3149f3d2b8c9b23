"""Run recipes/cifar100.py and kill the process, as `kill -9` would, right after a stage's first checkpoint.

    python tests/scripts/recipe_killed_after_save.py STAGE_SUFFIX -- <recipe arguments>

The process exits with `os._exit(137)` (no clean-up, no `on_train_end`) once a checkpoint of the stage whose
output_dir ends with STAGE_SUFFIX (e.g. `distill`) is complete, that is after the Trainer's `on_save` event.
"""

import os
import runpy
import sys
from pathlib import Path

from transformers.trainer_callback import CallbackHandler

stage, argv = sys.argv[1], sys.argv[3:]
on_save = CallbackHandler.on_save


def killed_after_save(self, args, state, control):
    control = on_save(self, args, state, control)
    if args.output_dir.rstrip("/").endswith(stage):
        print(f"[killed] after the checkpoint at step {state.global_step} of {args.output_dir}", flush=True)
        sys.stderr.flush()
        os._exit(137)
    return control


CallbackHandler.on_save = killed_after_save
recipe = Path(__file__).resolve().parents[2] / "recipes" / "cifar100.py"
sys.argv = [str(recipe), *argv]
runpy.run_path(str(recipe), run_name="__main__")
