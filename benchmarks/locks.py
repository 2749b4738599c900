"""CPU per lock of the generation cache: this package's OS file locks beside Prefect's lock
files, each through the calls a SERIALIZABLE task run makes (acquire, the two checks before
its result is written, release).

    python3 -m uv run python benchmarks/locks.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager
from prefect.locking.protocol import LockManager

from prefect_gpt_image._locking import OSFileLockManager

LOCKS = 2000
ROUNDS = 5


def microseconds_per_lock(manager: LockManager) -> float:
    started = time.process_time()
    for n in range(LOCKS):
        key = f"gpt-image-{n:064x}"
        manager.acquire_lock(key, holder="run")
        manager.is_locked(key)
        manager.is_lock_holder(key, "run")
        manager.release_lock(key, holder="run")
    return 1e6 * (time.process_time() - started) / LOCKS


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        managers: dict[str, Callable[[Path], LockManager]] = {
            "OSFileLockManager (flock)": OSFileLockManager,
            "Prefect FileSystemLockManager": FileSystemLockManager,
        }
        figures: dict[str, list[float]] = {name: [] for name in managers}
        for n in range(ROUNDS):
            for name, manager in managers.items():
                directory = Path(folder, f"{n}-{name.split()[0]}")
                figures[name].append(microseconds_per_lock(manager(directory)))
    print(f"| lock manager | CPU µs per lock, median of {ROUNDS} rounds of {LOCKS} |")
    print("|---|---:|")
    for name, values in figures.items():
        print(f"| {name} | {statistics.median(values):.0f} |")


if __name__ == "__main__":
    main()
