"""How big a chaos run is: the load, the fleet and how many faults of each kind."""

from __future__ import annotations

from dataclasses import asdict, dataclass

AVERAGE_CHARGE = 187  # minor units, of charging.demo.mixed_load at the default tariff


@dataclass(frozen=True)
class Profile:
    name: str
    charges: int  # unique request ids
    producers: int
    workers: int
    rate: int  # charges per second over all producers, so the faults land while the load runs
    accounts: int
    worker_kills: int
    worker_stalls: int
    redis_kills: int
    bad_entries: int
    replay_share: float = 0.01  # confirmed requests resubmitted with the same content
    conflict_share: float = 0.002  # confirmed requests resubmitted with other units
    sessions: int = 0  # voice sessions (reserve -> extends -> commit or release) beside the charges

    @property
    def duration_s(self) -> float:
        return self.charges / self.rate

    @property
    def balance(self) -> int:
        """Start balance: about 90% of what the load would spend per account, so the later
        charges of busy accounts meet insufficient funds and money runs out for real."""
        return int(0.9 * AVERAGE_CHARGE * self.charges / self.accounts)

    def as_dict(self) -> dict:
        return {**asdict(self), "duration_s": self.duration_s, "balance": self.balance}


FULL = Profile("full", charges=100_000, producers=3, workers=4, rate=1_500, accounts=2_000,
               worker_kills=12, worker_stalls=4, redis_kills=3, bad_entries=330, sessions=300)
QUICK = Profile("quick", charges=10_000, producers=2, workers=3, rate=300, accounts=200,
                worker_kills=3, worker_stalls=2, redis_kills=2, bad_entries=66, sessions=40)
