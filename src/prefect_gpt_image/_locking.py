"""Locks that keep two runs from paying for the same image at the same moment.

Prefect's default isolation lets two identical tasks run side by side, and both
pay. The generation task runs SERIALIZABLE instead: the second waits for the
first's result. Its locks are the operating system's own (`flock` on a file per
key), not files whose presence is the lock, as with Prefect's file lock manager:
the OS releases a lock when its process dies, however it dies, so a killed run
leaves nothing to break; taking one is two system calls, where a lock file is
written and read back several times per image.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
from prefect.locking.filesystem import FileSystemLockManager
from prefect.locking.protocol import LockManager

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

POLL_SECONDS = 0.05
"""How often a waiting run checks whether the lock is free."""


@contextmanager
def held(manager: LockManager | None, key: str, timeout: float) -> Iterator[bool]:
    """Hold `key` in `manager` for the block's duration; yields whether it is held (False
    when it was not freed within `timeout` seconds). A lock that only expiry frees (in
    Redis) expires after `timeout` too: its holder is stuck or dead."""
    if manager is None:
        yield True
        return
    holder = uuid.uuid4().hex
    hold = None if isinstance(manager, OSFileLockManager) else timeout  # freed by the OS
    if not manager.acquire_lock(key, holder, acquire_timeout=timeout, hold_timeout=hold):
        yield False
        return
    try:
        yield True
    finally:
        if manager.is_lock_holder(key, holder):
            manager.release_lock(key, holder)


def file_lock_manager(directory: Path) -> LockManager:
    """Locks under `directory` that every process on this machine respects: OS locks
    where there are any (POSIX), Prefect's lock files elsewhere."""
    return OSFileLockManager(directory) if fcntl is not None else FileSystemLockManager(directory)


class OSFileLockManager(LockManager):
    """A Prefect `LockManager` holding an exclusive `flock` on `directory/<key>.lock`.

    Locks exclude each other across processes and across threads of one process
    (each acquisition opens the file anew). A lock lasts as long as its holder holds
    it or its process lives: `hold_timeout` is not supported.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._held: dict[str, tuple[str, int]] = {}  # key -> (holder, open descriptor)

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.lock")

    def _try_acquire(self, key: str, holder: str) -> bool:
        path = self._path(key)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                self.directory.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # The holder before us unlinks the file before it lets go: if ours is no
            # longer the file at `path`, the lock we hold is on a file nobody else sees.
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                self._held[key] = (holder, fd)
                return True
            os.close(fd)

    def _check_acquire(self, key: str, holder: str, hold_timeout: float | None) -> bool:
        if hold_timeout is not None:
            raise ValueError("OSFileLockManager locks last as long as their process.")
        return self.is_lock_holder(key, holder) or self._try_acquire(key, holder)

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        return _poll(lambda: self._check_acquire(key, holder, hold_timeout), acquire_timeout)

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        check = lambda: self._check_acquire(key, holder, hold_timeout)  # noqa: E731
        return await _apoll(check, acquire_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")
        _, fd = self._held.pop(key)
        try:
            os.unlink(self._path(key))  # before unlocking: see `_try_acquire`
        finally:
            os.close(fd)

    def is_locked(self, key: str) -> bool:
        if key in self._held:
            return True
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also lets go of the shared lock, if taken
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        held = self._held.get(key)
        return held is not None and held[0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return _poll(lambda: not self.is_locked(key), timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await _apoll(lambda: not self.is_locked(key), timeout)


def _poll(condition: Callable[[], bool], timeout: float | None) -> bool:
    """Whether `condition` came true within `timeout` seconds (None: wait for it)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not condition():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


async def _apoll(condition: Callable[[], bool], timeout: float | None) -> bool:
    """`_poll`, sleeping without blocking the event loop."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not condition():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await anyio.sleep(POLL_SECONDS)
    return True
