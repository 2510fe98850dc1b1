"""An entry as the worker holds it between reading and settling."""

from __future__ import annotations

from dataclasses import dataclass

from charging.keys import Keys


@dataclass
class Entry:
    keys: Keys  # the partition whose request stream the entry came from
    entry_id: str
    fields: dict[bytes, bytes] | None  # None: the entry was deleted before it was read
    deliveries: int = 1
