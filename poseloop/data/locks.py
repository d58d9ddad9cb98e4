"""Folder locks for runs that must not overlap: a lock file holding the owner's pid, held with fcntl.flock.

The kernel drops a flock when its process dies (kill -9 included), so a lock left by a dead run is free
again without any clean-up; the pid in the file only names the run that holds it in the error message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from poseloop.config.lib import ConfigError


class LockBusyError(ConfigError):
    """Another live run holds the lock; `pid` is its process id (0 when it could not be read)."""

    def __init__(self, message: str, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


def _owner(path: Path) -> tuple[int, str]:
    """(pid, command) written in a lock file by its holder; (0, '') when unreadable."""
    try:
        first, _, command = path.read_text().partition("\n")
        return int(first.strip() or 0), command.strip()
    except (OSError, ValueError):
        return 0, ""


def owner_pid(path: Path) -> int:
    """The pid written in a lock file by its holder (0 when unreadable)."""
    return _owner(path)[0]


def try_lock(path: Path) -> int | None:
    """The open descriptor of `path` locked exclusively, or None when another process holds it.

    The holder removes the file on release; a descriptor of a file that was removed (or replaced) between
    open and flock is discarded and the open retried, so two runs never both hold a lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n{' '.join(sys.argv)[:500]}\n".encode())
            return fd
        os.close(fd)


def release(path: Path, fd: int) -> None:
    """Remove and unlock a lock taken with try_lock (removal first, while it is still held)."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def folder_lock(path: Path, what: str, fix: str) -> Iterator[None]:
    """Hold the lock file `path` for the block; LockBusyError naming the other run's pid when it is held.

    `what` says what is locked ("samples folder samples/"), `fix` what to do instead.
    """
    fd = try_lock(path)
    if fd is None:
        pid, command = _owner(path)
        who = f"pid {pid}" + (f", `{command[:120]}`" if command else "") if pid else "another process"
        raise LockBusyError(f"{what} is in use by another run ({who}; lock file {path}); {fix}", pid)
    try:
        yield
    finally:
        release(path, fd)


T = TypeVar("T")


def run_locked(accelerator: Any, path: Path, what: str, fix: str, work: Callable[[], T]) -> T:
    """work() while the main process of an accelerate run holds `path`; a busy lock stops every process.

    The processes of one `accelerate launch` are one run: only the main one locks, and the others learn
    the outcome by a broadcast instead of entering collective operations the main one never reaches.
    """
    with contextlib.ExitStack() as held:
        busy: LockBusyError | None = None
        if accelerator.is_main_process:
            try:
                held.enter_context(folder_lock(path, what, fix))
            except LockBusyError as e:
                busy = e
        message = str(busy) if busy is not None else ""
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            message = broadcast_object_list([message])[0]
        if busy is not None:
            raise busy
        if message:
            raise ConfigError(message)
        return work()
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions here


__all__ = ["LockBusyError", "folder_lock", "owner_pid", "release", "run_locked", "try_lock"]
