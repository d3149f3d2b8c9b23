"""Write a folder atomically: into a temporary folder beside it, then swapped into place in one step.

A kill, a full disk or an error at any point leaves the old folder or the new one, never a mix. Temporary folders are
named `.<name>.tmp-<host>-<pid>-<random>`, so concurrent writers (several ranks) never share one, and one left by a
dead process on this host is removed by the next save. `save_student` and `TeacherCache.save_to_disk` write through it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_folder"]


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, keep_other_files: bool = False, what: str = "folder") -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success it replaces `target` in one step, on error it is removed.

    With `keep_other_files`, files of the old `target` that the new contents do not write are carried over (as hard
    links). `what` names the folder in messages.

    The temporary name is `.<name>.tmp-<host>-<pid>-<random>`, so concurrent writers (several ranks) never share one
    and a folder left by a killed process on this host is recognised and removed by the next save.
    """
    target = Path(os.path.abspath(target))
    if Path.cwd() == target or target in Path.cwd().parents:
        raise ValueError(
            f"cannot save a {what} to {str(target)!r}: it is (or holds) the current working directory, which "
            f"a save replaces as a whole; pass a subfolder such as {str(target / 'student')!r}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = target.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would become the saved folder's
    try:
        yield tmp
        _replace_folder(tmp, target, keep_other_files, what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful replace


def _remove_stale(target: Path) -> None:
    host = socket.gethostname()
    for path in target.parent.glob(f".{target.name}.tmp-{host}-*"):
        pid = path.name[len(f".{target.name}.tmp-{host}-") :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _replace_folder(new: Path, target: Path, keep_other_files: bool, what: str) -> None:
    if not target.exists():
        try:
            os.rename(new, target)  # atomic; fails if another writer created a non-empty target meanwhile
            return
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if not target.is_dir():
        raise NotADirectoryError(f"cannot save a {what} to {str(target)!r}: a file of that name exists")
    for entry in target.iterdir() if keep_other_files else ():  # hard links cost no copy
        if not (new / entry.name).exists() and not entry.name.startswith(f".{target.name}.tmp-"):
            _link_tree(entry, new / entry.name)
    if _exchange(new, target):  # `new` now holds the old folder, which the caller removes
        return
    old = new.with_name(new.name + "-old")
    os.rename(target, old)  # a kill between these two renames leaves both folders complete beside the target
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> None:
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(str(src), str(dst))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux's renameat2(RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not Linux, or glibc older than 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
