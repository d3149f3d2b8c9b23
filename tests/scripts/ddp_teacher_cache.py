"""Run by tests/test_ddp.py, under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) or as a plain
1-process script: builds a teacher cache with `TeacherCache.build_or_load`, then (unless `--build_only`) trains a
student from it, and writes what each rank did to `<out>/rank<i>.json`.

    python tests/scripts/ddp_teacher_cache.py OUT [--num_samples 40] [--views 3] [--build_only]

Each rank records the samples its teacher forward ran on while building, the build's wall-clock, and in training
the sample indices and views it distilled on, with the largest difference between the teacher logits the trainer
used and the stored logits of those samples and views.
"""

import argparse
import json
import time
from pathlib import Path

import timm
import torch

from hf_kdsearch import DistillationArguments, DistillationCallback, DistillationTrainer, TeacherCache
from hf_kdsearch.fastpath import DeviceImageDataset
from hf_kdsearch.teacher_cache import CachedTeacher

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--num_samples", type=int, default=40)
p.add_argument("--views", type=int, default=3)
p.add_argument("--batch_size", type=int, default=8, help="images per teacher forward in the build")
p.add_argument("--teacher", default="cifar_resnet8")
p.add_argument("--build_only", action="store_true")
cli = p.parse_args()
out = Path(cli.out)

torch.manual_seed(0)
teacher = timm.create_model(cli.teacher, num_classes=10)
torch.manual_seed(1)
student = timm.create_model("cifar_resnet8", num_classes=10)
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (cli.num_samples, 3, 16, 16), dtype=torch.uint8, generator=g)
data = DeviceImageDataset(images, torch.randint(0, 10, (cli.num_samples,), generator=g))
args = DistillationArguments(
    output_dir=str(out / "run"),
    report_to="none",
    use_cpu=True,
    save_strategy="no",
    max_steps=4,
    per_device_train_batch_size=4,
    logging_steps=1,
    disable_tqdm=True,
    learning_rate=0.1,
    optim="sgd",
    seed=0,
    device_augment=True,
    remove_unused_columns=False,
    dataloader_pin_memory=False,
    check_teacher_accuracy=False,  # an untrained teacher: the accuracy check would rightly refuse it
)
forwarded = []
teacher.register_forward_hook(lambda m, a, o: forwarded.append(o.shape[0]))
start = time.perf_counter()
cache = TeacherCache.build_or_load(
    out / "cache", teacher, data, args, num_views=cli.views, logits_dtype="float32", batch_size=cli.batch_size
)
build_s = time.perf_counter() - start


class Record(DistillationCallback):
    def __init__(self):
        self.indices, self.views, self.max_diff, self.expected_views = [], [], 0.0, True

    def on_distill_loss(self, trainer, model, inputs, student_logits, teacher_logits):
        index, view = inputs["sample_index"], inputs["view_index"]
        epoch = int(trainer.state.epoch or 0)
        self.expected_views &= bool(torch.equal(view, CachedTeacher(cache, args.seed).view_ids(epoch)[index]))
        stored = cache.tensors()["logits"][index, view]
        self.max_diff = max(self.max_diff, float((teacher_logits - stored).abs().max()))
        self.indices += index.tolist()
        self.views += view.tolist()


record = Record()
result = {"teacher_samples_in_build": sum(forwarded), "build_s": build_s}
if not cli.build_only:
    trainer = DistillationTrainer(
        model=student,
        teacher_cache=cache,
        args=args,
        train_dataset=data,
        data_collator=DeviceImageDataset.collate,
        callbacks=[record],
    )
    trainer.train()
    final = torch.cat([p.detach().flatten() for p in student.parameters()])
    result.update(
        world_size=trainer.accelerator.num_processes,
        rank=trainer.accelerator.process_index,
        params=final.double().tolist(),
        indices=record.indices,
        views=record.views,
        max_diff=record.max_diff,
        expected_views=record.expected_views,
        teacher_samples_in_training=sum(forwarded) - result["teacher_samples_in_build"],
    )
from accelerate import PartialState  # noqa: E402

state = PartialState()
result.setdefault("world_size", state.num_processes)
with open(out / f"rank{state.process_index}.json", "w") as f:
    json.dump(result, f)
