"""Waiting for the workers' outcomes and reading their timings from the results streams."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from charging.app.audit import read_outcomes
from charging.settings import Settings
from charging.tools.bench.context import POLL_S, Context
from charging.tools.bench.workers import WorkerProcesses

STALL_TIMEOUT_S = 60  # no new outcome for this long: stop waiting, the checker reports what is missing


def wait_for_outcomes(ctx: Context, settings: Settings, expected: int, workers: WorkerProcesses,
                      advance: Callable[[int], None], busy: Callable[[], bool] = lambda: False) -> int:
    """Poll the results streams until `expected` outcomes are there (or progress stalls while
    nothing else is `busy`). Samples the workers' memory and CPU on the way."""
    seen = 0
    last_progress = time.monotonic()
    while seen < expected:
        workers.sample()
        count = ctx.results_count(settings)
        if count > seen:
            advance(count - seen)
            seen, last_progress = count, time.monotonic()
        elif busy():
            last_progress = time.monotonic()
        elif not workers.running() or time.monotonic() - last_progress > STALL_TIMEOUT_S:
            break
        time.sleep(POLL_S)
    return seen


@dataclass
class Timings:
    submitted_ms: list[int]  # per outcome; 0 when the request carried no submitted_at
    processed_ms: list[int]

    @property
    def first_ms(self) -> int:
        return min(self.processed_ms, default=0)

    def span_s(self, since_ms: int | None = None) -> float:
        """From since_ms (default: the first outcome) to the last outcome, at least 1 ms."""
        if not self.processed_ms:
            return 0.0
        start = self.first_ms if since_ms is None else since_ms
        return max(max(self.processed_ms) - start, 1) / 1000

    def latencies_ms(self) -> list[float]:
        return [float(p - s) for s, p in zip(self.submitted_ms, self.processed_ms) if s]

    def done_at_s(self, since_ms: int) -> list[float]:
        return [(p - since_ms) / 1000 for p in self.processed_ms]


def timings(ctx: Context, settings: Settings) -> Timings:
    submitted, processed = [], []
    for outcome in read_outcomes(ctx.client, settings):
        submitted.append(int(outcome["submitted_at"] or 0))
        processed.append(int(outcome["processed_at"]))
    return Timings(submitted, processed)


def cpu_per_charge(charges: int, **seconds: float) -> dict[str, float]:
    """CPU microseconds per charge of each party: where the machine's cores went."""
    return {name: round(s / charges * 1e6, 1) for name, s in seconds.items()} if charges else {}
