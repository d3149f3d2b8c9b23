"""Every figure that needs a GPU, from one command in bounded time: `bash benchmarks/gpu_check.sh`, `make gpu-check`.

    bash benchmarks/gpu_check.sh               # one GPU: under 8 minutes (--budget 420 s of parts)
    bash benchmarks/gpu_check.sh --smoke       # the same parts at toy sizes on CPU (CI: tests/test_gpu_check.py)

Writes `out/gpu_check/report.md` and `report.json` (`--out`), with the device, the versions and each figure:

1. **throughput** (`benchmarks/throughput.py`, bf16, batches 64 and 512, ResNet-56 -> ResNet-20): the hand-written KD
   loop eager and as one CUDA graph, `DistillationTrainer`, the student alone (hand loop and `ClassificationTrainer`),
   KD from a teacher cache of R = 4 views, UNIX at 0.75 with free scoring; the ratios against the goals, each marked
   pass or fail. Every row is profiled after it is timed (`--profile_dir`); where a goal is missed, the report names
   the cause from the profile of the slower path: host syncs, data loading, or a GPU left idle (launch-bound).
2. **recipes**: each method of `recipes/cifar100.py` (kd, unix, search, ensemble), run through its command line on
   synthetic CIFAR-shaped images (an image folder of random 32x32 PNGs, 100 classes) in bf16 with channels_last, for
   N steps with a checkpoint at step K (mid-epoch); then the state a kill right after that checkpoint leaves (the
   later checkpoint and the saved students removed) is resumed with `--resume`, and the resumed students' tensors are
   compared with the uninterrupted run's. Seconds per step are timed between two synchronised steps of the run.
3. **projection**: those seconds per step times the steps of a CIFAR-100 run (50,000 images at the recipe's batch
   size; 240 epochs, and the recipe's own schedule), plus one evaluation of 10,000 images and one checkpoint per epoch.
4. **extras**, in the time left: `torch.compile` rows and the teacher cache's build rate.

Every part, and every recipe run inside part 2, runs in its own process with a timeout (`--budget` caps the sum); a
part that runs out of time is reported as such, with whatever it measured, and the next part runs. With `--smoke` the
models are cifar_resnet8, batches 8, a few steps, fp32 and no channels_last on CPU (channels_last crashes torch's CPU
backward for some shapes); CUDA-graph rows read "n/a on CPU" and the goals are informational.

`python benchmarks/gpu_check.py recipe-run TIMING.json MARKS -- <recipe arguments>` is the wrapper part 2 launches:
it runs `recipes/cifar100.py` with those arguments (as `python recipes/cifar100.py ...` would) and records, for each
stage, synchronised clock readings at the steps in MARKS, at each checkpoint save, at the end of training and after
the evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT = ROOT / "benchmarks" / "throughput.py"
RECIPE = ROOT / "recipes" / "cifar100.py"
METHODS = ("kd", "unix", "search", "ensemble")
PACKAGES = ("torch", "torchvision", "transformers", "accelerate", "timm", "datasets", "evaluate", "huggingface_hub",
            "safetensors", "numpy", "pyarrow")  # fmt: skip
NEEDS_DATASETS = ("datasets", "evaluate")  # the recipes load data with datasets and score with evaluate
WHEELS_HINT = "put their wheels in .whl/ (the pip download line in benchmarks/gpu_check.sh)"
MARKER = ".gpu_check"  # marks a report folder that the next run may clear
CIFAR100 = {"train_images": 50_000, "eval_images": 10_000, "epochs": 240}

# Throughput rows of part 1 (label prefixes of throughput.py) and the goals between them.
KD_GRAPH = "(a) hand loop KD, CUDA graph"
TRAINER = "(b) DistillationTrainer, fast path"
ALONE_HAND = "(c) hand loop student alone, eager"
ALONE_TRAINER = "(e) ClassificationTrainer student alone"
CACHE4 = "(f) DistillationTrainer from a teacher cache, R=4"
UNIX_FREE = "(h) UNIX 0.75, free scoring"
THROUGHPUT_ROWS = ("(a) hand loop KD, eager", KD_GRAPH, TRAINER, ALONE_HAND, "(c) hand loop student alone, CUDA graph",
                   ALONE_TRAINER, CACHE4, UNIX_FREE)  # fmt: skip
EXTRA_ROWS = ("(g)", "(a) hand loop KD, torch.compile", "(b) DistillationTrainer, fast path, torch.compile")


@dataclass(frozen=True)
class Goal:
    name: str
    numerator: str  # row label prefix whose images/s is divided ...
    denominator: str  # ... by this row's
    target: float
    at_least: bool  # ratio >= target; else the wall-clock ratio (denominator / numerator images/s) <= target

    def ratio(self, num: float, den: float) -> float:
        return num / den if self.at_least else den / num


GOALS = (
    Goal("DistillationTrainer / hand KD loop in one CUDA graph", TRAINER, KD_GRAPH, 0.9, True),
    Goal("KD from the cache (R=4) / student alone (ClassificationTrainer)", CACHE4, ALONE_TRAINER, 0.9, True),
    Goal("UNIX free 0.75 wall-clock per epoch / online KD (DistillationTrainer)", UNIX_FREE, TRAINER, 0.78, False),
)


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    budget_s: float
    part_timeout_s: dict
    throughput: list
    extras: list
    recipe_flags: list  # device and precision flags of every recipe run
    teacher: str
    student: str
    ensemble_flags: list
    train_images: int
    eval_images: int
    steps: int  # N: steps of the main stage of each recipe run
    save_at: int  # K: the checkpoint that the resumed run starts from (mid-epoch)
    warmup: int  # W: seconds per step are timed over steps W..K
    search_steps: int
    batch: dict = field(default_factory=dict)  # per method: the batch size the runs use (GPU: the recipe's defaults)
    batch_flags: list = field(default_factory=list)


#: throughput.py's settings on the GPU (parts 1 and 4)
# fmt: off
GPU_THROUGHPUT = ["--device", "cuda", "--precision", "bf16", "--batch_sizes", "64", "512", "--steps", "100",
                  "--warmup", "20", "--num_images", "10000"]
# fmt: on
GPU = Sizes(
    budget_s=420,
    part_timeout_s={"throughput": 190, "recipes": 210, "recipe_run": 75},
    throughput=[*GPU_THROUGHPUT, "--profile_steps", "10"],
    extras=GPU_THROUGHPUT,
    recipe_flags=["--bf16", "true", "--channels_last", "true"],
    teacher="cifar_resnet56",
    student="cifar_resnet20",
    ensemble_flags=[],  # the recipe's own: 5 ResNet-110 widths, batch 128
    train_images=3200,
    eval_images=1000,
    steps=200,
    save_at=120,
    warmup=60,
    search_steps=60,
    batch={"kd": 64, "unix": 64, "search": 64, "ensemble": 128},
)
SMOKE = Sizes(
    budget_s=170,
    part_timeout_s={"throughput": 90, "recipes": 150, "recipe_run": 60},
    throughput=["--smoke", "--device", "cpu", "--profile_steps", "2"],
    extras=["--smoke", "--device", "cpu"],
    recipe_flags=["--use_cpu", "--bf16", "false", "--channels_last", "false", "--per_device_eval_batch_size", "50"],
    teacher="cifar_resnet8",
    student="cifar_resnet8",
    ensemble_flags=["--student", "cifar_resnet8", "--num_students", "2"],
    train_images=200,
    eval_images=100,
    steps=12,
    save_at=6,
    warmup=2,
    search_steps=4,
    batch={m: 8 for m in METHODS},
    batch_flags=["--per_device_train_batch_size", "8"],
)


# ---- running a part ------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.monotonic(), budget_s

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)


class Launcher:
    """Runs `python SCRIPT ARGV...` in its own process group, output to a log, killed as a group at its timeout.

    `fork=True` (the CPU smoke run) forks this process instead of starting a new interpreter: the parent has imported
    torch, transformers, timm, datasets and the library once (`preload`), which a 2-core machine otherwise pays ~10 s
    for per run. The child runs the script as `python SCRIPT ARGV` would (`runpy`, `__main__`, same argv, cwd and
    environment). A GPU run starts fresh interpreters (`fork=False`): CUDA cannot be used in a forked child.
    """

    def __init__(self, env: dict, fork: bool):
        self.env, self.fork = env, fork
        if fork:  # read at import time by torch and huggingface_hub: set before the preload
            os.environ.clear()
            os.environ.update(env)
            sys.path.insert(0, str(ROOT))

    def preload(self) -> None:
        if self.fork:
            import accelerate  # noqa: F401
            import timm  # noqa: F401
            import transformers.trainer  # noqa: F401

            import hf_kdsearch  # noqa: F401

    def run(self, script: Path, argv: list[str], timeout_s: float, log: Path) -> dict:
        log.parent.mkdir(parents=True, exist_ok=True)
        if timeout_s < 1:
            return {"status": "skipped: no time left in the budget", "wall_s": 0.0, "timeout_s": round(timeout_s, 1)}
        command = [sys.executable, str(script), *map(str, argv)]
        start = time.monotonic()
        with open(log, "w") as out:
            out.write("$ " + shlex.join(command) + ("  (forked)" if self.fork else "") + "\n")
            out.flush()
            if self.fork:
                code = self._forked(script, argv, timeout_s, out)
            else:
                proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip
                try:
                    code = proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    code = None
        status = "ok" if code == 0 else f"failed (exit {code})"
        if code is None:
            status = f"timed out after {timeout_s:.0f} s"
        return {"status": status, "wall_s": round(time.monotonic() - start, 1), "timeout_s": round(timeout_s, 1),
                "log": str(log)}  # fmt: skip

    @staticmethod
    def _forked(script: Path, argv: list[str], timeout_s: float, out) -> int | None:
        import runpy
        import traceback

        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.setpgid(0, 0)
                os.chdir(ROOT)
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # whatever sys.stdout was (pytest swaps it)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                sys.argv = [str(script), *map(str, argv)]
                try:
                    runpy.run_path(str(script), run_name="__main__")
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                except BaseException:
                    traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + timeout_s
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
            time.sleep(0.05)


def shown(command: list) -> str:
    """The command as a user in the repository root would type it (paths under the root made relative)."""
    root = str(ROOT) + os.sep
    return shlex.join(str(c).replace(root, "") for c in command)


def log_tail(log: str | None, lines: int = 6) -> str:
    if not log or not os.path.isfile(log):
        return ""
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])


def child_env(smoke: bool, hf_home: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


# ---- environment ---------------------------------------------------------------------------------------------------
def environment(smoke: bool) -> dict:
    """Device, versions and load. Imports torch here (no CUDA context is made) and tries the recipes' imports."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    missing = []
    for module in NEEDS_DATASETS:
        try:
            importlib.import_module(module)
        except Exception:
            missing.append(module)
    cuda = torch.cuda.is_available()  # makes no CUDA context here: the parts' processes use the whole GPU
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    device, driver = f"cpu: {cpu}", None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        smi = subprocess.run(query, capture_output=True, text=True, timeout=30)
        if smi.returncode == 0 and smi.stdout.strip():
            name, memory, driver = (x.strip() for x in smi.stdout.strip().splitlines()[0].split(","))
            device = f"cuda: {name} ({memory})" if cuda else device
    if cuda and device.startswith("cpu"):
        device = "cuda (no nvidia-smi: the throughput part's environment names the GPU)"
    return {
        "mode": "smoke (CPU, toy sizes)" if smoke else "gpu",
        "device": device,
        "cuda": cuda,
        "cuda_version": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "driver": driver,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": versions,
        "missing": missing,
    }


