"""`charging demo`: the whole pipeline in one command, with the money check at the end."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import redis
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from charging import codec
from charging.app import accounts as accounts_mod
from charging.app.cli import make_console
from charging.connection import connect
from charging.keys import all_partitions
from charging.schema import Outcome
from charging.settings import Settings
from charging.tools.redis_server import RedisServer

console = make_console(markup=True)
CHUNK = 1000
SETTLE_TIMEOUT_S = 300


def mixed_load(accounts: list[str], count: int, rng: random.Random, prefix: str) -> list[dict]:
    """sms (1-5 messages), voice (1-120 s) and data (1-50 MB) charges over random accounts."""
    units = {"sms": (1, 5), "voice": (1, 120), "data": (1, 50)}
    load = []
    for i in range(count):
        service = rng.choice(("sms", "voice", "data"))
        load.append({"request_id": f"{prefix}-{i}", "account": rng.choice(accounts), "service": service,
                     "units": rng.randint(*units[service])})
    return load


STOPS = {signal.SIGINT, signal.SIGTERM}
STOP_GRACE_S = 1.0  # after a Ctrl-C, how long the workers may take to finish their batch


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM. Not an Exception: no `except Exception` on the way may take it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, _frame) -> None:
    _ignore_stops()  # at once: a second Ctrl-C must not cut the clean-up short
    raise Interrupted(signum)


def _ignore_stops() -> None:
    for sig in STOPS:
        signal.signal(sig, signal.SIG_IGN)


class _Parts:
    """What the demo started, to stop in order: the workers, then the server they use.
    Both run in process groups of their own: a Ctrl-C at the terminal reaches only the
    demo, which stops them itself (a server stopped first left the workers retrying)."""

    def __init__(self) -> None:
        self.server: RedisServer | None = None
        self.workers: subprocess.Popen | None = None

    def stop(self, interrupted: bool) -> None:
        """Quietly after a Ctrl-C, which the demo answers with one line of its own."""
        say = (lambda _: None) if interrupted else console.print
        if self.workers is not None:
            code = _stop(self.workers, STOP_GRACE_S if interrupted else 30)
            say("workers stopped" if code == 0 else f"workers stopped with exit code {code} (see worker.log)")
        if self.server is not None:
            self.server.stop()
            say("private redis-server stopped")


def run_demo(state, charges: int, workers: int, accounts: int, balance: int, data_dir: Path | None = None,
             keep: bool = False) -> int:
    """Raises RedisServerMissing when a private server is needed and there is none. The
    demo's own directory (the private server's AOF and log, the workers' log) is removed
    however the demo ends, unless keep; a data_dir given by the user always stays. Ctrl-C
    or SIGTERM: everything it started is stopped, it says `demo stopped`, 128 + signal."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOPS}  # before there is anything to clean up
    own_dir = data_dir is None
    parts, interrupted = _Parts(), False
    work_dir = Path(tempfile.mkdtemp(prefix="charging-demo-")) if own_dir else data_dir
    try:
        return _run(state, parts, work_dir, charges, workers, accounts, balance)
    except Interrupted as stop:
        interrupted = True
        return 128 + stop.signum
    finally:
        _ignore_stops()  # the clean-up is bounded (the workers' grace), and must not be cut short
        parts.stop(interrupted)
        if keep or not own_dir:
            console.print(f"kept {work_dir} (the server's AOF and redis.log, the workers' worker.log)", markup=False)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
        if interrupted:
            console.print("demo stopped")
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(state, parts: _Parts, work_dir: Path, charges: int, workers: int, accounts: int, balance: int) -> int:
    settings = state.settings
    if state.redis_url is None:
        parts.server = RedisServer(work_dir, own_session=True)
        parts.server.start()
        settings = settings.model_copy(update={"redis_url": parts.server.url})
        console.print(f"private redis-server on port {parts.server.port}, AOF in {work_dir}", markup=False)
    client = connect(settings)
    names = accounts_mod.numbered(accounts)
    codec.set_balances(client, settings, ((a, balance) for a in names))
    console.print(f"{accounts} accounts reset to {balance}")
    with _signals_held():  # a stop now must find the workers it has to stop
        parts.workers = _start_workers(settings, workers, work_dir)
    return _run_load(client, settings, names, charges, accounts * balance)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done: a stop that landed while the workers
    were being started, before run_demo knew them, would leave them running."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_workers(settings: Settings, workers: int, log_dir: Path) -> subprocess.Popen:
    env = {**os.environ, **settings.environment()}
    with open(log_dir / "worker.log", "ab") as log_file:
        # The workers must hear the stop signals this process holds back while it starts them.
        return subprocess.Popen([sys.executable, "-m", "charging", "worker", "--processes", str(workers)],
                                env=env, stdout=log_file, stderr=log_file, start_new_session=True,
                                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS))


