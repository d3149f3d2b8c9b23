"""Write a folder atomically: into a temporary folder beside it, then swapped into place in one step.

A kill, a full disk or an error at any point leaves the old folder or the new one, never a mix. Temporary folders are
named `.<name>.tmp-<host>-<pid>-<random>`, so concurrent writers (several ranks) never share one, and one left by a
dead process on this host is removed by the next save. `save_student` and `TeacherCache.save_to_disk` write through it.

A target that is a symbolic link is saved through: the folder it points to is replaced, the link stays. A target that
cannot be renamed (a mount point, such as a container volume: `rename` fails with EBUSY or EXDEV) has its files
replaced one by one instead, each atomically (written beside it, then `os.replace`), with a logged warning: a kill in
the middle can then leave some files old and some new, but never a half-written file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_folder"]

logger = logging.getLogger(__name__)

#: errno values of a rename that can never succeed for this target (a mount point, another file system).
_UNRENAMABLE = (errno.EBUSY, errno.EXDEV)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, keep_other_files: bool = False, what: str = "folder") -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success it replaces `target` in one step, on error it is removed.

    With `keep_other_files`, files of the old `target` that the new contents do not write are carried over (as hard
    links). `what` names the folder in messages.

    The temporary name is `.<name>.tmp-<host>-<pid>-<random>`, so concurrent writers (several ranks) never share one
    and a folder left by a killed process on this host is recognised and removed by the next save. A symbolic link
    as `target` is followed (its target is replaced, the link kept); a `target` that cannot be renamed (a mount point)
    has its files replaced one by one, each atomically, with a logged warning.
    """
    target = Path(os.path.abspath(target))
    if target.is_symlink():  # save through the link: replacing the link itself would leave its target stale
        target = Path(os.path.realpath(target))
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
        try:
            yield tmp
        except OSError as err:  # a full disk names the temporary copy: say which folder it was and that it is intact
            _note(
                err,
                f"hf_kdsearch: writing the {what} {str(target)!r} (into the temporary {str(tmp)!r}) failed; "
                f"{str(target)!r} is left as it was",
            )
            raise
        _replace_folder(tmp, target, keep_other_files, what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful replace


def _note(err: BaseException, note: str) -> None:
    if hasattr(err, "add_note"):  # Python >= 3.11
        err.add_note(note)


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


def _rename(src: Path, dst: Path, *, exchange: bool = False) -> None:
    """Every rename of a folder goes through here: `os.rename`, or with `exchange` Linux's
    renameat2(RENAME_EXCHANGE), which swaps two paths in one step. Raises `OSError` with the errno; ENOSYS where the
    system has no renameat2."""
    if not exchange:
        os.rename(src, dst)
        return
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not Linux, or glibc older than 2.28
        raise OSError(errno.ENOSYS, "renameat2 is not available") from None
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _replace_folder(new: Path, target: Path, keep_other_files: bool, what: str) -> None:
    if not target.exists():
        try:
            _rename(new, target)  # atomic; fails if another writer created a non-empty target meanwhile
            return
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise _failed(err, target, what) from err
    if not target.is_dir():
        raise NotADirectoryError(f"cannot save a {what} to {str(target)!r}: a file of that name exists")
    if os.path.ismount(target):  # no rename of a mount point can succeed: do not even carry files over
        _replace_files(new, target, keep_other_files, what, "it is a mount point")
        return
    carried = set()
    for entry in target.iterdir() if keep_other_files else ():  # hard links cost no copy
        if not (new / entry.name).exists() and not _is_temporary(entry.name, target.name):
            _link_tree(entry, new / entry.name)
            carried.add(entry.name)
    try:
        _swap(new, target)
    except OSError as err:
        if err.errno not in _UNRENAMABLE:
            raise _failed(err, target, what) from err
        for name in carried:  # the target still holds these: only the files this save wrote are copied in
            _remove(new / name)
        _replace_files(
            new,
            target,
            keep_other_files,
            what,
            f"it cannot be renamed: {os.strerror(err.errno)}; a mount point, such as a container volume?",
        )


def _swap(new: Path, target: Path) -> None:
    """Put `new` in place of `target`; afterwards `new` holds the old folder (or nothing), which the caller removes."""
    try:
        _rename(new, target, exchange=True)
        return
    except OSError as err:
        if err.errno in _UNRENAMABLE:
            raise
    old = new.with_name(new.name + "-old")
    _rename(target, old)  # a kill between these two renames leaves both folders complete beside the target
    try:
        _rename(new, target)
    except OSError:
        _rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _failed(err: OSError, target: Path, what: str) -> OSError:
    """The error of a failed rename, naming the user's folder rather than the temporary one."""
    return type(err)(err.errno, f"cannot replace the {what} {str(target)!r}: {err.strerror}; it is left as it was")


def _is_temporary(name: str, target_name: str) -> bool:
    return name.startswith(f".{target_name}.tmp-") or (name.startswith(".") and ".tmp-" in name)


def _replace_files(new: Path, target: Path, keep_other_files: bool, what: str, why: str) -> None:
    """Copy each file of `new` into `target` beside its destination, then `os.replace` them in quick succession."""
    host, pid = socket.gethostname(), os.getpid()
    for stale in target.rglob(f".*.tmp-{host}-*"):
        left = stale.name.split(f".tmp-{host}-", 1)[1].split("-")[0]
        if left.isdigit() and not _alive(int(left)):
            _remove(stale)
    files = sorted(p.relative_to(new) for p in new.rglob("*") if not p.is_dir() or p.is_symlink())
    staged: list[tuple[Path, Path]] = []
    try:
        for rel in files:  # stage every file first, so that the replacements follow one another closely
            dest = target / rel
            if dest.is_dir() and not dest.is_symlink():
                raise IsADirectoryError(
                    errno.EISDIR, f"cannot save a {what} to {str(target)!r}: {str(dest)!r} is a folder"
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
            temp = dest.with_name(f".{dest.name}.tmp-{host}-{pid}-{secrets.token_hex(4)}")
            shutil.copy2(new / rel, temp, follow_symlinks=False)
            staged.append((temp, dest))
        for temp, dest in staged:
            os.replace(temp, dest)
    except OSError as err:
        for temp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        if isinstance(err, IsADirectoryError):
            raise
        raise _failed(err, target, what) from err
    if not keep_other_files:
        written = {rel.parts[0] for rel in files}
        for entry in target.iterdir():
            if entry.name not in written:
                _remove(entry)
    logger.warning(
        "the %s %r was saved file by file (%s): each of its %d files was replaced atomically, but a kill during the "
        "save could leave some of them old and some new",
        what,
        str(target),
        why,
        len(files),
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


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