# ---- part 1 and 4: throughput ----------------------------------------------------------------------------------------
def throughput_part(args, sizes: Sizes, out: Path, timeout_s: float, launcher: Launcher) -> dict:
    raw = out / "throughput.json"
    argv = [*sizes.throughput, *models(args, sizes), "--cache_views", "4",
               "--select_ratio", "0.75", "--rows", *THROUGHPUT_ROWS, "--profile_dir", str(out / "profiles"),
               "--json", str(raw)]  # fmt: skip
    part = launcher.run(THROUGHPUT, argv, timeout_s, out / "logs" / "throughput.log")
    data = json.loads(raw.read_text()) if raw.is_file() else {}
    part["command"] = shown(["python", THROUGHPUT, *argv])
    part["environment"] = data.get("environment")
    part["images_per_s"] = cells(data.get("images_per_s", {}), args.smoke)
    part["goals"] = goals(part["images_per_s"], data.get("profiles", {}), args.smoke, out)
    return part


def models(args, sizes: Sizes) -> list[str]:
    """Teacher and student flags of throughput.py (its --smoke picks its own toy models)."""
    if args.smoke:
        return []
    return ["--teacher", args.teacher or sizes.teacher, "--student", args.student or sizes.student]


def cells(rows: dict, smoke: bool) -> dict:
    """Row -> batch -> images/s (float) or a note; a CUDA-only row on CPU reads "n/a on CPU"."""
    out = {}
    for label, row in rows.items():
        out[label] = {}
        for batch, value in row.items():
            if isinstance(value, str) and value.startswith("n/a") and smoke:
                value = "n/a on CPU"
            out[label][str(batch)] = value
    return out


