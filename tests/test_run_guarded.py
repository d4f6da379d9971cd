"""A background service of the daemon that fails must not end the daemon (mount.run_guarded):
once running, its failure is reported and the others go on; while starting, it fails the mount."""

from __future__ import annotations

import pytest
import trio

from mifs.mount import run_guarded


async def test_a_service_failing_once_running_is_reported_and_the_others_go_on() -> None:
    failed: list[str] = []
    ticks = 0

    async def broken(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(0.01)
        raise RuntimeError("a bug")

    async def healthy(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal ticks
        task_status.started()
        while True:
            await trio.sleep(0.01)
            ticks += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(run_guarded, "broken", broken, failed.append)
        await nursery.start(run_guarded, "healthy", healthy, failed.append)
        await trio.sleep(0.2)
        assert failed == ["broken"]
        before = ticks
        await trio.sleep(0.05)
        assert ticks > before  # still running after the other one failed
        nursery.cancel_scope.cancel()
    assert failed == ["broken"]  # cancellation (unmount) is not a failure


async def test_a_service_failing_while_starting_fails_the_mount() -> None:
    failed: list[str] = []

    async def unstartable(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise ValueError("cannot start")

    with pytest.raises(BaseException) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_guarded, "unstartable", unstartable, failed.append)
    assert "cannot start" in repr(caught.value)
    assert failed == []
