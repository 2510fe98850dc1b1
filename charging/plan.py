"""Logic written once for the sync and the asyncio client: only the I/O differs.

A plan is a generator that yields steps and gets each step's result back. A step is a
call on the client, ``lambda client: client.xlen(key)``, or a Pause. run() drives a plan
with a redis.Redis (or RedisCluster); run_async() with a redis.asyncio client, awaiting
what a step returns when it is awaitable. A step that raises has its error thrown into the
plan at the ``yield``, so the plan's try/except/finally work as in straight code (a
subscriber's ``finally`` acks what its handler finished even on Ctrl-C).

A callback of the caller (a subscriber's handler) is a step too, so an async handler is
awaited by run_async and a plain one is called by run.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Pause:
    """Sleep this long: time.sleep under run(), asyncio.sleep under run_async()."""

    seconds: float


Step = Callable[[Any], Any] | Pause
Plan = Generator[Step, Any, T]


def run(client: Any, plan: Plan[T]) -> T:
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = plan.send(result) if error is None else plan.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        result, error = None, None
        try:
            if isinstance(step, Pause):
                time.sleep(step.seconds)
            else:
                result = step(client)
        except BaseException as exc:  # KeyboardInterrupt too: the plan's finally blocks must run
            error = exc


async def run_async(client: Any, plan: Plan[T]) -> T:
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = plan.send(result) if error is None else plan.throw(error)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        result, error = None, None
        try:
            if isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
            else:
                result = step(client)
                if inspect.isawaitable(result):
                    result = await result
        except BaseException as exc:  # cancellation too: the plan's finally blocks must run
            error = exc


def call(step: Step) -> Plan[Any]:
    """A plan of one step."""
    return (yield step)


def pipelined(queue: Callable[[Any], object]) -> Step:
    """A step that queues commands on a pipeline (queue(pipe)) and executes it: one round
    trip; the result is the list of replies."""
    def step(client: Any) -> Any:
        pipe = client.pipeline(transaction=False)
        queue(pipe)
        return pipe.execute()
    return step
