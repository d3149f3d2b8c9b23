"""Run by tests/test_ddp.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo).

Each rank trains the same student for a few steps on its own shard and writes what it ended with.
"""

import json
import sys

import timm
import torch
from torch.nn.parallel import DistributedDataParallel

import hf_kdsearch  # noqa: F401
from hf_kdsearch import DistillationArguments, DistillationTrainer
from hf_kdsearch.data import TensorImageDataset

out = sys.argv[1]
torch.manual_seed(0)
student = timm.create_model("cifar_resnet8", num_classes=10)
teacher = timm.create_model("cifar_resnet8", num_classes=10)
initial = torch.cat([p.detach().flatten().clone() for p in student.parameters()])
g = torch.Generator().manual_seed(0)
data = TensorImageDataset(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
args = DistillationArguments(
    output_dir=out,
    report_to="none",
    use_cpu=True,
    save_strategy="no",
    max_steps=3,
    per_device_train_batch_size=8,
    logging_steps=1,
    disable_tqdm=True,
    learning_rate=0.1,
    optim="sgd",
    check_teacher_accuracy=False,  # untrained teachers: the accuracy check would rightly stop them
)
trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
trainer.train()
final = torch.cat([p.detach().flatten() for p in student.parameters()])
rank = trainer.accelerator.process_index
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(
        {
            "world_size": trainer.accelerator.num_processes,
            "params": final.double().tolist()[:2000],
            "param_sum": final.double().sum().item(),
            "moved": (final - initial).abs().max().item(),
            "student_wrapped_in_ddp": isinstance(trainer.model_wrapped, DistributedDataParallel),
            "teacher_type": type(trainer.teacher_model).__name__,
            "teacher_wrapped_in_ddp": isinstance(trainer.teacher_model, DistributedDataParallel),
            "samples_seen": trainer.samples_seen,
            "log": [h for h in trainer.state.log_history if "loss_kd" in h],
        },
        f,
    )
