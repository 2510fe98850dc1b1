"""An entry as the worker holds it between reading and settling."""

from __future__ import annotations

from dataclasses import dataclass

from charging.keys import Keys
from charging.schema import EntryFields


@dataclass
class Entry:
    keys: Keys  # the partition whose request stream the entry came from
    entry_id: str
    fields: EntryFields | None  # every pair as Redis holds it; None: deleted before it was read
    deliveries: int = 1
