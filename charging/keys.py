"""Key names and partition routing: the one place that knows how keys are spelled.

Every key carries its partition's hash tag ``{pN}`` so that all keys one Lua call
touches live in one Redis Cluster slot. The layout is documented in lua/charging.lua.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from charging.settings import Settings


def partition_of(account: str, partitions: int) -> int:
    """Stable partition of an account: CRC32 of its id, so every process and every
    language routes it the same way."""
    return zlib.crc32(account.encode()) % partitions


@dataclass(frozen=True)
class Keys:
    namespace: str
    partition: int

    @property
    def tag(self) -> str:
        return f"{self.namespace}:{{p{self.partition}}}"

    @property
    def balances(self) -> str:
        return f"{self.tag}:balances"

    @property
    def requests(self) -> str:
        return f"{self.tag}:requests"

    @property
    def results(self) -> str:
        return f"{self.tag}:results"

    @property
    def held(self) -> str:
        return f"{self.tag}:held"

    @property
    def reservations(self) -> str:
        return f"{self.tag}:reservations"

    @property
    def expiries(self) -> str:
        return f"{self.tag}:expiries"

    @property
    def holds(self) -> str:
        return f"{self.tag}:holds"

    @property
    def wallets(self) -> str:
        """account -> its plan, breakage and credit lots (lua/charging.lua, wallets)."""
        return f"{self.tag}:wallets"

    @property
    def lot_expiries(self) -> str:
        return f"{self.tag}:lot_expiries"

    @property
    def plans(self) -> str:
        return f"{self.tag}:plans"

    @property
    def deadletter(self) -> str:
        return f"{self.tag}:deadletter"

    @property
    def deadletter_reasons(self) -> str:
        return f"{self.tag}:deadletter:reasons"

    def dedupe(self, slice_ms: int | str, slot: int | str) -> str:
        """A dedupe bucket: the records of the requests settled in one slice of time (slot x
        slice_ms is when it starts)."""
        return f"{self.tag}:dedupe:{slice_ms}:{slot}"

    def reply(self, producer_id: str) -> str:
        return f"{self.tag}:reply:{producer_id}"

    def owns_reply_stream(self, key: str) -> bool:
        """A reply stream must sit in this partition's slot and under its reply prefix,
        so an entry cannot make the worker write to an arbitrary key."""
        prefix = f"{self.tag}:reply:"
        return key.startswith(prefix) and bool(_REPLY_ID.fullmatch(key[len(prefix):]))


def keys_of(account: str, settings: Settings) -> Keys:
    """The keys of the partition an account lives in."""
    return Keys(settings.namespace, partition_of(account, settings.partitions))


_REPLY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PARTITION_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def all_partitions(namespace: str, partitions: int) -> list[Keys]:
    return [Keys(namespace, p) for p in range(partitions)]


def parse_partitions(spec: str, partitions: int) -> list[int]:
    """'0-5,8' -> [0, 1, 2, 3, 4, 5, 8]; every number must be a partition that exists."""
    chosen: set[int] = set()
    for part in spec.split(","):
        match = _PARTITION_RANGE.fullmatch(part.strip())
        if not match:
            raise ValueError(f"partitions must look like 0-5,8; got {spec!r}")
        first, last = int(match[1]), int(match[2] or match[1])
        if first > last or last >= partitions:
            raise ValueError(f"partitions {part!r} outside 0-{partitions - 1}")
        chosen.update(range(first, last + 1))
    return sorted(chosen)
