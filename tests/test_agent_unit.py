"""Pure unit tests of the agent's own logic (no etcd, no kernel, no ExaBGP): the tasks it
starts in the background."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from fabric.agent.agent import Agent
from fabric.agent.config import parse_config
from ipam import keys


def config(tmp_path: Path) -> str:
    return (
        "nodeName: n1\naddresses: {ipv4: 10.80.0.2/24}\n"
        "etcd: {endpoints: ['http://127.0.0.1:1'], timeout: 1.0}\n"
        f"runDir: {tmp_path}/run\n"
        f"cni: {{socket: {tmp_path}/run/cni.sock, stateDir: {tmp_path}/state}}\n"
        "health: {listen: '127.0.0.1:0'}\n"
    )


def held_by(agent: Agent, task: asyncio.Task[Any]) -> bool:
    """The agent holds ``task`` strongly (the loop holds tasks only through a WeakSet)."""
    return any(
        v is task or (isinstance(v, set | list | tuple) and task in v) for v in vars(agent).values()
    )


def test_re_registration_task_is_held_until_it_ends(tmp_path: Path) -> None:
    """Issue 16: the re-registration started when this node's Node key vanished was a bare
    create_task, which asyncio may collect while it runs."""

    async def go() -> None:
        agent = Agent(parse_config(config(tmp_path)))
        try:
            before = asyncio.all_tasks()
            agent._changed(keys.NODES)  # the cache does not have this node: re-register
            (task,) = asyncio.all_tasks() - before
            assert held_by(agent, task), "a background task nobody holds"
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0)
            assert not held_by(agent, task), "a finished task is still held"
        finally:
            await agent.store.close()

    asyncio.run(go())
