"""A real 2-process DDP run on CPU through `accelerate launch` (gloo backend)."""

import json
import os
import subprocess
import sys

import pytest

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
