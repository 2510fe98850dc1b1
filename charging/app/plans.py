"""Plans, the price lists accounts pay (docs/plans-and-lots.md). Every partition keeps its
own copy of every plan, because a function may touch only its own partition's keys: a plan
is set on every partition, one call each in partition order, and listed from all of them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

from charging import codec
from charging.app.lots import whole
from charging.keys import all_partitions
from charging.plan import Plan, pipelined
from charging.schema import Invalid
from charging.settings import LIBRARY_MAX_BALANCE, SERVICES, Settings
from charging.streams import text

@dataclass(frozen=True)
class Listed:
    """A plan as the partitions hold it. partial: its copies differ (a change stopped half
    way, or a partition lacks it); prices are then those of the first partition holding it."""

    name: str
    prices: dict[str, int]
    partial: bool


def setting_plan(settings: Settings, name: str, prices: Mapping[str, int]) -> Plan[bool]:
    """Write the plan on every partition, in partition order; whether it is new to any.
    A refusal (invalid_plan, invalid_price) stops at the first partition, which writes
    nothing."""
    created = []
    for keys in all_partitions(settings.namespace, settings.partitions):
        created.append(int((yield partial(codec.set_plan, keys=keys, name=name, prices=prices))))
    return any(created)


def listing_plans(settings: Settings) -> Plan[list[Listed]]:
    """Every plan of every partition, by name."""
    places = all_partitions(settings.namespace, settings.partitions)
    stored = yield pipelined(lambda pipe: [pipe.hgetall(keys.plans) for keys in places])
    copies: dict[str, list[dict[str, int]]] = {}
    for plans in stored:
        for name, packed in plans.items():
            copies.setdefault(text(name), []).append(codec.plan_prices(packed))
    return [Listed(name, found[0], len(found) < len(places) or any(p != found[0] for p in found))
            for name, found in sorted(copies.items())]


def parse_prices(given: Mapping[str, object]) -> dict[str, int]:
    """A price for each service, a whole number of minor units, 1..LIBRARY_MAX_BALANCE.
    Raises Invalid (invalid_price) naming the service."""
    prices = {}
    for service in SERVICES:
        value = given.get(service)
        number = whole(value)
        if number is None or not 1 <= number <= LIBRARY_MAX_BALANCE:
            raise Invalid("invalid_price", f"{service}: a price is a whole number of minor units between 1 and "
                                          f"{LIBRARY_MAX_BALANCE}, got {value!r}")
        prices[service] = number
    return prices


def listed_data(plan: Listed) -> dict[str, object]:
    return {"plan": plan.name, **plan.prices, "partial": plan.partial}
