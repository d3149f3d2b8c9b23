"""A real 2-process DDP run on CPU through `accelerate launch` (gloo backend)."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def accelerate_launch(script: str, *script_args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`--multi_gpu` is what starts 2 processes on a CPU machine; `--cpu --num_processes 2` silently starts one."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        script,
        *script_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.multiprocess
def test_two_process_ddp_keeps_ranks_identical_and_teacher_unwrapped(tmp_path):
    accelerate_launch(os.path.join(ROOT, "tests", "scripts", "ddp_kd.py"), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world_size"] == 2
        assert r["student_wrapped_in_ddp"] is True
        assert r["teacher_wrapped_in_ddp"] is False and r["teacher_type"] != "DistributedDataParallel"
        assert r["moved"] > 0
        assert r["samples_seen"] == 3 * 8  # each rank saw its own shard: 8 samples a step
        assert len(r["log"]) == 3 and all(h["loss_kd"] > 0 for h in r["log"])
    assert ranks[0]["params"] == ranks[1]["params"]
    assert ranks[0]["param_sum"] == ranks[1]["param_sum"]
    # metrics are averaged over ranks before logging, so both ranks log the same numbers
    assert [h["loss_kd"] for h in ranks[0]["log"]] == [h["loss_kd"] for h in ranks[1]["log"]]


def run_python(script: str, *script_args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, script, *script_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.multiprocess
def test_two_process_teacher_cache_build_equals_one_process_and_ranks_train_identically(tmp_path):
    """40 samples in 5 teacher batches of 8: rank 0 runs batches 0, 2, 4 and rank 1 batches 1, 3 (3 views each).
    One cache is written; it equals the 1-process build bit for bit; training from it under DDP gives each rank the
    stored view of its own samples, and both ranks end with identical parameters."""
    from hf_kdsearch import TeacherCache

    script = os.path.join(ROOT, "tests", "scripts", "ddp_teacher_cache.py")
    run_python(script, str(tmp_path / "one"), "--build_only")
    accelerate_launch(script, str(tmp_path / "two"))
    one = TeacherCache.load_from_disk(tmp_path / "one" / "cache")
    two = TeacherCache.load_from_disk(tmp_path / "two" / "cache")
    assert one.info == two.info and one.info["num_views"] == 3 and one.info["num_samples"] == 40
    assert sorted(one.tensors()) == sorted(two.tensors()) == ["crop", "flip", "logits"]
    for name, tensor in one.tensors().items():
        assert torch.equal(two.tensors()[name], tensor), name
    assert [p for p in os.listdir(tmp_path / "two") if "cache" in p] == ["cache"]  # one cache, no temporary folder

    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert single["world_size"] == 1 and single["teacher_samples_in_build"] == 40 * 3
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert [r["teacher_samples_in_build"] for r in ranks] == [24 * 3, 16 * 3]  # each rank ran its own share
    for r in ranks:
        assert r["teacher_samples_in_training"] == 0 and r["max_diff"] == 0.0 and r["expected_views"]
        assert len(r["indices"]) == 4 * 4  # 4 steps of 4 samples
    assert not set(ranks[0]["indices"]) & set(ranks[1]["indices"])  # one epoch: the ranks' samples are disjoint
    assert ranks[0]["params"] == ranks[1]["params"]
