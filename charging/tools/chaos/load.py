"""Producer processes: a paced load of unique charges, deliberate replays of request ids, and
bad entries written raw. Each keeps its own record of what Redis confirmed (the XADD
returned), which is what the checker holds the engine to; a submit that was not confirmed is
made again with the same request ids until it is."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import redis

from charging import log as logging_setup
from charging.app.accounts import numbered
from charging.connection import connect
from charging.settings import Settings
from charging.tools.chaos import hostile
from charging.tools.chaos.profile import Profile
from charging.tools.demo import mixed_load
from producer import Producer, run_session

CHUNK = 50  # requests per submit: one pipeline, confirmed or not as a whole
GIVE_UP_S = 120.0  # a submit still unconfirmed after this long is recorded as never confirmed
T = TypeVar("T")


@dataclass
class Record:
    """One producer's own account of the run, written to producer-N.json."""

    producer: int
    confirmed: list[str] = field(default_factory=list)  # request ids whose XADD returned an entry id
    replays: int = 0  # confirmed resubmissions of a request id with the same content
    conflicts: list[str] = field(default_factory=list)  # request ids confirmed again with other units
    session_steps: list[str] = field(default_factory=list)  # request ids of finished sessions' steps
    bad: dict[str, str] = field(default_factory=dict)  # entry_key() of a confirmed bad entry -> kind name
    unconfirmed: int = 0  # submits that raised and were made again with the same request ids
    resubmitted: int = 0  # requests in those submits
    never_confirmed: list[str] = field(default_factory=list)  # given up after GIVE_UP_S
    errors: dict[str, int] = field(default_factory=dict)  # error type -> how often a submit raised it

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Record:
        return cls(**json.loads(path.read_text()))


def share(total: int, parts: int, index: int) -> int:
    """index's share of total split into parts as evenly as whole numbers allow."""
    return total // parts + (1 if index < total % parts else 0)


def due(count: int, steps: int, step: int) -> int:
    """How many of count events, spread evenly over steps, fall on this step."""
    return (step + 1) * count // steps - step * count // steps


def run(settings_dump: dict, profile: Profile, seed: int, index: int, path: str) -> None:
    """A producer process (multiprocessing target): its own client, paced to its share of the rate."""
    settings = Settings(**settings_dump)
    logging_setup.configure("warning")
    client = connect(settings, load=False)
    producer = Producer(client, settings, producer_id=f"chaos-p{index}")
    rng = random.Random(f"chaos-load-{seed}-{index}")
    accounts = numbered(profile.accounts)
    load = mixed_load(accounts, share(profile.charges, profile.producers, index), rng, f"c{seed}-p{index}")
    record = Record(index)
    chunks = [load[i:i + CHUNK] for i in range(0, len(load), CHUNK)]
    replays = int(len(load) * profile.replay_share)
    conflicts = int(len(load) * profile.conflict_share)
    bad = share(profile.bad_entries, profile.producers, index)
    sessions = share(profile.sessions, profile.producers, index)
    rate = profile.rate / profile.producers
    started = time.monotonic()
    sent: list[dict] = []  # confirmed requests, the pool replays are drawn from
    written = 0  # bad entries so far
    for step, chunk in enumerate(chunks):
        time.sleep(max(0.0, started + step * CHUNK / rate - time.monotonic()))
        same, other = _resends(rng, sent, due(replays, len(chunks), step), due(conflicts, len(chunks), step))
        batch = chunk + same + other
        if _confirmed(partial(producer.submit, batch), len(batch), record):
            record.confirmed += [r["request_id"] for r in chunk]
            record.replays += len(same)
            record.conflicts += [r["request_id"] for r in other]
            sent += chunk
        else:
            record.never_confirmed += [r["request_id"] for r in chunk]
        for _ in range(due(sessions, len(chunks), step)):
            _run_session(producer, rng, record, rng.choice(accounts), f"s{seed}-p{index}-{step}-{_}")
        for _ in range(due(bad, len(chunks), step)):
            # Kinds in turn across producers: every kind is written once the count reaches the catalogue.
            kind = hostile.KINDS[(written * profile.producers + index) % len(hostile.KINDS)]
            _write_bad(client, settings, record, kind, rng.choice(accounts), f"bad-{seed}-p{index}-{written}")
            written += 1
    record.save(Path(path))


def _resends(rng: random.Random, sent: list[dict], same: int, other: int) -> tuple[list[dict], list[dict]]:
    """Confirmed requests to send again under their request ids: as they were, and with other units."""
    if not sent:
        return [], []
    return ([rng.choice(sent) for _ in range(same)],
            [{**r, "units": r["units"] + 1} for r in (rng.choice(sent) for _ in range(other))])


def _run_session(producer: Producer, rng: random.Random, record: Record, account: str, session_id: str) -> None:
    """A voice call through the synchronous path: reserve, one to three extends, commit what
    was used (or release). Run again whole, under the same session id, until it gets
    through: its finished steps replay without charging again."""
    call = partial(run_session, producer, account, "voice", rng.randint(30, 90),
                   extends=(rng.randint(10, 30),) * rng.randint(1, 3), used=rng.randint(0, 150), ttl=120,
                   session_id=session_id)
    outcomes = _confirmed(call, 1, record)
    if outcomes:
        record.session_steps += [o.request_id for o in outcomes]


def _write_bad(client, settings: Settings, record: Record, kind: hostile.BadKind, account: str,
               request_id: str) -> None:
    key = _confirmed(partial(hostile.write, client, settings, kind, request_id, account), 1, record)
    if key:
        record.bad[key] = kind.name


def _confirmed(call: Callable[[], T], size: int, record: Record) -> T | None:
    """call() until it returns, which is the confirmation. After an error the same call is
    made again (same request ids); a retried XADD whose first reply was lost adds a second
    entry, which the engine answers as a duplicate."""
    give_up = time.monotonic() + GIVE_UP_S
    pause = 0.05
    while True:
        try:
            return call()
        except redis.RedisError as exc:
            name = type(exc).__name__
            record.errors[name] = record.errors.get(name, 0) + 1
            record.unconfirmed += 1
            record.resubmitted += size
            if time.monotonic() > give_up:
                return None
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
