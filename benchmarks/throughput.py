"""Training throughput of knowledge distillation, images/s: the library's Trainer path against hand-written loops.

    python benchmarks/throughput.py                      # ResNet-56 -> ResNet-20, bf16, batches 64 and 512 (GPU)
    python benchmarks/throughput.py --compile            # adds torch.compile rows for (a) and (b)
    python benchmarks/throughput.py --smoke              # toy sizes, runs anywhere in seconds (CI)
    python benchmarks/throughput.py --profile_dir out/p  # also profiles 10 more steps of every row (torch.profiler)

One run prints one table, a row per path and a column per batch size:

- (a) a hand-written PyTorch KD loop: data on the device, the same GPU augmentation (`random_crop_flip`, normalise),
  channels_last, bf16 autocast, SGD; eager, and with the whole step (augment, teacher, student, loss, backward,
  optimizer) captured in one CUDA graph (`torch.cuda.CUDAGraph`, CUDA only);
- (b) `DistillationTrainer` on the fast path: `DeviceImageDataset` on the device, `device_augment`, `channels_last`,
  bf16, no per-step host sync (`logging_nan_inf_filter=False`, `check_teacher_finite=False`);
- (c) the student trained alone by the hand loop (eager, and CUDA graph);
- (d) a naive `Trainer` subclass with a KD loss, fed by PIL images through torchvision transforms in a `DataLoader`,
  with the Trainer's defaults otherwise (`--naive_workers` loader workers, 0 by default);
- (e) `ClassificationTrainer`, the student alone, on the same fast path as (b);
- (f) `DistillationTrainer` from a `TeacherCache` of R = 1, 4 and 10 views (`--cache_views`): no teacher forward;
- (g) the cache-building pass, `TeacherCache.build` with R = 1, in teacher images/s; and, after the table, the build
  with R = 2 over `--steps` batches' worth of views (teacher views/s), with the bytes one stored view takes with all
  logits and with the top 10 (float16);
- (h) `DistillationTrainer` with UNIX (`UncertaintyMixupCallback(select_ratio=0.75)`), with the scoring pass and with
  free scoring. Free scoring runs the pass in the first epoch only, so its warm-up covers one whole epoch. UNIX rows
  count every sample drawn, kept or not, so images/s is epochs' worth of data per second.

and then the ratios: (b) to (a) and (c); every row to the student alone, (c) eager and (e); and UNIX's wall-clock per
epoch relative to online KD (b). Data are random CIFAR-shaped uint8 images with 100 classes,
so only speed is measured. Timing: after `--warmup` steps, the device is synchronised, `--steps` steps run, and it is
synchronised again. On a CPU the ratios are informational only: the speed targets are for one GPU.

With `--profile_dir`, every hand-loop and Trainer row then runs `--profile_steps` more steps under `torch.profiler`
(not timed) and writes `<row>_b<batch>.json` (top operators, host syncs and data loading per step, how busy the GPU
was; `profile_summary`) and a gzipped Chrome trace (`.trace.json.gz`, for chrome://tracing or Perfetto) there.

Results and the hardware they were measured on are in docs/recipe.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from hf_kdsearch import (
    ClassificationTrainer,
    DistillationArguments,
    DistillationTrainer,
    TeacherCache,
    UncertaintyMixupCallback,
    kd_loss,
)
from hf_kdsearch.fastpath import DeviceImageDataset, random_crop_flip
from hf_kdsearch.versions import versions

NUM_CLASSES = 100
ALPHA, TEMPERATURE, LR = 0.9, 4.0, 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="cifar_resnet56")
    p.add_argument("--student", default="cifar_resnet20")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[64, 512])
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first (cuDNN autotuning, compilation)")
    p.add_argument("--num_images", type=int, default=50_000, help="size of the synthetic training set")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="also measure (a) and (b) with torch.compile")
    p.add_argument("--naive_workers", type=int, default=0, help="DataLoader workers of (d); the Trainer's default 0")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--cache_views", type=int, nargs="+", default=[1, 4, 10], help="R of the teacher-cache rows (f)")
    p.add_argument("--select_ratio", type=float, default=0.75, help="UNIX rows (h)")
    p.add_argument("--rows", nargs="+", default=None, help="measure only rows whose label starts with one of these")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure every row this many times, in turn (round-robin), and keep the best: on a shared machine the "
        "load drifts, and interleaving exposes every row to the same drift",
    )
    p.add_argument("--profile_dir", default=None, help="profile every row after timing it, into this folder")
    p.add_argument("--profile_steps", type=int, default=10, help="steps under the profiler, after the timed ones")
    p.add_argument("--smoke", action="store_true", help="toy sizes: cifar_resnet8 models, batch 8, 3 steps")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.profile_steps < 1:
        p.error(f"--warmup, --steps, --profile_steps must be >= 1: {args.warmup}, {args.steps}, {args.profile_steps}")
    if args.smoke:
        args.teacher = args.student = "cifar_resnet8"
        args.batch_sizes, args.steps, args.warmup, args.num_images = [8], 3, 1, 64
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = args.precision or ("bf16" if args.device.type == "cuda" else "fp32")
    args.profile_to = None  # the file stem of the row being measured, when profiling (set by `run`)
    return args


# ---- shared pieces ---------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def models(args, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    teacher = timm.create_model(args.teacher, num_classes=NUM_CLASSES).to(args.device).eval()
    student = timm.create_model(args.student, num_classes=NUM_CLASSES).to(args.device)
    teacher.requires_grad_(False)
    return teacher, student


def synthetic_data(args) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (args.num_images,), generator=g)
    return images, labels


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4, foreach=True)


def timed(step: Callable[[int], None], args, batch: int) -> float:
    """Images/s of `step(i)` over `args.steps` steps after `args.warmup`."""
    for i in range(args.warmup):
        step(i)
    synchronize(args.device)
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    synchronize(args.device)
    rate = args.steps * batch / (time.perf_counter() - start)
    if args.profile_to:
        first = args.warmup + args.steps
        with profile_window(args):
            for i in range(first, first + args.profile_steps):
                step(i)
    return rate


def profiled_steps(args) -> int:
    """Steps run after the timed ones, under the profiler (0 without `--profile_dir`)."""
    return args.profile_steps if args.profile_to else 0


# ---- profiles (--profile_dir) ---------------------------------------------------------------------------------------
#: Profiler events that make the host wait for the device (the `aten::` ones are tensor reads such as `.item()`).
HOST_SYNC_EVENTS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "aten::_local_scalar_dense",
    "aten::item",
)
DATA_LOADING_PREFIX = "enumerate(DataLoader)"  # the DataLoader's own profiler annotation of each `next(iterator)`


@contextlib.contextmanager
def profile_window(args):
    """Profile the steps run inside; then write `args.profile_to` + `.json` (summary) and `.trace.json.gz`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(args.device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        yield
        synchronize(args.device)  # inside the window, so that every kernel of the steps is recorded
        wall = time.perf_counter() - start
    summary = profile_summary(prof, wall, args.profile_steps, args.device)
    os.makedirs(os.path.dirname(args.profile_to) or ".", exist_ok=True)
    with open(args.profile_to + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    trace = args.profile_to + ".trace.json"
    prof.export_chrome_trace(trace)
    with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(trace)


class ProfileCallback(TrainerCallback):
    """Runs `profile_window` over the Trainer's steps `first + 1 .. first + profile_steps` (data loading included)."""

    def __init__(self, args, first: int):
        self.args, self.first, self.window = args, first, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            self.window = profile_window(self.args)
            self.window.__enter__()
        elif state.global_step == self.first + self.args.profile_steps and self.window is not None:
            self.window.__exit__(None, None, None)
            self.window = None


def busy_time_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of `(start, end)` intervals: time the device ran at least one kernel or copy."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_summary(prof, wall_s: float, steps: int, device: torch.device) -> dict:
    """Per-step figures of a profiled window, and the operators that took the most time.

    `host_syncs_per_step` counts the events that block the host on the device (`HOST_SYNC_EVENTS`; the one
    `cudaDeviceSynchronize` that closes the window is not counted); `data_loading_share` is the DataLoader's share of
    the window's wall-clock; `gpu_busy_share` the share in which the GPU ran anything (None on CPU): a launch-bound or
    host-bound step leaves the GPU idle between kernels. The profiler's own overhead is in `wall_ms_per_step`.
    """
    cuda = device.type == "cuda"
    averages = prof.key_averages()
    counts = {e.key: e.count for e in averages}
    syncs = {name: counts.get(name, 0) for name in HOST_SYNC_EVENTS}
    if cuda:
        syncs["cudaDeviceSynchronize"] = max(0, syncs["cudaDeviceSynchronize"] - 1)
    time_key = "self_device_time_total" if cuda else "self_cpu_time_total"
    top = sorted(averages, key=lambda e: getattr(e, time_key), reverse=True)[:12]
    loading_us = sum(e.cpu_time_total for e in averages if e.key.startswith(DATA_LOADING_PREFIX))
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    wall_us = wall_s * 1e6
    busy_us = busy_time_us([(e.time_range.start, e.time_range.end) for e in device_events]) if cuda else None
    return {
        "device": device.type,
        "steps": steps,
        "wall_ms_per_step": wall_us / steps / 1e3,
        "host_ms_per_step": sum(e.self_cpu_time_total for e in averages) / steps / 1e3,
        "gpu_busy_ms_per_step": busy_us / steps / 1e3 if cuda else None,
        "gpu_busy_share": busy_us / wall_us if cuda else None,
        "kernels_per_step": len(device_events) / steps if cuda else None,
        "aten_ops_per_step": sum(e.count for e in averages if e.key.startswith("aten::")) / steps,
        "host_syncs_per_step": {name: n / steps for name, n in syncs.items()},
        "data_loading_share": loading_us / wall_us,
        "top_ops": [
            {"name": e.key[:100], "calls_per_step": e.count / steps, "ms_per_step": getattr(e, time_key) / steps / 1e3}
            for e in top
        ],
        "top_ops_by": "self GPU time" if cuda else "self CPU time",
    }


# ---- (a), (c): hand-written loops ------------------------------------------------------------------------------------
class HandLoop:
    """The step a researcher would write by hand, with the data, augmentation and precision of the fast path."""

    def __init__(self, args, batch: int, *, distill: bool, compile: bool = False):
        self.args, self.batch, self.distill = args, batch, distill
        teacher, student = models(args)
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
        self.teacher = torch.compile(teacher) if compile else teacher
        self.student = torch.compile(student) if compile else student
        self.optimizer = sgd(student)
        images, labels = synthetic_data(args)
        self.images, self.labels = images.to(args.device), labels.to(args.device)
        steps = args.warmup + args.steps + profiled_steps(args)
        epochs = -(-steps * batch // len(labels))
        # Sample order drawn on the device up front: slicing it per step costs no host sync.
        self.order = torch.cat([torch.randperm(len(labels), device=args.device) for _ in range(epochs)])
        cfg = student.pretrained_cfg
        mean = torch.tensor(cfg["mean"], device=args.device).view(1, -1, 1, 1)
        std = torch.tensor(cfg["std"], device=args.device).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / (255 * std), -mean / std
        self.bf16 = args.precision == "bf16"

    def indices(self, i: int) -> torch.Tensor:
        return self.order[i * self.batch : (i + 1) * self.batch]

    def forward_backward(self, idx: torch.Tensor, cache_enabled: bool = True) -> torch.Tensor:
        x = random_crop_flip(self.images[idx], padding=4)
        x = torch.addcmul(self.shift, x.to(torch.float32, memory_format=torch.channels_last), self.scale)
        y = self.labels[idx]
        with torch.autocast(self.args.device.type, torch.bfloat16, enabled=self.bf16, cache_enabled=cache_enabled):
            if self.distill:
                with torch.no_grad():
                    t = self.teacher(x)
            s = self.student(x)
        ce = F.cross_entropy(s.float(), y)
        loss = ALPHA * kd_loss(s, teacher_logits=t, temperature=TEMPERATURE) + (1 - ALPHA) * ce if self.distill else ce
        loss.backward()
        return loss

    def eager_step(self, i: int) -> None:
        self.forward_backward(self.indices(i))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def graph_step_fn(self) -> Callable[[int], None]:
        """The whole step captured once in a CUDA graph (PyTorch's "whole network capture" recipe) and replayed.

        Static index buffer in, everything else inside: gather, augmentation (graph-safe RNG), teacher, student,
        loss, backward and the SGD step. Gradients are set to None before capture, so each replay writes them anew.
        """
        static_idx = self.indices(0).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream: cuDNN choices, momentum buffers, lazy init
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self.forward_backward(static_idx, cache_enabled=False)
                self.optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self.forward_backward(static_idx, cache_enabled=False)
            self.optimizer.step()

        def step(i: int) -> None:
            static_idx.copy_(self.indices(i))
            graph.replay()

        return step


# ---- (b): DistillationTrainer on the fast path -----------------------------------------------------------------------
class StepTimer(TrainerCallback):
    """Synchronises and reads the clock after the warm-up step and after the last step."""

    def __init__(self, device: torch.device, warmup: int, last: int):
        self.device, self.warmup, self.last = device, warmup, last
        self.start = self.end = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.warmup, self.last):
            synchronize(self.device)
            if state.global_step == self.warmup:
                self.start = time.perf_counter()
            else:
                self.end = time.perf_counter()


def common_trainer_args(args, batch: int) -> dict:
    cuda = args.device.type == "cuda"
    return dict(
        output_dir=os.path.join(tempfile.gettempdir(), "hf_kdsearch_bench"),  # save_strategy="no": nothing written
        per_device_train_batch_size=batch,
        max_steps=args.warmup + args.steps + profiled_steps(args),
        learning_rate=LR,
        weight_decay=5e-4,
        optim="sgd",
        optim_args="momentum=0.9",
        lr_scheduler_type="constant",
        bf16=args.precision == "bf16",
        use_cpu=not cuda,
        logging_steps=10**9,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_drop_last=True,
        seed=0,
    )


def trainer_throughput(trainer: Trainer, args, batch: int) -> float:
    timer = StepTimer(args.device, args.warmup, args.warmup + args.steps)
    trainer.add_callback(timer)
    if args.profile_to:
        trainer.add_callback(ProfileCallback(args, first=args.warmup + args.steps))
    trainer.remove_callback(PrinterCallback)  # keep stdout for the table
    trainer.train()
    return args.steps * batch / (timer.end - timer.start)


def fast_dataset(args) -> DeviceImageDataset:
    images, labels = synthetic_data(args)
    return DeviceImageDataset(images, labels, device=args.device if args.device.type == "cuda" else None)


def fast_args(args, batch: int, compile: bool = False) -> DistillationArguments:
    return DistillationArguments(
        **common_trainer_args(args, batch),
        temperature=TEMPERATURE,
        alpha=ALPHA,
        device_augment=True,
        channels_last=True,
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        logging_nan_inf_filter=False,
        check_teacher_finite=False,
        check_teacher_accuracy=False,  # an untrained teacher on synthetic data; speed is what is measured
        torch_compile=compile,
        teacher_compile=compile,
    )


def fast_trainer(args, batch: int, compile: bool = False, *, cache_views: int | None = None, unix: str | None = None):
    """(b), and with `cache_views` (f) or `unix` (h); `unix="free"` times only steps after the first epoch."""
    teacher, student = models(args)
    dataset = fast_dataset(args)
    if unix == "free":
        args = argparse.Namespace(**{**vars(args), "warmup": max(args.warmup, len(dataset) // batch)})
    training_args = fast_args(args, batch, compile)
    source = {"teacher_model": teacher}
    if cache_views is not None:  # built before the trainer; row (g) times the build
        source = {"teacher_cache": TeacherCache.build(teacher, dataset, training_args, num_views=cache_views)}
    callbacks = [UncertaintyMixupCallback(args.select_ratio, scoring=unix)] if unix else []
    trainer = DistillationTrainer(
        model=student,
        args=training_args,
        train_dataset=dataset,
        data_collator=DeviceImageDataset.collate,
        callbacks=callbacks,
        **source,
    )
    return trainer_throughput(trainer, args, batch)


def student_trainer(args, batch: int) -> float:
    """(e): the student alone through the same Trainer path."""
    _, student = models(args)
    trainer = ClassificationTrainer(
        model=student,
        args=fast_args(args, batch),
        train_dataset=fast_dataset(args),
        data_collator=DeviceImageDataset.collate,
    )
    return trainer_throughput(trainer, args, batch)


def cache_build(args, batch: int) -> float:
    """(g): teacher images/s of `TeacherCache.build` with one view per image, over the whole synthetic set."""
    teacher, _ = models(args)
    dataset = fast_dataset(args)
    training_args = fast_args(args, batch)
    TeacherCache.build(teacher, torch.utils.data.Subset(dataset, range(batch)), training_args, num_views=1)  # warm-up
    synchronize(args.device)
    start = time.perf_counter()
    TeacherCache.build(teacher, dataset, training_args, num_views=1, batch_size=batch)
    synchronize(args.device)
    return len(dataset) / (time.perf_counter() - start)


def cache_build_rows(args, batch: int, num_views: int = 2, top_k: int = 10) -> dict[str, float]:
    """The cache build at scale: teacher views/s of `TeacherCache.build` with `num_views` views per image over
    `--steps` batches' worth of views, and the bytes one stored view takes with all logits (float16) and with the
    `top_k` largest (float16 values, int32 classes), crop offsets and flip included."""
    teacher, _ = models(args)
    dataset = fast_dataset(args)
    training_args = fast_args(args, batch)
    n = max(1, min(len(dataset), args.steps * batch // num_views))
    warm = torch.utils.data.Subset(dataset, range(min(batch, n)))
    TeacherCache.build(teacher, warm, training_args, num_views=num_views, batch_size=batch)  # warm-up
    synchronize(args.device)
    start = time.perf_counter()
    full = TeacherCache.build(
        teacher, torch.utils.data.Subset(dataset, range(n)), training_args, num_views, batch_size=batch
    )
    synchronize(args.device)
    seconds = time.perf_counter() - start
    topk = TeacherCache.build(teacher, warm, training_args, num_views, top_k, batch_size=batch)

    def bytes_per_view(cache: TeacherCache) -> float:
        return sum(t.numel() * t.element_size() for t in cache.tensors().values()) / (len(cache) * cache.num_views)

    return {
        "images": n,
        "views": num_views,
        "seconds": seconds,
        "views_per_s": n * num_views / seconds,
        "bytes_per_view_full": bytes_per_view(full),
        f"bytes_per_view_top{top_k}": bytes_per_view(topk),
    }


# ---- (d): the naive Trainer --------------------------------------------------------------------------------------
class PILImageDataset(torch.utils.data.Dataset):
    """What a tutorial does: PIL images and torchvision transforms, one sample at a time, on the CPU."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std):
        from PIL import Image
        from torchvision import transforms

        arrays = images.permute(0, 2, 3, 1).numpy()
        self.images = [Image.fromarray(a) for a in arrays]
        self.labels = labels.tolist()
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.transform(self.images[i]), "labels": self.labels[i]}


class NaiveKDTrainer(Trainer):
    """A `Trainer` subclass with a KD loss, as written without the library."""

    def __init__(self, *args, teacher: torch.nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        x, y = inputs["pixel_values"], inputs["labels"]
        with torch.no_grad():
            t = self.teacher(x)
        s = model(x)
        s32, t32 = s.float() / TEMPERATURE, t.float() / TEMPERATURE
        kd = F.kl_div(F.log_softmax(s32, -1), F.log_softmax(t32, -1), reduction="batchmean", log_target=True)
        loss = ALPHA * TEMPERATURE**2 * kd + (1 - ALPHA) * F.cross_entropy(s.float(), y)
        return (loss, s) if return_outputs else loss


def naive_trainer(args, batch: int) -> float:
    teacher, student = models(args)
    images, labels = synthetic_data(args)
    cfg = student.pretrained_cfg
    dataset = PILImageDataset(images, labels, cfg["mean"], cfg["std"])
    training_args = TrainingArguments(
        **common_trainer_args(args, batch),
        remove_unused_columns=False,
        dataloader_num_workers=args.naive_workers,
    )
    trainer = NaiveKDTrainer(model=student, teacher=teacher, args=training_args, train_dataset=dataset)
    return trainer_throughput(trainer, args, batch)


# ---- the run -------------------------------------------------------------------------------------------------------
def paths(args) -> dict[str, Callable[[int], float] | None]:
    """Row label -> measurement for one batch size (None: not measurable on this device)."""
    cuda = args.device.type == "cuda"
    rows = {
        "(a) hand loop KD, eager": lambda b: timed(HandLoop(args, b, distill=True).eager_step, args, b),
        "(a) hand loop KD, CUDA graph": (
            (lambda b: timed(HandLoop(args, b, distill=True).graph_step_fn(), args, b)) if cuda else None
        ),
        "(b) DistillationTrainer, fast path": lambda b: fast_trainer(args, b),
        "(c) hand loop student alone, eager": lambda b: timed(HandLoop(args, b, distill=False).eager_step, args, b),
        "(c) hand loop student alone, CUDA graph": (
            (lambda b: timed(HandLoop(args, b, distill=False).graph_step_fn(), args, b)) if cuda else None
        ),
        f"(d) naive Trainer KD, PIL/torchvision, {args.naive_workers} workers": lambda b: naive_trainer(args, b),
        "(e) ClassificationTrainer student alone, fast path": lambda b: student_trainer(args, b),
    }
    for r in args.cache_views:
        rows[f"(f) DistillationTrainer from a teacher cache, R={r}"] = lambda b, r=r: fast_trainer(
            args, b, cache_views=r
        )
    rows["(g) teacher cache build, R=1 (teacher images/s)"] = lambda b: cache_build(args, b)
    rows[f"(h) UNIX {args.select_ratio}, scoring pass"] = lambda b: fast_trainer(args, b, unix="pass")
    rows[f"(h) UNIX {args.select_ratio}, free scoring"] = lambda b: fast_trainer(args, b, unix="free")
    if args.compile:
        rows["(a) hand loop KD, torch.compile"] = lambda b: timed(
            HandLoop(args, b, distill=True, compile=True).eager_step, args, b
        )
        rows["(b) DistillationTrainer, fast path, torch.compile"] = lambda b: fast_trainer(args, b, compile=True)
    return rows


def run(args) -> dict:
    results: dict[str, dict[int, float | str]] = {}
    args.profiles = {}  # label -> batch -> profile file stem, with --profile_dir
    selected = {
        label: measure
        for label, measure in paths(args).items()
        if not args.rows or any(label.startswith(prefix) for prefix in args.rows)
    }
    for repeat in range(args.repeats):
        for label, measure in selected.items():
            results.setdefault(label, {})
            for batch in args.batch_sizes:
                if measure is None:
                    results[label][batch] = "n/a (needs CUDA)"
                    continue
                print(f"measuring {label}, batch {batch}, round {repeat + 1} ...", file=sys.stderr, flush=True)
                if args.profile_dir:
                    stem = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
                    args.profile_to = os.path.join(args.profile_dir, f"{stem}_b{batch}")
                    args.profiles.setdefault(label, {})[batch] = args.profile_to
                try:
                    value = measure(batch)
                except Exception as err:  # one failing path must not hide the others' numbers
                    value = f"failed: {type(err).__name__}: {err}"
                best = results[label].get(batch)
                if not isinstance(best, float) or (isinstance(value, float) and value > best):
                    results[label][batch] = value
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()  # between measurements only, never inside a timed loop
                if args.json:  # after every measurement: a run stopped part-way keeps what it measured
                    write_json(args, results)
    return results


def write_json(args, results: dict) -> None:
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(
            {"environment": environment(args), "images_per_s": results, "profiles": getattr(args, "profiles", {})},
            f,
            indent=2,
        )
    os.replace(tmp, args.json)


def ratios(results: dict, batch: int) -> list[tuple[str, float | None]]:
    def get(prefix: str) -> float | None:
        value = next((v[batch] for k, v in results.items() if k.startswith(prefix)), None)
        return value if isinstance(value, float) else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None else None

    fast = get("(b) DistillationTrainer, fast path")
    out = []
    for name, prefix in (
        ("(b) / (a) eager", "(a) hand loop KD, eager"),
        ("(b) / (a) CUDA graph", "(a) hand loop KD, CUDA graph"),
        ("(b) / (c) eager", "(c) hand loop student alone, eager"),
        ("(b) / (c) CUDA graph", "(c) hand loop student alone, CUDA graph"),
    ):
        out.append((name, ratio(fast, get(prefix))))
    alone, alone_trainer = get("(c) hand loop student alone, eager"), get("(e) ClassificationTrainer")
    for label in results:
        if label[:3] in ("(b)", "(e)", "(f)", "(h)"):
            short = label.split(",")[0] if label.startswith("(b)") else label
            out.append((f"{short} / (c) student alone eager", ratio(get(label), alone)))
            if not label.startswith("(e)"):
                out.append((f"{short} / (e) student alone Trainer", ratio(get(label), alone_trainer)))
    for label in results:  # wall-clock per epoch: the inverse ratio of images/s
        if label.startswith("(h)"):
            out.append((f"wall-clock {label} / (b) online KD", ratio(fast, get(label))))
    return out


def environment(args) -> dict:
    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": f"{args.device.type}: {device}",
        **versions(("torch", "transformers", "timm", "hf_kdsearch")),
        "precision": args.precision,
        "models": f"{args.teacher} -> {args.student}",
        "steps": f"{args.steps} timed after {args.warmup} warm-up, best of {args.repeats} interleaved rounds",
        "command": "python " + " ".join(sys.argv),
    }


def render(results: dict, args) -> str:
    env = environment(args)
    lines = [f"{k}: {v}" for k, v in env.items()]
    header = "| path | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " |"
    lines += ["", "images/s:", "", header, "|---|" + "---|" * len(args.batch_sizes)]
    for label, row in results.items():
        cells = [f"{v:,.0f}" if isinstance(v, float) else v for v in row.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " |"]
    lines.append("|---|" + "---|" * len(args.batch_sizes))
    per_batch = {b: dict(ratios(results, b)) for b in args.batch_sizes}
    for name in per_batch[args.batch_sizes[0]]:
        cells = [f"{per_batch[b][name]:.2f}" if per_batch[b][name] is not None else "n/a" for b in args.batch_sizes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if args.device.type != "cuda":
        lines += ["", "(CPU run: the ratios are informational; the targets are for one GPU.)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.backends.cudnn.benchmark = True
    results = run(args)
    print(render(results, args))
    if not args.rows or any("(g)".startswith(prefix) or prefix.startswith("(g)") for prefix in args.rows):
        print(f"\n(g) teacher cache build at scale ({NUM_CLASSES} classes, float16):\n")
        print("| batch | images x views | seconds | teacher views/s | bytes per view, full | bytes per view, top-10 |")
        print("|---|---|---|---|---|---|")
        for batch in args.batch_sizes:
            row = cache_build_rows(args, batch)
            print(
                f"| {batch} | {row['images']} x {row['views']} | {row['seconds']:.2f} | {row['views_per_s']:,.0f} | "
                f"{row['bytes_per_view_full']:,.0f} | {row['bytes_per_view_top10']:,.0f} |"
            )
    if args.json:
        write_json(args, results)
    failed = [f"{k} (batch {b})" for k, row in results.items() for b, v in row.items() if str(v).startswith("failed")]
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