def find_row(rows: dict, prefix: str) -> tuple[str | None, dict]:
    for label, row in rows.items():
        if label.startswith(prefix):
            return label, row
    return None, {}


def goals(rows: dict, profiles: dict, smoke: bool, out: Path) -> list[dict]:
    batches = sorted({b for row in rows.values() for b in row}, key=int)
    result = []
    for goal in GOALS:
        num_label, num = find_row(rows, goal.numerator)
        den_label, den = find_row(rows, goal.denominator)
        for batch in batches:
            a, b = num.get(batch), den.get(batch)
            target = f"{'>=' if goal.at_least else '<='} {goal.target}"
            entry = {"goal": goal.name, "batch": int(batch), "numerator": num_label, "denominator": den_label,
                     "target": target, "ratio": None, "pass": None}  # fmt: skip
            if isinstance(a, float) and isinstance(b, float):
                entry["ratio"] = round(goal.ratio(a, b), 3)
                ok = entry["ratio"] >= goal.target if goal.at_least else entry["ratio"] <= goal.target
                entry["pass"] = ok
                entry["verdict"] = ("pass" if ok else "fail") + (" (CPU: informational)" if smoke else "")
            else:
                missing = [f"{lbl or prefix}: {v if v is not None else 'not measured'}"
                           for lbl, prefix, v in ((num_label, goal.numerator, a), (den_label, goal.denominator, b))
                           if not isinstance(v, float)]  # fmt: skip
                entry["verdict"] = "n/a on CPU" if smoke and any("n/a" in m for m in missing) else "not measured"
                entry["why"] = "; ".join(missing)
            if entry["pass"] is False or (smoke and entry["ratio"] is not None):
                # The numerator is the path that falls short (too slow a trainer, cache or UNIX step).
                entry["profile"], entry["cause"] = diagnose(profiles, num_label, den_label, batch, out)
            result.append(entry)
    return result


def load_profile(profiles: dict, label: str | None, batch: str) -> tuple[str | None, dict | None]:
    stem = (profiles.get(label) or {}).get(str(batch)) if label else None
    if not stem or not os.path.isfile(stem + ".json"):
        return None, None
    return stem, json.loads(Path(stem + ".json").read_text())


