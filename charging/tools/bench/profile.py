"""Bench profiles: how much load each mode gets. `standard` is the issue's full run,
`quick` finishes in a few minutes on a 2-core machine, `tiny` is for the test suite."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    accounts: int  # accounts the drain, steady and authorize loads spread over
    drain_charges: int  # preloaded before the workers start
    workers: int  # worker processes (`charging worker --processes`)
    steady_rates: tuple[int, ...]  # offered charges/s, one steady run each: the target, then a lighter load
    steady_seconds: float
    producers: int  # producer processes in steady mode
    clients: int  # concurrent clients in authorize, naive and memcached modes
    client_processes: int  # the clients are threads spread over this many processes
    client_charges: int  # charges per client mode
    authorize_rate: int  # offered charges/s of the paced authorize run (all clients together)
    hot_accounts: int  # naive and memcached contend on few accounts, so races can show
    ceiling_requests: int  # FCALLs redis-benchmark sends
    memory_charges: int  # charges settled to measure bytes per charge
    http_rate: int = 1_000  # offered charges/s of the paced http run (all clients together)

    def as_dict(self) -> dict:
        return asdict(self)


PROFILES = {
    "standard": Profile("standard", accounts=10_000, drain_charges=200_000, workers=2, steady_rates=(60_000, 10_000),
                        steady_seconds=10, producers=2, clients=50, client_processes=2, client_charges=40_000,
                        authorize_rate=2_000, hot_accounts=50, ceiling_requests=1_000_000, memory_charges=50_000),
    "quick": Profile("quick", accounts=10_000, drain_charges=150_000, workers=2, steady_rates=(60_000, 10_000),
                     steady_seconds=4, producers=2, clients=50, client_processes=2, client_charges=10_000,
                     authorize_rate=2_000, hot_accounts=50, ceiling_requests=300_000, memory_charges=20_000),
    "tiny": Profile("tiny", accounts=50, drain_charges=300, workers=2, steady_rates=(300,), steady_seconds=1,
                    producers=1, clients=8, client_processes=2, client_charges=300, authorize_rate=500,
                    hot_accounts=5, ceiling_requests=2_000, memory_charges=300, http_rate=250),
}
