"""The endpoints of the service this engine grew from, answer for answer: charge the
default account 5 and say what is left, and reset the accounts."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from charging import codec
from charging.app.accounts import numbered
from charging.app.http.access import Caller
from charging.app.http.body import json_object, request_fields
from charging.app.http.endpoints import Endpoint
from charging.app.http.gateway import Gateway, check_account
from charging.app.http.problems import Problem

DEFAULT_CHARGE = {"account": "account1", "amount": 5}
RESET_ACCOUNTS = 100
RESET_BALANCE = 100


async def charge_request_redis(request: Request, caller: Caller, gateway: Gateway) -> JSONResponse:
    """An empty body charges account1 5; a body may name the account, service and units
    (or amount) and request_id. Settled now, by the same function as authorize."""
    data = request_fields(await json_object(request), request)
    if not {"account", "service", "units", "amount"} & set(data):
        data = {**DEFAULT_CHARGE, **data}
    prepared = gateway.prepare(data)
    check_account(caller, prepared.account)
    outcome = await gateway.answer(gateway.producer.authorize(prepared))
    return JSONResponse({"remainingBalance": outcome.balance, "charges": outcome.charged,
                         "isAuthorized": outcome.approved})


async def reset_redis(request: Request, caller: Caller, gateway: Gateway) -> JSONResponse:
    """account1..account100 set to 100, created when missing."""
    done = await gateway.run(codec.setting_balances(
        gateway.settings, ((account, RESET_BALANCE) for account in numbered(RESET_ACCOUNTS))))
    return JSONResponse({"accounts": done, "balance": RESET_BALANCE})


async def charge_request_memcached(request: Request, caller: None, gateway: Gateway) -> JSONResponse:
    raise Problem(410, "gone", "the Memcached variant was measured and retired: it checks and deducts, but keeps "
                               "no dedupe record and no outcome. See docs/benchmark.md#results-on-this-machine (memcached).",
                  see="docs/benchmark.md#results-on-this-machine")


ENDPOINTS = [
    Endpoint("POST", "/charge-request-redis", "authorize", "Charge account1 5 (or the body's charge) now",
             charge_request_redis, "original", body="LegacyCharge", answers=((200, "LegacyAnswer"),),
             errors=(400, 403, 413, 422)),
    Endpoint("POST", "/reset-redis", "admin", "Reset account1..account100 to 100", reset_redis, "original",
             answers=((200, "ResetAnswer"),)),
    Endpoint("POST", "/charge-request-memcached", None, "Retired: answers 410 with a pointer",
             charge_request_memcached, "original", answers=(), errors=(410,)),
]