def diagnose(profiles: dict, slow: str | None, fast: str | None, batch: str, out: Path) -> tuple[str | None, str]:
    """The cause of a missed goal, named from the slower path's profile (and the faster one's, for comparison)."""
    stem, p = load_profile(profiles, slow, batch)
    if p is None:
        return None, f"no profile of {slow} at batch {batch}"
    _, q = load_profile(profiles, fast, batch)
    causes = []
    syncs = {k: v for k, v in p["host_syncs_per_step"].items() if v > 0 and k != "aten::item"}
    blocking = sum(syncs.values())
    if blocking >= 0.5:
        what = ", ".join(f"{k} x{v:g}" for k, v in syncs.items())
        causes.append(f"host syncs: {blocking:g} per step ({what})")
    if p["data_loading_share"] >= 0.1:
        causes.append(f"data loading: {p['data_loading_share']:.0%} of the step in the DataLoader")
    if p["gpu_busy_share"] is not None and p["gpu_busy_share"] < 0.8:
        causes.append(
            f"launch-bound: the GPU is busy {p['gpu_busy_share']:.0%} of the step ({p['kernels_per_step']:.0f} kernels "
            f"and {p['host_ms_per_step']:.1f} ms of host work per step, for {p['gpu_busy_ms_per_step']:.1f} ms of GPU "
            "work)"
        )
    if not causes:
        kind = "GPU-bound" if p["gpu_busy_share"] is not None else "compute-bound on the CPU"
        causes.append(f"{kind}: no host syncs, little data loading; the difference is the work per step")
    if q is not None:
        causes.append(
            f"{p['wall_ms_per_step']:.2f} ms per step against {q['wall_ms_per_step']:.2f} ms for {fast}"
            + (f", {p['kernels_per_step']:.0f} kernels against {q['kernels_per_step']:.0f}" if q["kernels_per_step"]
               is not None else f", {p['aten_ops_per_step']:.0f} aten ops against {q['aten_ops_per_step']:.0f}")
        )  # fmt: skip
    top = ", ".join(f"{op['name']} {op['ms_per_step']:.2f} ms" for op in p["top_ops"][:3])
    causes.append(f"top ops by {p['top_ops_by']}: {top}")
    return os.path.relpath(stem + ".json", out), "; ".join(causes)


def extras_part(args, sizes: Sizes, out: Path, timeout_s: float, launcher: Launcher) -> dict:
    raw = out / "extras.json"
    rows = list(EXTRA_ROWS)
    notes = []
    if args.smoke:  # torch.compile on CPU builds C++ for minutes: not a smoke-sized step
        rows = [EXTRA_ROWS[0]]
        notes.append("torch.compile rows: skipped in smoke mode (inductor compiles C++ on CPU for minutes)")
    argv = [*sizes.extras, *models(args, sizes), "--compile", "--rows", *rows,
               "--json", str(raw)]  # fmt: skip
    part = launcher.run(THROUGHPUT, argv, timeout_s, out / "logs" / "extras.log")
    data = json.loads(raw.read_text()) if raw.is_file() else {}
    part["command"] = shown(["python", THROUGHPUT, *argv])
    part["images_per_s"] = cells(data.get("images_per_s", {}), args.smoke)
    part["notes"] = notes
    return part


# ---- part 2: the recipes ---------------------------------------------------------------------------------------------
def write_image_folder(root: Path, train: int, test: int, num_classes: int = 100, seed: int = 0) -> Path:
    """`root/{train,test}/classNNN/*.png`: random 32x32 RGB images in balanced classes (a local copy for the recipe)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        for i in range(n):
            folder = root / split / f"class{i % num_classes:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return root


def recipe_arguments(method: str, sizes: Sizes, data: Path, output_dir: Path, teacher_cache: Path, args) -> list:
    common = ["--method", method, "--dataset_path", str(data), "--output_dir", str(output_dir),
              "--max_steps", str(sizes.steps), "--save_strategy", "steps", "--save_steps", str(sizes.save_at),
              "--save_total_limit", "2", "--eval_strategy", "no", "--logging_steps", str(sizes.save_at),
              "--disable_tqdm", "true", "--seed", "0", "--check_teacher_accuracy", "false",
              *sizes.recipe_flags, *sizes.batch_flags]  # fmt: skip
    if method == "ensemble":
        return common + sizes.ensemble_flags
    teacher = ["--teacher", args.teacher or sizes.teacher, "--teacher_max_steps", "2",
               "--teacher_cache_dir", str(teacher_cache), "--student", args.student or sizes.student]  # fmt: skip
    if method == "search":
        teacher += ["--search_max_steps", str(sizes.search_steps)]
    return common + teacher


def recipe_run(launcher: Launcher, timing: Path, marks: list[int], recipe_args: list, timeout_s: float, log: Path):
    argv = ["recipe-run", str(timing), ",".join(map(str, marks)), "--", *recipe_args]
    result = launcher.run(Path(__file__).resolve(), argv, timeout_s, log)
    result["stamps"] = json.loads(timing.read_text()) if timing.is_file() else []
    return result


def stage_timing(stamps: list[dict], first: int, last: int) -> dict:
    """Seconds per step between the synchronised readings at steps `first` and `last` of the stage that ran
    `max_steps` steps, the checkpoint save at `last` and the final evaluation (seconds per image)."""
    out = {}
    t = {(s["event"], s["step"]): s["t"] for s in stamps}
    if ("step_end", first) in t and ("step_end", last) in t:
        out["s_per_step"] = (t[("step_end", last)] - t[("step_end", first)]) / (last - first)
    if ("save", last) in t and ("step_end", last) in t:
        out["checkpoint_s"] = t[("save", last)] - t[("step_end", last)]
    ends = [s for s in stamps if s["event"] == "train_end"]
    evals = [s for s in stamps if s["event"] == "evaluate"]
    if ends and evals and evals[-1]["t"] > ends[-1]["t"]:
        out["eval_s"] = evals[-1]["t"] - ends[-1]["t"]
    return out


def stages(stamps: list[dict]) -> dict[str, list[dict]]:
    by_stage: dict[str, list[dict]] = {}
    for s in stamps:
        by_stage.setdefault(s["stage"], []).append(s)
    return by_stage


def stage_with_max_steps(stamps: list[dict], max_steps: int) -> tuple[str | None, list[dict]]:
    for name, stage in stages(stamps).items():
        if any(s["event"] == "train_begin" and s["max_steps"] == max_steps for s in stage):
            return name, stage
    return None, []


def compare_weights(reference: Path, resumed: Path) -> dict:
    """Tensor-by-tensor comparison of every student folder's model.safetensors."""
    import torch
    from safetensors.torch import load_file

    students = sorted(p.name for p in reference.iterdir() if (p / "model.safetensors").is_file())
    result = {"students": students, "tensors": 0, "different_tensors": 0, "max_abs_diff": 0.0, "identical": True}
    if not students:
        return {**result, "identical": False, "why": f"no student saved in {reference}"}
    for name in students:
        if not (resumed / name / "model.safetensors").is_file():
            return {**result, "identical": False, "why": f"the resumed run saved no {name}"}
        a = load_file(reference / name / "model.safetensors")
        b = load_file(resumed / name / "model.safetensors")
        if a.keys() != b.keys():
            return {**result, "identical": False, "why": f"{name}: different tensor names"}
        for key in a:
            result["tensors"] += 1
            if not torch.equal(a[key], b[key]):
                result["different_tensors"] += 1
                diff = (a[key].double() - b[key].double()).abs().max().item() if a[key].numel() else 0.0
                result["max_abs_diff"] = max(result["max_abs_diff"], diff)
    result["identical"] = result["different_tensors"] == 0
    return result


