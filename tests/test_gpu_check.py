"""benchmarks/gpu_check.py: the one-command GPU check, end to end in its CPU smoke mode (slow tier), and its pieces.

The smoke run is what CI runs so that the check cannot be broken when a GPU comes: every part runs at toy sizes, the
report is written, and its values are checked (each recipe method resumed from its mid-epoch checkpoint to weights
identical to the uninterrupted run's, every throughput row measured or marked "n/a on CPU", a profile behind each
cause). The pieces (weight comparison, the state a kill leaves, goals and their causes, the projection's arithmetic,
the launcher's timeouts) are tested in-process on made-up inputs, including GPU-shaped profiles.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gc = load("gpu_check", ROOT / "benchmarks" / "gpu_check.py")


def test_the_gpu_runs_arguments_mean_what_the_check_assumes(tmp_path, monkeypatch):
    """The GPU sizes cannot run here, so their command lines are parsed here: every recipe flag exists and lands
    where the report says (bf16, channels_last, the recipe's own batch sizes, the checkpoint steps), and every
    throughput row and goal names exactly one row of throughput.py on CUDA."""
    recipe = load("cifar100_recipe_for_gpu_check", ROOT / "recipes" / "cifar100.py")
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)  # --bf16 on a GPU
    options = type("Options", (), {"teacher": None, "student": None})()
    for method in gc.METHODS:
        argv = gc.recipe_arguments(method, gc.GPU, tmp_path / "data", tmp_path / method, tmp_path / "t", options)
        r, args, _ = recipe.parse_args(argv)
        assert (args.bf16, args.channels_last, args.max_steps, args.save_steps, args.save_total_limit) == (
            True, True, 200, 120, 2)  # fmt: skip
        assert args.eval_strategy == "no" and args.seed == 0 and not r.resume
        assert args.per_device_train_batch_size == gc.GPU.batch[method]  # the batch the projection uses
        if method != "ensemble":
            assert (r.teacher, r.student, r.teacher_max_steps) == ("cifar_resnet56", "cifar_resnet20", 2)
    assert recipe.parse_args([*argv, "--resume"])[0].resume
    assert r.search_max_steps is None and r.num_students == 5 and r.student == "cifar_resnet110"

    bench = load("throughput_for_gpu_check", ROOT / "benchmarks" / "throughput.py")
    for flags, rows in (([], gc.THROUGHPUT_ROWS), (["--compile"], gc.EXTRA_ROWS)):  # part 1, part 4
        args = bench.parse_args([*gc.GPU.throughput, "--cache_views", "4", *flags])
        assert (args.device.type, args.precision, args.batch_sizes) == ("cuda", "bf16", [64, 512])
        labels = list(bench.paths(args))
        for prefix in rows:
            assert sum(label.startswith(prefix) for label in labels) == 1, prefix
    for goal in gc.GOALS:
        assert any(row.startswith(goal.numerator) for row in gc.THROUGHPUT_ROWS)
        assert any(row.startswith(goal.denominator) for row in gc.THROUGHPUT_ROWS)


def student(folder: Path, tensors: dict) -> None:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))


def test_compare_weights_finds_any_changed_tensor(tmp_path):
    w = {"conv.weight": torch.randn(4, 3, 3, 3), "fc.bias": torch.zeros(10)}
    student(tmp_path / "ref" / "student0", w)
    student(tmp_path / "ref" / "student1", w)
    student(tmp_path / "same" / "student0", {k: v.clone() for k, v in w.items()})
    student(tmp_path / "same" / "student1", {k: v.clone() for k, v in w.items()})
    same = gc.compare_weights(tmp_path / "ref", tmp_path / "same")
    assert same == {"students": ["student0", "student1"], "tensors": 4, "different_tensors": 0, "max_abs_diff": 0.0,
                    "identical": True}  # fmt: skip

    changed = {**w, "fc.bias": w["fc.bias"] + torch.tensor([0] * 9 + [1e-3])}
    student(tmp_path / "changed" / "student0", w)
    student(tmp_path / "changed" / "student1", changed)
    diff = gc.compare_weights(tmp_path / "ref", tmp_path / "changed")
    assert not diff["identical"] and diff["different_tensors"] == 1
    assert diff["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)

    student(tmp_path / "partial" / "student0", w)
    assert gc.compare_weights(tmp_path / "ref", tmp_path / "partial")["why"] == "the resumed run saved no student1"
    (tmp_path / "empty").mkdir()
    assert not gc.compare_weights(tmp_path / "empty", tmp_path / "same")["identical"]


def test_the_folder_is_left_as_a_kill_after_the_checkpoint_leaves_it(tmp_path):
    run = tmp_path / "kd"
    for path in ("kd/distill/checkpoint-6", "kd/distill/checkpoint-12", "kd/search/checkpoint-4",
                 "kd/stage1_teacher/checkpoint-2", "student", "student0"):  # fmt: skip
        (run / path).mkdir(parents=True)
        (run / path / "f").write_text(path)
    gc.as_killed_after_checkpoint(run, 6, tmp_path / "reference")
    assert sorted(p.name for p in (tmp_path / "reference").iterdir()) == ["student", "student0"]
    assert (tmp_path / "reference" / "student" / "f").read_text() == "student"
    left = sorted(str(p.relative_to(run)) for p in run.glob("*/*/checkpoint-*"))  # <method>/<stage>/checkpoint-N
    assert left == ["kd/distill/checkpoint-6", "kd/search/checkpoint-4", "kd/stage1_teacher/checkpoint-2"]


def gpu_profile(**changes) -> dict:
    """A summary as throughput.py writes it for a CUDA row."""
    p = {"device": "cuda", "steps": 10, "wall_ms_per_step": 20.0, "host_ms_per_step": 18.0,
         "gpu_busy_ms_per_step": 8.0, "gpu_busy_share": 0.4, "kernels_per_step": 1500.0, "aten_ops_per_step": 2000.0,
         "host_syncs_per_step": {"cudaStreamSynchronize": 2.0, "cudaDeviceSynchronize": 0.0,
                                 "cudaEventSynchronize": 0.0, "aten::_local_scalar_dense": 1.0, "aten::item": 1.0},
         "data_loading_share": 0.25, "top_ops_by": "self GPU time",
         "top_ops": [{"name": "aten::cudnn_convolution", "calls_per_step": 60.0, "ms_per_step": 3.0}]}  # fmt: skip
    return {**p, **changes}


def write_profiles(tmp_path: Path, profiles: dict) -> dict:
    stems = {}
    for label, p in profiles.items():
        stem = tmp_path / "profiles" / f"{label[:3].strip('()')}_b64"
        stem.parent.mkdir(exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(p))
        stems[label] = {"64": str(stem)}
    return stems


def test_goals_pass_or_fail_and_a_miss_is_explained_from_the_slower_paths_profile(tmp_path):
    rows = {
        gc.KD_GRAPH: {"64": 20000.0},
        gc.TRAINER + ", x": {"64": 5000.0},  # 0.25 of the graph loop: fails
        gc.ALONE_TRAINER + ", fast path": {"64": 10000.0},
        gc.CACHE4: {"64": 9500.0},  # 0.95 of the student alone: passes
        gc.UNIX_FREE: {"64": 6000.0},  # wall-clock 5000/6000 = 0.83 of online KD: fails (<= 0.78 wanted)
    }
    fast = gpu_profile(gpu_busy_share=0.97, kernels_per_step=300.0, wall_ms_per_step=3.2, data_loading_share=0.0)
    fast["host_syncs_per_step"] = dict.fromkeys(fast["host_syncs_per_step"], 0.0)
    stems = write_profiles(tmp_path, {gc.TRAINER + ", x": gpu_profile(), gc.KD_GRAPH: fast,
                                      gc.UNIX_FREE: gpu_profile(data_loading_share=0.0)})  # fmt: skip
    goals = {g["goal"].split(" /")[0]: g for g in gc.goals(rows, stems, smoke=False, out=tmp_path)}
    trainer, cache = goals["DistillationTrainer"], goals["KD from the cache (R=4)"]
    unix = goals["UNIX free 0.75 wall-clock per epoch"]
    assert (trainer["ratio"], trainer["pass"], trainer["verdict"]) == (0.25, False, "fail")
    assert (cache["ratio"], cache["pass"], cache["verdict"]) == (0.95, True, "pass") and "cause" not in cache
    assert (unix["ratio"], unix["pass"], unix["target"]) == (0.833, False, "<= 0.78")
    cause = trainer["cause"]
    assert "host syncs: 3 per step (cudaStreamSynchronize x2, aten::_local_scalar_dense x1)" in cause
    assert "data loading: 25% of the step" in cause
    assert "launch-bound: the GPU is busy 40% of the step (1500 kernels" in cause
    assert "20.00 ms per step against 3.20 ms for (a) hand loop KD, CUDA graph, 1500 kernels against 300" in cause
    assert "aten::cudnn_convolution 3.00 ms" in cause and trainer["profile"] == os.path.join("profiles", "b_b64.json")
    assert "data loading" not in unix["cause"] and "launch-bound" in unix["cause"]

    busy = gpu_profile(gpu_busy_share=0.95, data_loading_share=0.0)
    busy["host_syncs_per_step"] = dict.fromkeys(busy["host_syncs_per_step"], 0.0)
    stems = write_profiles(tmp_path, {gc.TRAINER + ", x": busy})
    (trainer,) = [g for g in gc.goals(rows, stems, False, tmp_path) if g["goal"].startswith("Distillation")]
    assert trainer["cause"].startswith("GPU-bound: no host syncs, little data loading")

    # On CPU the CUDA-graph row is n/a, so is its goal; a row that did not run says why.
    cpu = {gc.KD_GRAPH: {"8": "n/a on CPU"}, gc.TRAINER: {"8": 50.0}, gc.CACHE4: {"8": "failed: ModuleNotFoundError"}}
    verdicts = [(g["verdict"], g.get("why")) for g in gc.goals(cpu, {}, smoke=True, out=tmp_path)]
    assert verdicts[0] == ("n/a on CPU", "(a) hand loop KD, CUDA graph: n/a on CPU")
    assert verdicts[1][0] == "not measured" and "failed: ModuleNotFoundError" in verdicts[1][1]


def test_stage_timing_and_the_projection_arithmetic():
    stamps = [
        {"stage": "distill", "event": "train_begin", "step": 0, "max_steps": 200, "t": 0.0},
        {"stage": "distill", "event": "step_end", "step": 60, "max_steps": 200, "t": 10.0},
        {"stage": "distill", "event": "step_end", "step": 120, "max_steps": 200, "t": 13.0},
        {"stage": "distill", "event": "save", "step": 120, "max_steps": 200, "t": 13.5},
        {"stage": "distill", "event": "train_end", "step": 200, "max_steps": 200, "t": 20.0},
        {"stage": "distill", "event": "evaluate", "step": 200, "max_steps": 200, "t": 22.0},
        {"stage": "search", "event": "train_begin", "step": 0, "max_steps": 60, "t": 0.0},
    ]
    name, stage = gc.stage_with_max_steps(stamps, 200)
    assert name == "distill"
    assert gc.stage_timing(stage, 60, 120) == {"s_per_step": 0.05, "checkpoint_s": 0.5, "eval_s": 2.0}

    row = gc.project(64, 0.01, None, 1e-4, 0.5, 240, 0, source="recipe run")
    assert row["steps_240_epochs"] == math.ceil(50_000 / 64) * 240 == 187_680
    assert row["eval_and_checkpoint_s_per_epoch"] == pytest.approx(1.5)
    assert row["hours_240_epochs"] == pytest.approx(240 * (782 * 0.01 + 1.5) / 3600)
    search = gc.project(64, 0.01, 0.03, 1e-4, 0.5, 240, 30, source="recipe run")
    assert search["hours_schedule"] == pytest.approx(row["hours_240_epochs"] + 30 * 782 * 0.03 / 3600)
    assert search["schedule"] == "30 search + 240 epochs"
    ensemble = gc.projection({"methods": {"ensemble": {"batch": 128, "s_per_step": 0.1}}}, {}, smoke=False)
    assert ensemble["rows"]["ensemble"]["hours_schedule"] == pytest.approx(350 * 391 * 0.1 / 3600)
    # Without a recipe run, kd falls back to the trainer's throughput row at batch 64.
    fallback = gc.projection({"methods": {}}, {"images_per_s": {gc.TRAINER: {"64": 6400.0}}}, smoke=False)
    assert fallback["rows"]["kd"]["s_per_step"] == pytest.approx(0.01)
    assert fallback["rows"]["kd"]["source"] == "throughput row (b)"


@pytest.mark.parametrize("fork", [False, True])
def test_the_launcher_reports_exit_codes_and_kills_a_run_with_its_children_at_the_timeout(tmp_path, fork):
    launcher = gc.Launcher(dict(os.environ), fork=fork)
    script = tmp_path / "script.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "if sys.argv[1] == 'exit':\n"
        "    print('ran with', sys.argv[1:]); sys.exit(3)\n"
        "child = subprocess.Popen(['sleep', '30'])\n"
        "open(sys.argv[2], 'w').write(str(child.pid))\n"
        "time.sleep(30)\n"
    )
    done = launcher.run(script, ["exit", "x"], 30, tmp_path / "exit.log")
    assert done["status"] == "failed (exit 3)"
    assert "ran with ['exit', 'x']" in (tmp_path / "exit.log").read_text()

    pid_file = tmp_path / "child.pid"
    start = time.monotonic()
    hung = launcher.run(script, ["hang", str(pid_file)], 3, tmp_path / "hang.log")
    assert hung["status"] == "timed out after 3 s" and time.monotonic() - start < 15
    grandchild = Path(f"/proc/{int(pid_file.read_text())}/stat")
    time.sleep(0.2)
    # The whole process group went, not only the script: its child is gone, or dead and not yet reaped (a zombie).
    assert not grandchild.exists() or grandchild.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert launcher.run(script, ["exit"], 0.5, tmp_path / "none.log")["status"].startswith("skipped: no time left")


# ---- end to end ------------------------------------------------------------------------------------------------------
def run_check(out: Path, *flags) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    command = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out), *flags]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow  # every part at toy sizes: about 2 minutes on 2 cores
def test_the_smoke_run_writes_a_full_report(tmp_path):
    out = tmp_path / "gpu_check"
    proc = run_check(out, "--budget", "900")  # generous: CI checks the values; the speed is in the report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    env, parts = report["environment"], report["parts"]
    assert report["smoke"] and env["mode"].startswith("smoke") and env["device"].startswith("cpu")
    assert env["missing"] == [] and env["versions"]["torch"] == torch.__version__.split("+")[0]
    assert {name: part["status"] for name, part in parts.items()} == dict.fromkeys(
        ("throughput", "recipes", "projection", "extras"), "ok"
    )

    rows = parts["throughput"]["images_per_s"]
    assert len(rows) == len(gc.THROUGHPUT_ROWS)
    for label, row in rows.items():
        assert list(row) == ["8"]
        if "CUDA graph" in label:
            assert row["8"] == "n/a on CPU"
        else:
            assert isinstance(row["8"], float) and row["8"] > 0, (label, row)
    goals = parts["throughput"]["goals"]
    assert [g["batch"] for g in goals] == [8, 8, 8] and goals[0]["verdict"] == "n/a on CPU"
    for g in goals[1:]:  # informational on CPU, but computed, with the profile behind the cause
        assert isinstance(g["ratio"], float) and g["verdict"].endswith("(CPU: informational)")
        assert (out / g["profile"]).is_file() and "top ops by self CPU time" in g["cause"]
    profile = json.loads((out / goals[1]["profile"]).read_text())
    assert profile["steps"] == 2 and profile["gpu_busy_share"] is None and profile["top_ops"]
    assert (out / goals[1]["profile"].replace(".json", ".trace.json.gz")).is_file()

    methods = parts["recipes"]["methods"]
    assert list(methods) == ["kd", "unix", "search", "ensemble"]
    for name, m in methods.items():
        assert m["status"] == "ok", (name, m)
        assert m["resumed_from_step"] == gc.SMOKE.save_at  # the mid-epoch checkpoint, not a fresh start
        assert m["weights"]["identical"] and m["weights"]["tensors"] > 0 and m["weights"]["max_abs_diff"] == 0
        assert m["s_per_step"] > 0 and m["eval_s_per_image"] > 0 and m["checkpoint_s"] >= 0
        assert m["uninterrupted"]["status"] == m["resumed"]["status"] == "ok"
    assert methods["ensemble"]["weights"]["students"] == ["student0", "student1"]
    assert methods["search"]["search_s_per_step"] > 0
    assert "--resume" in (out / "logs" / "recipe_kd_resumed.log").read_text().splitlines()[0]

    projection = parts["projection"]
    assert projection["note"].startswith("CPU smoke run")
    for name in methods:
        row = projection["rows"][name]
        assert row["steps_240_epochs"] == math.ceil(50_000 / 8) * 240 and row["hours_240_epochs"] > 0
        assert row["s_per_step"] == methods[name]["s_per_step"]
    assert projection["rows"]["search"]["hours_schedule"] > projection["rows"]["search"]["hours_240_epochs"]

    extras = parts["extras"]["images_per_s"]
    assert isinstance(extras["(g) teacher cache build, R=1 (teacher images/s)"]["8"], float)
    assert "torch.compile rows: skipped in smoke mode" in parts["extras"]["notes"][0]

    md = (out / "report.md").read_text()
    for heading in ("# GPU check", "## 1. Throughput", "## 2. Recipes", "## 3. Projection", "## 4. Extras"):
        assert heading in md
    assert "**Smoke run on CPU at toy sizes**" in md and "identical, " in md


@pytest.mark.slow
def test_a_part_out_of_time_is_reported_and_the_report_still_written(tmp_path):
    out = tmp_path / "gpu_check"
    proc = run_check(out, "--budget", "4", "--parts", "throughput", "extras")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = json.loads((out / "report.json").read_text())["parts"]
    assert parts["throughput"]["status"] == "timed out after 4 s"
    assert parts["extras"]["status"] == "skipped: no time left in the budget"
    assert parts["recipes"]["status"] == "skipped: not in --parts"
    # Rows measured before the timeout are kept (the benchmark writes its JSON after every row) and used.
    rows = parts["throughput"]["images_per_s"]
    assert all(isinstance(v, float) or v == "n/a on CPU" for row in rows.values() for v in row.values())
    _, trainer = gc.find_row(rows, gc.TRAINER)
    if trainer:
        assert parts["projection"]["rows"]["kd"]["source"] == "throughput row (b)"
    else:
        assert parts["projection"]["status"] == "nothing measured"
    assert "| throughput | timed out after 4 s |" in (out / "report.md").read_text()


def test_a_folder_that_is_not_a_previous_check_is_never_cleared(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert gc.main(["--smoke", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert "holds something other than a GPU check" in capsys.readouterr().err
