"""Locks that keep two runs from paying for the same image at the same moment.

Prefect's default isolation lets two identical tasks run side by side, and both
pay. The generation task runs SERIALIZABLE instead: the second waits for the
first's result. Prefect's file lock manager never expires a lock taken without a
hold timeout, so a run killed mid-generation would block that request for good;
this one also records the holding process, and breaks a lock whose process on
this machine is gone. It also reads a lock file that another process has created
but not yet written (Prefect's manager creates, then writes) as held, instead of
failing on it.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pydantic_core
from prefect.locking.filesystem import FileSystemLockManager

HOSTNAME = socket.gethostname()


class ProcessFileLockManager(FileSystemLockManager):
    """A `FileSystemLockManager` that breaks locks left by dead processes."""

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            path = self._lock_path_for_key(key)
            info = pydantic_core.from_json(path.read_bytes())
            info.update(pid=os.getpid(), host=HOSTNAME)
            written = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            written.write_bytes(pydantic_core.to_json(info))
            os.replace(written, path)
        return acquired

    def _get_lock_info(self, key: str, use_cache: bool = True) -> Any:
        try:
            return super()._get_lock_info(key, use_cache)
        except ValueError:  # created by another process, not yet written: held by it
            return {"holder": "", "expiration": None, "path": self._lock_path_for_key(key)}

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        path = self._lock_path_for_key(key)
        try:
            info = pydantic_core.from_json(path.read_bytes())
        except (FileNotFoundError, ValueError):
            info = {}  # absent, or being written: the parent class decides
        if info.get("host") == HOSTNAME and not _alive(info.get("pid")):
            path.unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache=use_cache)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
