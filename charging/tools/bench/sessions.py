"""sessions: voice calls as a network element runs them (reserve, one to three extends, then
commit what was used, or release), from concurrent synchronous clients. Latency is per
session (3 to 5 calls); the checker also balances held funds and open reservations."""

from __future__ import annotations

import random

from charging import codec
from charging.app.audit import audit
from charging.connection import connect
from charging.settings import Settings
from charging.tools.bench.clients import run_clients
from charging.tools.bench.context import Context
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult
from producer import Producer, run_session

START_BALANCE = 2_000  # about four sessions' worth: later sessions of busy accounts are refused
CALLS_PER_SESSION = 4  # on average; the mode runs a quarter as many sessions as client_charges


class SessionClient:
    def __init__(self, settings_dump: dict):
        settings = Settings(**settings_dump)
        self.producer = Producer(connect(settings, load=False), settings)

    def __call__(self, session: dict) -> list[str]:
        return [o.request_id for o in run_session(self.producer, **session)]


def sessions(accounts: list[str], count: int, rng: random.Random, prefix: str) -> list[dict]:
    return [{"account": rng.choice(accounts), "service": "voice", "units": rng.randint(30, 90),
             "extends": (rng.randint(10, 30),) * rng.randint(1, 3), "used": rng.randint(0, 150), "ttl": 120,
             "session_id": f"{prefix}{i}"} for i in range(count)]


def run(ctx: Context, profile: Profile) -> ModeResult:
    ctx.reset()
    settings = ctx.settings_for("sessions")
    accounts = [f"account{i}" for i in range(1, profile.accounts + 1)]
    balances = {a: START_BALANCE for a in accounts}
    codec.set_balances(ctx.client, settings, balances.items())
    jobs = sessions(accounts, profile.client_charges // CALLS_PER_SESSION, random.Random(6), f"{settings.namespace}-")
    with ctx.task("sessions", len(jobs)) as advance:
        run_ = run_clients(SessionClient, (settings.model_dump(),), jobs, profile.clients, profile.client_processes,
                           None, advance)
    steps = [rid for ids in run_.replies for rid in ids]
    check = audit(ctx.client, settings, balances, steps)
    return ModeResult(
        "sessions", len(run_.replies), run_.seconds, check.as_dict(), check.ok and not run_.errors,
        latencies_ms=run_.latencies_ms, done_at_s=run_.done_at_s,
        extra={"clients": profile.clients, "calls": len(steps), "calls_per_s": round(len(steps) / run_.seconds)
               if run_.seconds else None, "errors": len(run_.errors), "first_errors": run_.errors[:3]},
        notes=[f"{profile.clients} clients, closed loop; a row is a whole session (3-5 synchronous calls); "
               "charges/s here means sessions/s"],
    )
