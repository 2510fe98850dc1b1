"""authorize: concurrent clients on the synchronous path (Producer.authorize: the same
function the workers call, no stream). Run twice: closed loop (every client sends its next
charge as soon as the last one is answered: the most this path does here), then paced at
at the profile's fixed rate (all clients together), the latency a client sees when the
machine is not saturated."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

from charging import codec
from charging.app.audit import audit
from charging.connection import connect
from charging.settings import Settings
from charging.tools.bench import load as loads
from charging.tools.bench.clients import run_clients
from charging.tools.bench.context import Context
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult
from producer import Producer


class AuthorizeClient:
    def __init__(self, settings_dump: dict):
        settings = Settings(**settings_dump)
        self.producer = Producer(connect(settings, load=False), settings)

    def __call__(self, request: dict) -> str:
        return self.producer.authorize(request).status


def run(ctx: Context, profile: Profile) -> list[ModeResult]:
    return [client_mode(ctx, profile, "authorize", rate, seed, AuthorizeClient, _settings_dump,
                        "clients, {label}; latency measured in the client (includes the Python client)")
            for rate, seed in ((None, 3), (profile.authorize_rate, 4))]


@contextmanager
def _settings_dump(settings: Settings) -> Iterator[tuple]:
    yield (settings.model_dump(),)


def client_mode(ctx: Context, profile: Profile, name: str, rate: int | None, seed: int, client: Callable,
                client_args: Callable[[Settings], AbstractContextManager[tuple]], note: str,
                extra: dict | None = None) -> ModeResult:
    """One run of a client mode: the mixed load sent by profile.clients clients, each a
    client(*args), closed loop (rate None) or paced at rate in total; audited, with what
    each charge cost Redis. client_args gives the clients' arguments for the mode's
    settings, for as long as the run lasts (a gateway to talk to, say)."""
    ctx.reset()
    settings = ctx.settings_for(f"{name.split()[0]}{rate or ''}")
    load = loads.mixed(profile.accounts, profile.client_charges, seed=seed, prefix=f"{settings.namespace}-")
    codec.set_balances(ctx.client, settings, load.balances.items())
    label = "closed loop" if rate is None else f"paced {rate:,.0f}/s"
    with client_args(settings) as args, ctx.task(f"{name}: {label}", len(load)) as advance:
        before = ctx.redis_work()
        run = run_clients(client, args, load.requests, profile.clients, profile.client_processes, rate, advance)
        after = ctx.redis_work()
    check = audit(ctx.client, settings, load.balances, load.expected)
    return ModeResult(
        name if rate is None else f"{name} {rate / 1000:g}k/s", len(run.replies), run.seconds, check.as_dict(),
        check.ok and not run.errors, latencies_ms=run.latencies_ms, done_at_s=run.done_at_s,
        extra={"clients": profile.clients, "client_processes": profile.client_processes,
               "offered_rate_per_s": rate, "errors": len(run.errors), "first_errors": run.errors[:3],
               "per_charge": before.per_charge(after, len(load)), **(extra or {})},
        notes=[f"{profile.clients} " + note.format(label=label)],
    )
