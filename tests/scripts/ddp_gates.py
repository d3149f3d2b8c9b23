"""Gate search under 2-process DDP on CPU; each rank saves its gates, lambda and log (tests/test_search.py)."""

import copy
import sys

import timm
import torch

import hf_kdsearch  # noqa: F401
from hf_kdsearch import DistillationArguments, DistillationTrainer, GateSearchCallback, add_gates, gate_parameters
from hf_kdsearch.data import TensorImageDataset

out = sys.argv[1]
torch.manual_seed(0)
teacher = timm.create_model("mnist_mlp", hidden_dims=[24, 16], img_size=8).eval()
g = torch.Generator().manual_seed(0)
data = TensorImageDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
gated = add_gates(copy.deepcopy(teacher))
cb = GateSearchCallback(target_flops_ratio=0.05, l1_weight=2.0, warmup_ratio=0.0, l1_growth=1.2, input_size=(1, 8, 8))
args = DistillationArguments(
    output_dir=out, max_steps=4, per_device_train_batch_size=8, learning_rate=0.1, optim="sgd",
    optim_args="momentum=0.9", logging_steps=2, save_strategy="no", report_to="none", use_cpu=True,
    disable_tqdm=True, seed=0, check_teacher_accuracy=False,
)  # fmt: skip
trainer = DistillationTrainer(model=gated, teacher_model=teacher, args=args, callbacks=[cb], train_dataset=data)
first = next(iter(trainer.get_train_dataloader()))
trainer.train()
rank = trainer.accelerator.process_index
torch.save(
    {
        "world_size": trainer.accelerator.num_processes,
        "wrapped": type(trainer.model_wrapped).__name__,
        "gates": {n: p.detach().clone() for n, p in gate_parameters(trainer.model).items()},
        "lambda": cb.current_l1_weight,
        "first_batch": first["labels"].tolist(),
        "log": [
            {k: v for k, v in h.items() if k != "train_runtime" and "per_second" not in k}
            for h in trainer.state.log_history
        ],
    },
    f"{out}/rank{rank}.pt",
)
