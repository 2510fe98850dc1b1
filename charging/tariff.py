"""Rating: what a request costs, in minor units."""

from __future__ import annotations

from charging.schema import ChargeRequest, Invalid
from charging.settings import Settings


def price(request: ChargeRequest, settings: Settings) -> int:
    """rate x units for a service charge, or the explicit amount. Raises Invalid when the
    rated amount is over the configured maximum, so it never reaches a balance."""
    if request.amount is not None:
        return request.amount
    amount = settings.tariff[request.service] * request.units
    if amount > settings.max_amount:
        raise Invalid("invalid_amount", f"{request.units} {request.service} units cost {amount}, "
                                        f"over the maximum charge of {settings.max_amount}")
    return amount