def _stop(worker_proc: subprocess.Popen, grace_s: float) -> int:
    """SIGTERM to the workers' process group, the supervisor and its consumers alike: they
    finish the batch in hand; SIGKILL if that takes more than grace_s. 0 for a worker that
    was still starting and died of the SIGTERM itself: it held nothing, a clean stop."""
    with suppress(ProcessLookupError):  # every one of them gone already
        os.killpg(worker_proc.pid, signal.SIGTERM)
    try:
        code = worker_proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(worker_proc.pid, signal.SIGKILL)  # the supervisor is still there: so is its group
        code = worker_proc.wait()
    return 0 if code == -signal.SIGTERM else code


def _run_load(client: redis.Redis, settings: Settings, names: list[str], charges: int, start_total: int) -> int:
    from producer import Producer

    rng = random.Random(7)
    load = mixed_load(names, charges, rng, f"demo-{uuid.uuid4().hex[:8]}")
    replays = rng.sample(load, k=max(1, charges // 100))  # resubmitted with the same request id
    marks = {k.results: _last_id(client, k.results) for k in all_partitions(settings.namespace, settings.partitions)}
    producer = Producer(client, settings)
    started = time.time()
    with _progress() as progress:
        task = progress.add_task("publishing", total=len(load) + len(replays))
        for chunk in _chunks(load + replays):
            producer.submit(chunk)
            progress.advance(task, len(chunk))
        outcomes = _collect(client, marks, {r["request_id"] for r in load}, len(load) + len(replays), progress)
    elapsed = max(o.processed_at for o in outcomes) / 1000 - started if outcomes else 0.0
    ours = set(names)
    end_total = sum(b for a, b in accounts_mod.all_balances(client, settings) if a in ours)
    return _summary(outcomes, len(load) + len(replays), elapsed, start_total, end_total)


def _collect(client, marks: dict[str, str], ours: set[str], expected: int, progress) -> list[Outcome]:
    task = progress.add_task("settling", total=expected)
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while len(outcomes) < expected and time.monotonic() < deadline:
        for stream, messages in client.xread(marks, count=5000, block=1000) or []:
            marks[stream.decode()] = messages[-1][0].decode()
            new = [o for o in (Outcome.from_fields(f) for _, f in messages) if o.request_id in ours]
            outcomes.extend(new)
            progress.advance(task, len(new))
    return outcomes


def _summary(outcomes: list[Outcome], expected: int, elapsed: float, start_total: int, end_total: int) -> int:
    first = [o for o in outcomes if not o.duplicate]
    approved = [o for o in first if o.approved]
    reasons = Counter(o.reason for o in first if not o.approved)
    charged = sum(o.charged for o in approved)
    latencies = sorted(o.processed_at - o.submitted_at for o in outcomes if o.submitted_at)
    money_ok = charged == start_total - end_total and len(outcomes) == expected
    table = Table("", "", title="charging demo", show_header=False)
    table.add_row("outcomes", f"{len(outcomes)} of {expected}")
    table.add_row("approved", str(len(approved)))
    for reason, n in sorted(reasons.items()):
        table.add_row(f"rejected: {reason}", str(n))
    table.add_row("replayed request ids (answered as duplicates, charged once)",
                  str(sum(o.duplicate for o in outcomes)))
    table.add_row("throughput", f"{len(outcomes) / elapsed:,.0f} charges/s" if elapsed > 0 else "-")
    if latencies:
        table.add_row("submit -> settled p50 / p99",
                      f"{latencies[len(latencies) // 2]} ms / {latencies[int(len(latencies) * 0.99)]} ms")
    table.add_row("sum(approved charges)", str(charged))
    table.add_row("balance drop (start - end)", f"{start_total - end_total} ({start_total} - {end_total})")
    table.add_row("check sum(approved) == balance drop", "[green]OK[/]" if money_ok else "[red]FAILED[/]")
    console.print(table)
    return 0 if money_ok else 1


def _last_id(client: redis.Redis, stream: str) -> str:
    last = client.xrevrange(stream, count=1)
    return last[0][0].decode() if last else "0-0"


def _chunks(items: list, size: int = CHUNK):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)