def as_killed_after_checkpoint(output_dir: Path, save_at: int, reference: Path) -> None:
    """Turn a finished run's folder into what a kill right after checkpoint `save_at` leaves: the saved students move
    to `reference`, and every checkpoint after `save_at` in the stage that saved one at `save_at` is removed."""
    reference.mkdir(parents=True, exist_ok=True)
    for student in output_dir.glob("student*"):
        student.rename(reference / student.name)
    # Stages sit at any depth (the recipe keeps `<output_dir>/<method>/<stage>/checkpoint-N`).
    for stage in {p.parent for p in output_dir.rglob(f"checkpoint-{save_at}") if p.is_dir()}:
        if (stage / f"checkpoint-{save_at}").is_dir():
            for later in stage.glob("checkpoint-*"):
                if later.name.split("-")[-1].isdigit() and int(later.name.split("-")[-1]) > save_at:
                    shutil.rmtree(later)


def recipes_part(args, sizes: Sizes, out: Path, clock: Clock, launcher: Launcher, missing: list) -> dict:
    if missing:
        return {"status": f"skipped: {' and '.join(missing)} not importable; {WHEELS_HINT}", "methods": {}}
    root = out / "recipes"
    shutil.rmtree(root, ignore_errors=True)
    start = time.monotonic()
    part_end = start + min(sizes.part_timeout_s["recipes"], clock.left() - 5)  # 5 s kept for the report
    data = write_image_folder(root / "data", sizes.train_images, sizes.eval_images)
    teacher_cache = root / f"teacher-{args.teacher or sizes.teacher}"
    methods = {}
    for method in args.methods:
        methods[method] = one_recipe(args, sizes, method, root, data, teacher_cache, part_end, launcher)
    statuses = [m["status"] for m in methods.values()]
    status = "ok" if all(s == "ok" for s in statuses) else "; ".join(f"{m}: {s}" for m, s in zip(methods, statuses))
    return {"status": status, "wall_s": round(time.monotonic() - start, 1),
            "timeout_s": round(part_end - start, 1), "methods": methods,
            "settings": {"train_images": sizes.train_images, "eval_images": sizes.eval_images, "steps": sizes.steps,
                         "checkpoint_at": sizes.save_at, "timed_steps": [sizes.warmup, sizes.save_at],
                         "search_steps": sizes.search_steps, "flags": sizes.recipe_flags}}  # fmt: skip


