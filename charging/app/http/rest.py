"""REST v1: charges (fire-and-forget or settled now), their stored outcomes, accounts and
reservations. Every answer is JSON; every refusal a problem (problems.py)."""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse

from charging import codec
from charging.app.accounts import CorruptBalance, UnknownAccount, funds_reading
from charging.app.lots import account_data, holdings_reading
from charging.app.http.access import Caller
from charging.app.http.body import json_object, request_fields
from charging.app.http.endpoints import Endpoint
from charging.app.http.gateway import Gateway, check_account
from charging.app.http.problems import Problem
from charging.keys import all_partitions, keys_of
from charging.plan import Plan
from charging.schema import ACCOUNT_PATTERN, Outcome, account_of

_ACCOUNT = re.compile(ACCOUNT_PATTERN)


async def submit_charge(request: Request, caller: Caller, gateway: Gateway) -> JSONResponse:
    """Append the charge to its request stream; a worker settles it."""
    prepared = gateway.prepare(request_fields(await json_object(request), request))
    check_account(caller, prepared.account)
    [request_id] = await gateway.answer(gateway.producer.submit([prepared]))
    location = f"/v1/charges/{quote(request_id, safe='')}"
    return JSONResponse({"request_id": request_id, "status": "accepted", "outcome": location}, status_code=202,
                        headers={"Location": location})


async def authorize_charge(request: Request, caller: Caller, gateway: Gateway) -> JSONResponse:
    prepared = gateway.prepare(request_fields(await json_object(request), request))
    check_account(caller, prepared.account)
    return _outcome(await gateway.answer(gateway.producer.authorize(prepared)))


async def charge_outcome(request: Request, caller: Caller, gateway: Gateway) -> JSONResponse:
    """The outcome the dedupe record keeps for the request id (for the dedupe window);
    404 until a worker settled it. ?account= looks in its partition only."""
    request_id = request.path_params["request_id"]
    account = request.query_params.get("account")
    if account is not None:
        check_account(caller, account)
    found = await gateway.run(_recorded(gateway, request_id, account))
    found = [r for r in found if caller.may_touch(r.account)]
    if not found:
        raise Problem(404, "unknown_request", f"no outcome for request id {request_id!r} (yet): not settled, "
                                              "never sent, or older than the dedupe window")
    return JSONResponse({k: v for k, v in asdict(found[0]).items() if v is not None})


def _recorded(gateway: Gateway, request_id: str, account: str | None) -> Plan[list[codec.Recorded]]:
    settings = gateway.settings
    places = ([keys_of(account, settings)] if account is not None
              else all_partitions(settings.namespace, settings.partitions))
    return codec.find_records(settings, places, request_id)


async def account_funds(request: Request, caller: Caller, gateway: Gateway) -> JSONResponse:
    account = request.path_params["account"]
    if not _ACCOUNT.fullmatch(account):
        raise Problem(422, "invalid_account", "an account is 1..64 of A-Z a-z 0-9 _ . : -")
    check_account(caller, account)
    try:
        balance, held = await gateway.run(funds_reading(gateway.settings, account))
    except UnknownAccount:
        raise Problem(404, "unknown_account", f"no account {account!r}") from None
    except CorruptBalance as corrupt:
        raise Problem(409, "corrupt_balance", str(corrupt)) from None
    holdings = await gateway.run(holdings_reading(gateway.settings, account))
    return JSONResponse(account_data(account, balance, held, holdings))


async def reserve(request: Request, caller: Caller, gateway: Gateway) -> JSONResponse:
    return await _settle(request, caller, gateway, "reserve", {})


def _on_reservation(op: str):
    async def handler(request: Request, caller: Caller, gateway: Gateway) -> JSONResponse:
        return await _settle(request, caller, gateway, op, {"reservation": request.path_params["reservation"]})
    handler.__name__ = op
    return handler


async def _settle(request: Request, caller: Caller, gateway: Gateway, op: str, fixed: dict[str, Any]) -> JSONResponse:
    data = request_fields(await json_object(request), request, fixed)
    check_account(caller, account_of({**data, "op": op}))
    prepared = gateway.prepare({**data, "op": op})
    check_account(caller, prepared.account)
    return _outcome(await gateway.answer(gateway.producer.authorize(prepared)))


def _outcome(outcome: Outcome) -> JSONResponse:
    return JSONResponse(outcome.as_dict())


_SETTLED = ((200, "Outcome"),)
_REFUSALS = (400, 403, 413, 422)
ENDPOINTS = [
    Endpoint("POST", "/v1/charges", "charge", "Submit a charge (fire and forget); a worker settles it", submit_charge,
             "charges", body="Charge", answers=((202, "Accepted"),), errors=(*_REFUSALS, 503)),
    Endpoint("POST", "/v1/charges/authorize", "authorize", "Settle a charge now", authorize_charge, "charges",
             body="Charge", answers=_SETTLED, errors=_REFUSALS),
    Endpoint("GET", "/v1/charges/{request_id}", "read", "The stored outcome of a request id (404 while unknown)",
             charge_outcome, "charges", answers=((200, "Recorded"),), errors=(403, 404)),
    Endpoint("GET", "/v1/accounts/{account}", "read", "Funds, plan, lots and breakage of an account",
             account_funds, "accounts", answers=((200, "Funds"),), errors=(403, 404, 422)),
    Endpoint("POST", "/v1/reservations", "reserve", "Hold funds for a session", reserve, "reservations",
             body="Reserve", answers=_SETTLED, errors=_REFUSALS),
    Endpoint("POST", "/v1/reservations/{reservation:path}/extend", "reserve", "Hold more for an open reservation",
             _on_reservation("extend"), "reservations", body="Extend", answers=_SETTLED, errors=_REFUSALS),
    Endpoint("POST", "/v1/reservations/{reservation:path}/commit", "reserve", "Charge what was used, release the rest",
             _on_reservation("commit"), "reservations", body="Commit", answers=_SETTLED, errors=_REFUSALS),
    Endpoint("POST", "/v1/reservations/{reservation:path}/release", "reserve", "Release everything, charge nothing",
             _on_reservation("release"), "reservations", body="Release", answers=_SETTLED, errors=_REFUSALS),
]
