"""memcached: the same contended charges as the naive mode, on a memcached the bench
spawns, with the usual optimistic loop: gets the balance and its CAS token, then cas the
new balance; if another client changed it in between, read again (a retry). Balance
check and deduct only: memcached has no streams, so there is no dedupe and no outcome
record, which is the "basic case" the seed compared."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections import defaultdict

from pymemcache.client.base import Client

from charging.tools.bench import load as loads
from charging.tools.bench.clients import run_clients
from charging.tools.bench.context import Context
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult
from charging.tools.redis_server import free_port

INSTALL_HINT = ("memcached is not on PATH (Debian/Ubuntu: `sudo apt-get install memcached`; "
                "macOS: `brew install memcached`)")
READY_TIMEOUT_S = 10


class MemcachedServer:
    def __init__(self):
        self.binary = shutil.which("memcached")
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> MemcachedServer:
        # -U 0: no UDP. Default worker threads (4), as a stock install runs. memcached refuses
        # to run as root unless told which user to be.
        user = ["-u", "root"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen([self.binary, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "256",
                                         *user], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"memcached did not start on port {self.port}") from None
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class CasClient:
    def __init__(self, port: int, prefix: str):
        self.client = Client(("127.0.0.1", port), default_noreply=False, connect_timeout=5, timeout=10)
        self.prefix = prefix

    def __call__(self, job: tuple[str, int]) -> tuple[str, int, bool, int]:
        """(account, amount, approved, retries)."""
        account, amount = job
        key = self.prefix + account
        retries = 0
        while True:
            value, token = self.client.gets(key)
            balance = int(value)
            if balance < amount:
                return account, amount, False, retries
            if self.client.cas(key, str(balance - amount), token):
                return account, amount, True, retries
            retries += 1


def run(ctx: Context, profile: Profile) -> ModeResult | None:
    """None when memcached is not installed (the report says so)."""
    if shutil.which("memcached") is None:
        return None
    settings = ctx.settings_for("memcached")  # only for the same charges' request ids and tariff
    load = loads.contended(profile.hot_accounts, profile.client_charges, seed=5, prefix=f"{settings.namespace}-")
    prefix = f"{settings.namespace}:"
    with MemcachedServer() as server:
        setup = Client(("127.0.0.1", server.port))
        setup.set_many({prefix + a: str(b) for a, b in load.balances.items()})
        with ctx.task("memcached: gets/cas", len(load)) as advance:
            run = run_clients(CasClient, (server.port, prefix), loads.priced(load, settings), profile.clients,
                              profile.client_processes, None, advance)
        held = setup.get_many([prefix + a for a in load.balances])
        end = {a: int(held[prefix + a]) for a in load.balances}
    check = check_memcached(load.balances, end, run.replies, expected=len(load))
    return ModeResult(
        "memcached", len(run.replies), run.seconds, check, check["ok"] and not run.errors,
        latencies_ms=run.latencies_ms, done_at_s=run.done_at_s,
        extra={"clients": profile.clients, "hot_accounts": profile.hot_accounts, "cas_retries": check["cas_retries"],
               "errors": len(run.errors), "first_errors": run.errors[:3]},
        notes=[f"{profile.clients} clients, closed loop, the naive mode's charges; no dedupe, no outcome record"],
    )


def check_memcached(start: dict[str, int], end: dict[str, int], replies: list, expected: int) -> dict:
    approved_sum: dict[str, int] = defaultdict(int)
    approved = retries = 0
    for account, amount, ok, tries in replies:
        retries += tries
        if ok:
            approved += 1
            approved_sum[account] += amount
    negative = [a for a, b in end.items() if b < 0]
    mismatches = [a for a in start if start[a] - end[a] != approved_sum.get(a, 0)]
    return {
        "ok": not (mismatches or negative) and len(replies) == expected,
        "outcomes": len(replies), "missing": expected - len(replies), "approved": approved,
        "rejected": {"insufficient_funds": len(replies) - approved}, "cas_retries": retries,
        "money_mismatches": len(mismatches), "negative_balances": len(negative),
    }
