"""Rating: what a request costs, in minor units."""

from __future__ import annotations

from charging.schema import ChargeRequest, Invalid
from charging.settings import Settings


def price(request: ChargeRequest, settings: Settings) -> int | None:
    """rate x units for a service charge or reserve, or the explicit amount. None when the
    request has no price of its own: a commit or extend in units is rated by lua/ at the
    unit price its reservation was made with, a release moves no money, and a grant is not
    charged. Raises Invalid when the rated amount is over the configured maximum, so it
    never reaches a balance."""
    if request.op == "grant":
        return None
    if request.amount is not None:
        return request.amount
    if request.service is None:
        return None
    amount = settings.tariff[request.service] * request.units
    if amount > settings.max_amount:
        raise Invalid("invalid_amount", f"{request.units} {request.service} units cost {amount}, "
                                        f"over the maximum charge of {settings.max_amount}")
    return amount


def unit_price(request: ChargeRequest, settings: Settings) -> int:
    """The price a reservation keeps for its commits and extends in units: the tariff of its
    service when it is made, or 1 (a unit is a minor unit) for a reservation of an amount."""
    return settings.tariff[request.service] if request.service else 1
