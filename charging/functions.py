"""Python signatures of the functions in lua/charging.lua.

Each helper queues one FCALL on ``target``, a client or a pipeline, so a worker can put a
whole batch in one round trip and authorize can make a single call with the same code.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import redis

from charging.keys import Keys, partition_of
from charging.schema import ChargeRequest, Invalid
from charging.settings import Settings
from charging.tariff import unit_price

DEADLETTER_FIELD_BYTES = 1024  # an oversized field is kept only up to this, so dead letters stay small


def settle(target, settings: Settings, request: ChargeRequest, amount: int | None, entry_id: str = ""):
    """Queue the function of the request's op (charge, reserve, commit, extend, release).
    amount: the rated price (tariff.price), None for a commit or extend in units and a release."""
    keys = Keys(settings.namespace, partition_of(request.account, settings.partitions))
    names = [keys.balances, keys.seen(request.request_id), keys.results, keys.requests,
             keys.held, keys.reservations, keys.expiries]
    if request.reply_to:
        names.append(request.reply_to)
    return target.fcall(request.op, len(names), *names, *_settle_arguments(settings, request, amount, entry_id))


def settle_batch(target, settings: Settings, keys: Keys,
                 items: Sequence[tuple[ChargeRequest, int | None, str]]):
    """Queue one FCALL that settles (request, amount, entry_id) items of one partition, in
    order, each exactly as settle() would (the function gets the same keys and arguments
    per entry); its reply holds one settle() reply, or an error, per item."""
    names = [keys.balances, keys.results, keys.requests, keys.held, keys.reservations, keys.expiries]
    args: list = []
    for request, amount, entry_id in items:
        names.append(keys.seen(request.request_id))
        if request.reply_to:
            names.append(request.reply_to)
        args += (request.op, 1 if request.reply_to else 0, *_settle_arguments(settings, request, amount, entry_id))
    return target.fcall("settle_batch", len(names), *names, *args)


def _settle_arguments(settings: Settings, request: ChargeRequest, amount: int | None, entry_id: str) -> list:
    """The 13 arguments of a settling function (lua/charging.lua, settle)."""
    reserve = request.op == "reserve"
    ttl_s = request.ttl or (settings.reservation_ttl_s if reserve else None)
    return [
        request.request_id, request.account, request.fingerprint, entry_id, settings.group,
        settings.dedupe_window_ms, request.submitted_at or "", settings.reply_ttl_s * 1000,
        "" if amount is None else amount,
        request.units if amount is None and request.units is not None else "",
        unit_price(request, settings) if reserve else "",
        request.reservation_id or "",
        "" if ttl_s is None else ttl_s * 1000,
    ]


def dead_letter(target, settings: Settings, keys: Keys, entry_id: str, invalid: Invalid,
                fields: Mapping[bytes, bytes] | None, ack: bool = True):
    """ack=False records an entry that is no longer pending (XAUTOCLAIM found it deleted)."""
    pairs = [part[:DEADLETTER_FIELD_BYTES] for item in (fields or {}).items() for part in item]
    return target.fcall(
        "dead_letter", 3, keys.deadletter, keys.requests, keys.deadletter_reasons,
        entry_id, settings.group if ack else "", invalid.reason, invalid.detail, settings.deadletter_maxlen, *pairs,
    )


def top_up(client: redis.Redis, settings: Settings, account: str, amount: int) -> int:
    keys = Keys(settings.namespace, partition_of(account, settings.partitions))
    return client.fcall("top_up", 1, keys.balances, account, amount, settings.max_balance)


def set_balances(client: redis.Redis, settings: Settings, balances: Iterable[tuple[str, int]]) -> int:
    by_partition: dict[int, list] = defaultdict(list)
    for account, balance in balances:
        by_partition[partition_of(account, settings.partitions)].extend((account, balance))
    pipe = client.pipeline(transaction=False)
    for partition, pairs in by_partition.items():
        for start in range(0, len(pairs), 2000):  # bounded argument lists
            pipe.fcall("set_balances", 1, Keys(settings.namespace, partition).balances, *pairs[start:start + 2000])
    return sum(pipe.execute())


def expire_reservations(target, settings: Settings, keys: Keys) -> int:
    """Release up to sweep_batch reservations of the partition whose expiry has passed."""
    return target.fcall("expire_reservations", 3, keys.held, keys.reservations, keys.expiries,
                        settings.sweep_batch)


def trim_requests(target, keys: Keys):
    """Drop request entries every group has acked."""
    return target.fcall("trim", 1, keys.requests, 0)


def trim_results(target, settings: Settings, keys: Keys):
    """Keep about results_maxlen outcomes, never dropping one a group named in
    results_groups has not read and acked."""
    return target.fcall("trim", 1, keys.results, settings.results_maxlen, *settings.results_group_names)
