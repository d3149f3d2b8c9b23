"""Saving where a plain rename cannot: a symlinked student folder, a mount point; and a git-lfs pointer where the
weights should be."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import hf_kdsearch.atomic
from hf_kdsearch import TeacherLoadError, load_student, save_student
from hf_kdsearch.loading import ModelLoadError, load_model
from hf_kdsearch.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("mnist_mlp", hidden_dims=(7,))


def same_weights(folder: Path, model: torch.nn.Module) -> bool:
    saved = load_file(folder / "model.safetensors")
    return all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_a_symlinked_folder_is_saved_through_the_link(tmp_path):
    old, new = mlp(0), mlp(1)
    real = save_student(old, tmp_path / "volume" / "student")
    (real / "notes.txt").write_text("mine")
    link = tmp_path / "student"
    link.symlink_to(real, target_is_directory=True)

    save_student(new, link)
    assert link.is_symlink() and os.readlink(link) == str(real)  # the link stays, pointing where it did
    assert same_weights(real, new)  # and its target holds the new student
    assert (real / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "volume").iterdir()) == ["student"]  # no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "volume"]


def test_a_symlink_chain_and_a_dangling_link(tmp_path):
    real = tmp_path / "data" / "student"
    hop = tmp_path / "hop"
    hop.symlink_to(real)  # dangling: the folder does not exist yet
    link = tmp_path / "student"
    link.symlink_to(hop)
    save_student(mlp(0), link)
    assert link.is_symlink() and hop.is_symlink() and same_weights(real, mlp(0))


def busy_rename(target: Path, real_rename):
    """`atomic._rename` as a mount point makes it: any rename of `target` fails with EBUSY."""

    def rename(src, dst, *, exchange=False):
        if target in (Path(src), Path(dst)):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src), None, str(dst))
        return real_rename(src, dst, exchange=exchange)

    return rename


def test_a_folder_that_cannot_be_renamed_is_saved_file_by_file(tmp_path, monkeypatch, caplog):
    old, new = mlp(0), mlp(1)
    folder = save_student(old, tmp_path / "student", card={"notes": "old"})
    (folder / "notes.txt").write_text("mine")
    monkeypatch.setattr(hf_kdsearch.atomic, "_rename", busy_rename(folder, hf_kdsearch.atomic._rename))

    with caplog.at_level(logging.WARNING, logger="hf_kdsearch.atomic"):
        save_student(new, folder, card={"notes": "new"})
    assert same_weights(folder, new) and "new" in (folder / "README.md").read_text()
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary left beside it
    assert "saved file by file" in caplog.text and "Device or resource busy" in caplog.text
    assert ".tmp-" not in caplog.text
    with torch.no_grad():
        x = torch.randn(2, 1, 28, 28)
        assert torch.equal(load_student(folder).eval()(x), new.eval()(x))


def test_a_failed_rename_names_the_users_folder_not_a_temporary(tmp_path, monkeypatch):
    folder = save_student(mlp(0), tmp_path / "student")

    def denied(src, dst, *, exchange=False):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src), None, str(dst))

    monkeypatch.setattr(hf_kdsearch.atomic, "_rename", denied)
    with pytest.raises(PermissionError) as info:
        save_student(mlp(1), folder)
    assert str(folder) in str(info.value) and ".tmp-" not in str(info.value)
    assert same_weights(folder, mlp(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def unshare_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not unshare_available(), reason="needs unshare -rm (a private mount namespace) for a bind mount")
def test_a_real_mount_point_is_saved_file_by_file(tmp_path):
    # A bind mount in a private mount namespace: rename() of the mount point fails with EBUSY, as for a container
    # volume. Nothing outside the namespace sees the mount.
    volume, target = tmp_path / "volume", tmp_path / "student"
    volume.mkdir()
    target.mkdir()
    script = textwrap.dedent(
        f"""
        import logging, sys, timm, torch
        from safetensors.torch import load_file
        from hf_kdsearch import save_student
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
        torch.manual_seed(0); old = timm.create_model("mnist_mlp", hidden_dims=(7,))
        torch.manual_seed(1); new = timm.create_model("mnist_mlp", hidden_dims=(7,))
        save_student(old, {str(target)!r})
        save_student(new, {str(target)!r})
        saved = load_file({str(target / "model.safetensors")!r})
        assert all(torch.equal(saved[k], v) for k, v in new.state_dict().items())
        print("SAVED")
        """
    )
    command = f"mount --bind {volume} {target} && {sys.executable} -c {_quote(script)}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SAVED" in proc.stdout and "saved file by file" in proc.stdout and "mount point" in proc.stdout
    # The files went into the mounted volume, through the mount point.
    assert sorted(p.name for p in volume.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 12345\n"
)


def test_a_git_lfs_pointer_instead_of_the_weights_says_git_lfs_pull(tmp_path):
    folder = save_student(mlp(0), tmp_path / "student")
    (folder / "model.safetensors").write_text(LFS_POINTER)
    for load, error in ((load_student, ModelLoadError), (load_model, ModelLoadError), (load_teacher, TeacherLoadError)):
        with pytest.raises(error) as info:
            load(str(folder))
        message = str(info.value)
        assert "git lfs pull" in message and "model.safetensors" in message and str(folder) in message, message
        assert "\n" not in message
