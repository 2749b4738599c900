"""The generation cache's locks: what keeps two runs from paying for one image."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

from prefect_gpt_image._locking import OSFileLockManager

HOLD_IN_ANOTHER_PROCESS = """
import sys, time
from pathlib import Path
from prefect_gpt_image._locking import OSFileLockManager
OSFileLockManager(Path(sys.argv[1])).acquire_lock("key", holder="other run")
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.scenario
def test_a_lock_held_by_another_process_is_freed_when_that_process_is_killed(
    tmp_path: Path,
) -> None:
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD_IN_ANOTHER_PROCESS, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        locks = OSFileLockManager(tmp_path)
        assert locks.is_locked("key")
        assert not locks.acquire_lock("key", holder="this run", acquire_timeout=0.2)
        assert not locks.wait_for_lock("key", timeout=0.2)
    finally:
        os.kill(other.pid, signal.SIGKILL)
        other.wait()

    assert locks.wait_for_lock("key", timeout=5)
    assert locks.acquire_lock("key", holder="this run", acquire_timeout=5)
    assert locks.is_lock_holder("key", "this run")


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    first, second = OSFileLockManager(tmp_path), OSFileLockManager(tmp_path)
    assert first.acquire_lock("key", holder="first")
    order: list[str] = []

    def take_it() -> None:
        second.acquire_lock("key", holder="second")
        order.append("second acquired")

    waiter = threading.Thread(target=take_it)
    waiter.start()
    time.sleep(0.3)
    order.append("first releases")
    first.release_lock("key", holder="first")
    waiter.join(timeout=5)

    assert order == ["first releases", "second acquired"]
    assert second.is_lock_holder("key", "second")
    assert not first.is_lock_holder("key", "first")


def test_holders_and_release(tmp_path: Path) -> None:
    locks = OSFileLockManager(tmp_path / "not yet created")
    assert not locks.is_locked("key")
    assert locks.acquire_lock("key", holder="me")
    assert locks.acquire_lock("key", holder="me", acquire_timeout=0)  # already mine
    assert not locks.is_lock_holder("key", "someone else")
    with pytest.raises(ValueError, match="No lock held by someone else"):
        locks.release_lock("key", holder="someone else")

    locks.release_lock("key", holder="me")

    assert not locks.is_locked("key")
    assert list((tmp_path / "not yet created").iterdir()) == []  # nothing left behind
    with pytest.raises(ValueError, match="last as long as their process"):
        locks.acquire_lock("key", holder="me", hold_timeout=10)


def test_async_acquire_waits_for_the_holder(tmp_path: Path) -> None:
    holder, waiter = OSFileLockManager(tmp_path), OSFileLockManager(tmp_path)
    holder.acquire_lock("key", holder="first")

    async def main() -> tuple[bool, bool, bool]:
        refused = await waiter.aacquire_lock("key", holder="second", acquire_timeout=0.1)
        threading.Timer(0.2, holder.release_lock, ("key", "first")).start()
        freed = await waiter.await_for_lock("key", timeout=5)
        taken = await waiter.aacquire_lock("key", holder="second", acquire_timeout=5)
        return refused, freed, taken

    assert anyio.run(main) == (False, True, True)