def one_recipe(
    args, sizes: Sizes, method: str, root: Path, data: Path, teacher_cache: Path, part_end: float, launcher: Launcher
) -> dict:
    output_dir = root / method
    recipe_args = recipe_arguments(method, sizes, data, output_dir, teacher_cache, args)
    marks = sorted({sizes.warmup, sizes.save_at, sizes.search_steps // 2, sizes.search_steps})
    result = {"batch": sizes.batch.get(method), "command": shown(["python", RECIPE, *recipe_args])}

    def budget() -> float:
        return min(sizes.part_timeout_s["recipe_run"], part_end - time.monotonic())

    logs = root.parent / "logs"
    first = recipe_run(launcher, root / f"{method}_timing.json", marks, recipe_args, budget(),
                       logs / f"recipe_{method}.log")  # fmt: skip
    result["uninterrupted"] = {k: v for k, v in first.items() if k != "stamps"}
    main_stage, stamps = stage_with_max_steps(first["stamps"], sizes.steps)
    result["stage"] = main_stage
    result.update(stage_timing(stamps, sizes.warmup, sizes.save_at))
    if result.get("eval_s") is not None:
        result["eval_s_per_image"] = result.pop("eval_s") / sizes.eval_images
    if method == "search":
        _, search = stage_with_max_steps(first["stamps"], sizes.search_steps)
        timing = stage_timing(search, sizes.search_steps // 2, sizes.search_steps)
        result["search_s_per_step"] = timing.get("s_per_step")
    if first["status"] != "ok":
        result["status"] = f"uninterrupted run {first['status']}"
        result["log_tail"] = log_tail(first.get("log"))
        return result
    reference = root / f"{method}.uninterrupted"
    as_killed_after_checkpoint(output_dir, sizes.save_at, reference)
    resumed = recipe_run(launcher, root / f"{method}_resumed_timing.json", marks, [*recipe_args, "--resume"],
                         budget(), logs / f"recipe_{method}_resumed.log")  # fmt: skip
    result["resumed"] = {k: v for k, v in resumed.items() if k != "stamps"}
    begins = [s for s in resumed["stamps"] if s["event"] == "train_begin" and s["max_steps"] == sizes.steps]
    result["resumed_from_step"] = begins[-1]["step"] if begins else None
    if resumed["status"] != "ok":
        result["status"] = f"resumed run {resumed['status']}"
        result["failed_run"] = "resumed"
        result["log_tail"] = log_tail(resumed.get("log"))
        return result
    result["weights"] = compare_weights(reference, output_dir)
    if not result["weights"]["identical"] and budget() > 0.5 * result["uninterrupted"]["wall_s"]:
        # Is it the resume, or do two uninterrupted runs differ already (kernels that are not bit-reproducible)?
        again = recipe_arguments(method, sizes, data, root / f"{method}.again", teacher_cache, args)
        rerun = recipe_run(launcher, root / f"{method}_again_timing.json", marks, again, budget(),
                           logs / f"recipe_{method}_again.log")  # fmt: skip
        if rerun["status"] == "ok":
            result["weights"]["uninterrupted_twice"] = compare_weights(reference, root / f"{method}.again")
    ok = result["weights"]["identical"] and result["resumed_from_step"] == sizes.save_at
    result["status"] = "ok" if ok else "resumed weights differ" if not result["weights"]["identical"] else (
        f"resumed from step {result['resumed_from_step']}, not {sizes.save_at}")  # fmt: skip
    return result


# ---- part 3: projection ----------------------------------------------------------------------------------------------
def projection(recipes: dict, throughput: dict, smoke: bool) -> dict:
    """Hours of a CIFAR-100 run per method: steps x s/step, plus an evaluation and a checkpoint per epoch."""
    rows = {}
    schedules = {"kd": (240, 0), "unix": (240, 0), "search": (240, 30), "ensemble": (350, 0)}
    for method, r in recipes.get("methods", {}).items():
        if r.get("s_per_step") is None or not r.get("batch"):
            rows[method] = {"status": f"no seconds per step measured ({r.get('status')})"}
            continue
        rows[method] = project(r["batch"], r["s_per_step"], r.get("search_s_per_step"), r.get("eval_s_per_image"),
                               r.get("checkpoint_s"), *schedules[method], source="recipe run")  # fmt: skip
    if "kd" not in rows or "status" in rows["kd"]:  # fall back to the throughput row of the trainer, batch 64
        _, trainer = find_row(throughput.get("images_per_s", {}), TRAINER)
        rate = trainer.get("64") if not smoke else next(iter(trainer.values()), None)
        if isinstance(rate, float):
            batch = 64 if not smoke else int(next(iter(trainer)))
            rows["kd"] = project(batch, batch / rate, None, None, None, 240, 0, source="throughput row (b)")
    note = "CPU smoke run at toy sizes: these are not GPU projections" if smoke else None
    return {"status": "ok" if rows else "nothing measured", "rows": rows, "note": note, **CIFAR100}


def project(batch, s_per_step, search_s_per_step, eval_s_per_image, checkpoint_s, epochs, search_epochs, source):
    steps_per_epoch = math.ceil(CIFAR100["train_images"] / batch)
    per_epoch_extra = (eval_s_per_image or 0.0) * CIFAR100["eval_images"] + (checkpoint_s or 0.0)

    def hours(n_epochs: int, n_search: int) -> float:
        search = n_search * steps_per_epoch * (search_s_per_step or 0.0)
        return (n_epochs * (steps_per_epoch * s_per_step + per_epoch_extra) + search) / 3600

    return {
        "source": source,
        "batch": batch,
        "s_per_step": s_per_step,
        "steps_240_epochs": steps_per_epoch * CIFAR100["epochs"],
        "eval_and_checkpoint_s_per_epoch": per_epoch_extra if (eval_s_per_image or checkpoint_s) else None,
        "hours_240_epochs": hours(CIFAR100["epochs"], 0),
        "schedule": f"{search_epochs} search + {epochs} epochs" if search_epochs else f"{epochs} epochs",
        "hours_schedule": hours(epochs, search_epochs),
        "search_s_per_step": search_s_per_step,
    }


# ---- the report ------------------------------------------------------------------------------------------------------
def fmt(value, spec: str = ",.0f") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def render(report: dict) -> str:
    env, parts = report["environment"], report["parts"]
    smoke = report["smoke"]
    lines = ["# GPU check", ""]
    if smoke:
        lines += ["**Smoke run on CPU at toy sizes**: it tests the script; its figures are not GPU figures.", ""]
    lines += [
        f"- command: `{report['command']}`",
        f"- date: {report['date']}; wall-clock {report['wall_s']:.0f} s (parts' budget {report['budget_s']:.0f} s)",
        f"- device: {env['device']}"
        + (f"; driver {env['driver']}" if env.get("driver") else "")
        + (f"; CUDA {env['cuda_version']}, cuDNN {env['cudnn']}" if env.get("cuda") else ""),
        f"- host: {env['cpu']}, {env['cpu_count']} cores; load average before {env['load_average_before']}, after "
        f"{env.get('load_average_after')}",
        "- versions: python " + env["python"] + ", " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
    ]
    if env["missing"]:
        lines.append(f"- missing: {', '.join(env['missing'])} ({WHEELS_HINT})")
    lines += ["", "| part | status | wall-clock s | timeout s |", "|---|---|---|---|"]
    for name, part in parts.items():
        lines.append(f"| {name} | {part.get('status')} | {fmt(part.get('wall_s'), '.1f')} | "
                     f"{fmt(part.get('timeout_s'), '.0f')} |")  # fmt: skip

    t = parts["throughput"]
    lines += ["", "## 1. Throughput, images/s", "", f"`{t.get('command', '')}`", ""]
    lines += table_of_rows(t.get("images_per_s", {}))
    lines += ["", "| goal | batch | ratio | target | verdict |", "|---|---|---|---|---|"]
    for g in t.get("goals", []):
        lines.append(f"| {g['goal']} | {g['batch']} | {fmt(g['ratio'], '.2f')} | {g['target']} | {g['verdict']} |")
    causes = [g for g in t.get("goals", []) if g.get("cause")]
    if causes:
        what = "every goal's path (the smoke run explains every goal; a GPU run the missed ones)" if smoke else (
            "the path that falls short")  # fmt: skip
        lines += ["", f"Causes, from the profile of {what} (`torch.profiler`, after the timed steps):", ""]
        for g in causes:
            lines.append(f"- {g['goal']}, batch {g['batch']} ({g.get('profile') or 'no profile'}): {g['cause']}")

    r = parts["recipes"]
    lines += ["", "## 2. Recipes: checkpoint, kill, --resume", ""]
    s = r.get("settings")
    if s:
        lines += [
            f"`recipes/cifar100.py` through its command line, {s['train_images']} train and {s['eval_images']} test "
            f"random 32x32 PNGs (100 classes), {s['steps']} steps with a checkpoint at step {s['checkpoint_at']}; "
            f"the folder as a kill right after that checkpoint leaves it, then `--resume`. Seconds per step between "
            f"steps {s['timed_steps'][0]} and {s['timed_steps'][1]}. Flags: `{' '.join(s['flags'])}`.",
            "",
        ]
    lines += ["| method | status | batch | s/step | eval s/image | checkpoint s | resumed from step | resumed weights "
              "| run s + resume s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    failures = []
    for method, m in r.get("methods", {}).items():
        walls = [m.get(k, {}).get("wall_s") for k in ("uninterrupted", "resumed")]
        s_per_step = fmt(m.get("s_per_step"), ".4f")
        if m.get("search_s_per_step") is not None:
            s_per_step += f" (search phase {m['search_s_per_step']:.4f})"
        lines.append(
            f"| {method} | {m['status']} | {fmt(m.get('batch'))} | {s_per_step} | "
            f"{fmt(m.get('eval_s_per_image'), '.2e')} | {fmt(m.get('checkpoint_s'), '.2f')} | "
            f"{fmt(m.get('resumed_from_step'))} | {weights_cell(m.get('weights'))} | "
            f"{' + '.join(fmt(x, '.0f') for x in walls)} |"
        )
        if m.get("log_tail"):
            failures += [f"{method}, the end of its log ({m[m.get('failed_run', 'uninterrupted')].get('log')}):", "",
                         "```", m["log_tail"], "```", ""]  # fmt: skip
    if failures:
        lines += ["", *failures]
    if r.get("status", "").startswith("skipped"):
        lines += ["", r["status"]]

    p = parts["projection"]
    lines += ["", "## 3. Projection: one CIFAR-100 run on this device", ""]
    if p.get("note"):
        lines += [f"**{p['note']}.**", ""]
    lines += [
        f"{p['train_images']:,} training images at the recipe's batch size; per epoch one evaluation of "
        f"{p['eval_images']:,} images and one checkpoint, as the recipe does.",
        "",
        "| method | from | batch | s/step | steps (240 epochs) | hours, 240 epochs | recipe's schedule | hours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, row in p.get("rows", {}).items():
        if "status" in row:
            lines.append(f"| {method} | {row['status']} | | | | | | |")
            continue
        lines.append(
            f"| {method} | {row['source']} | {row['batch']} | {row['s_per_step']:.4f} | {row['steps_240_epochs']:,} "
            f"| {row['hours_240_epochs']:.2f} | {row['schedule']} | {row['hours_schedule']:.2f} |"
        )

    e = parts.get("extras", {"status": "not run yet"})
    lines += ["", "## 4. Extras: torch.compile, the cache build rate", ""]
    if e.get("command"):
        lines += [f"`{e['command']}`", ""]
    lines += [f"- {n}" for n in e.get("notes", [])] + ([""] if e.get("notes") else [])
    if e.get("images_per_s"):
        lines += table_of_rows(e["images_per_s"])
    lines += ["", "Files: `report.json` (everything above), `logs/`, `profiles/` (a summary JSON and a gzipped Chrome "
              "trace per row and batch), `throughput.json`, `extras.json`."]  # fmt: skip
    return "\n".join(lines) + "\n"


def weights_cell(w: dict | None) -> str:
    if not w:
        return "n/a"
    if w.get("why"):
        return f"not compared: {w['why']}"
    if w["identical"]:
        cell = f"identical, {w['tensors']} tensors"
    else:
        cell = f"differ: {w['different_tensors']} of {w['tensors']} tensors, max abs diff {w['max_abs_diff']:.3g}"
    cell += f" ({', '.join(w['students'])})"
    twice = w.get("uninterrupted_twice")
    if twice:
        cell += "; two uninterrupted runs: " + ("identical" if twice["identical"] else (
            f"differ too ({twice['different_tensors']} tensors, max abs diff {twice['max_abs_diff']:.3g}): the "
            "kernels are not bit-reproducible, not the resume"))  # fmt: skip
    return cell


def table_of_rows(rows: dict) -> list[str]:
    if not rows:
        return ["(no rows measured)"]
    batches = sorted({b for row in rows.values() for b in row}, key=int)
    lines = ["| path | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(fmt(row.get(b)) for b in batches) + " |")
    return lines


# ---- the command ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU (CI)")
    p.add_argument("--out", default=str(ROOT / "out" / "gpu_check"), help="report folder")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 420 GPU, 170 smoke)")
    parts = ["throughput", "recipes", "extras"]
    p.add_argument("--parts", nargs="+", default=parts, choices=parts, help="parts to run (and the projection)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="recipe methods of part 2")
    p.add_argument("--teacher", default=None, help="default cifar_resnet56 (smoke: cifar_resnet8)")
    p.add_argument("--student", default=None, help="default cifar_resnet20 (smoke: cifar_resnet8)")
    launch = "how parts start: default fork with --smoke (CPU), else subprocess (CUDA needs a fresh process)"
    p.add_argument("--launch", choices=("fork", "subprocess"), default=None, help=launch)
    p.add_argument("--allow_cpu", action="store_true", help="run the GPU sizes even without CUDA")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else GPU
    budget = args.budget if args.budget is not None else sizes.budget_s
    out = Path(args.out).resolve()
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        print(f"gpu_check: {out} holds something other than a GPU check; pass another --out", file=sys.stderr)
        return 2
    shutil.rmtree(out, ignore_errors=True)  # the last check's folder
    out.mkdir(parents=True)
    (out / MARKER).touch()
    started = time.time()
    fork = (args.launch or ("fork" if args.smoke else "subprocess")) == "fork"
    launcher = Launcher(child_env(args.smoke, out / "hf_home"), fork=fork)
    env_info = environment(args.smoke)
    if not args.smoke and not env_info["cuda"] and not args.allow_cpu:
        print("gpu_check: no CUDA device; run with --smoke on CPU (or --allow_cpu)", file=sys.stderr)
        return 2
    env_info["launch"] = "fork" if fork else "subprocess"
    launcher.preload()
    clock = Clock(budget)  # the parts' budget; the start-up above is in the report's wall-clock only
    report = {
        "smoke": args.smoke,
        "command": "bash benchmarks/gpu_check.sh " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget_s": budget,
        "sizes": asdict(sizes),
        "environment": env_info,
        "parts": {},
    }
    parts = report["parts"]
    skipped = {"status": "skipped: not in --parts"}

    def save():
        report["wall_s"] = time.time() - started
        report["environment"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(render(report))

    if "throughput" in args.parts:
        later = sizes.part_timeout_s["recipes"] if "recipes" in args.parts else 0  # kept for part 2
        timeout = min(sizes.part_timeout_s["throughput"], max(clock.left() - later, 0.3 * clock.left()))
        parts["throughput"] = throughput_part(args, sizes, out, timeout, launcher)
    else:
        parts["throughput"] = dict(skipped)
    if "recipes" in args.parts:
        parts["recipes"] = recipes_part(args, sizes, out, clock, launcher, env_info["missing"])
    else:
        parts["recipes"] = dict(skipped)
    parts["projection"] = projection(parts["recipes"], parts["throughput"], args.smoke)
    save()
    if "extras" in args.parts:
        parts["extras"] = extras_part(args, sizes, out, clock.left() - 5, launcher)
    else:
        parts["extras"] = dict(skipped)
    save()
    print((out / "report.md").read_text())
    print(f"gpu_check: wrote {out / 'report.md'} and {out / 'report.json'} in {report['wall_s']:.0f} s")
    return 0


# ---- the wrapper around one recipe run (part 2) ----------------------------------------------------------------------
def recipe_run_main(timing: str, marks: str, recipe_argv: list[str]) -> None:
    """Run recipes/cifar100.py with `recipe_argv`, recording synchronised clock readings per stage."""
    import runpy

    import torch
    from transformers.trainer_callback import CallbackHandler

    steps = {int(m) for m in marks.split(",") if m}
    stamps: list[dict] = []

    def stamp(args, state, event: str) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        stamps.append({"stage": os.path.basename(os.path.normpath(args.output_dir)), "event": event,
                       "step": state.global_step, "max_steps": state.max_steps, "t": time.perf_counter()})  # fmt: skip
        tmp = timing + ".tmp"
        Path(tmp).write_text(json.dumps(stamps))
        os.replace(tmp, timing)

    def patch(name: str, event: str, when=lambda state: True) -> None:
        original = getattr(CallbackHandler, name)

        def wrapped(self, args, state, control, *a, **kw):
            control = original(self, args, state, control, *a, **kw)
            if when(state):
                stamp(args, state, event)
            return control

        setattr(CallbackHandler, name, wrapped)

    patch("on_train_begin", "train_begin")
    patch("on_step_end", "step_end", lambda state: state.global_step in steps)
    patch("on_save", "save")
    patch("on_train_end", "train_end")
    patch("on_evaluate", "evaluate")
    sys.argv = [str(RECIPE), *recipe_argv]
    runpy.run_path(str(RECIPE), run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "recipe-run":
        if len(sys.argv) < 5 or sys.argv[4] != "--":
            sys.exit("usage: gpu_check.py recipe-run TIMING.json MARKS -- <recipe arguments>")
        recipe_run_main(sys.argv[2], sys.argv[3], sys.argv[5:])
    else:
        sys.exit(main())
