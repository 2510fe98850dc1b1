"""REST v1 for plans and credit lots (docs/plans-and-lots.md): set and list plans, put an
account on one, grant it a lot. The library's refusals as problems: what the input got
wrong 422, an unknown account 404, a state that refuses it (a lot id granted with other
content, an account full of lots) 409."""

from __future__ import annotations

from typing import Any

import redis
from starlette.requests import Request
from starlette.responses import JSONResponse

from charging import codec
from charging.app import lots, plans
from charging.app.http.access import Caller
from charging.app.http.body import json_object
from charging.app.http.endpoints import Endpoint
from charging.app.http.gateway import Gateway, check_account
from charging.app.http.problems import Problem
from charging.plan import Plan
from charging.schema import Invalid
from charging.settings import SERVICES

GRANT_FIELDS = ("lot", "amount", "units", "service", "expires_in", "expires_at")


async def grant(request: Request, caller: Caller, gateway: Gateway) -> JSONResponse:
    account = request.path_params["account"]
    check_account(caller, account)
    fields = _only(await json_object(request), GRANT_FIELDS)
    parsed = _checked(lambda: lots.parse_grant({**fields, "account": account}, gateway.settings,
                                               lots.wall_clock_ms()))
    granted = await _refusals(gateway, lots.granting(gateway.settings, parsed), account)
    return JSONResponse(lots.granted_data(parsed, granted), status_code=201 if granted.status == "granted" else 200)


async def set_plan(request: Request, caller: Caller, gateway: Gateway) -> JSONResponse:
    name = request.path_params["name"]
    given = _only(await json_object(request), SERVICES)
    prices = _checked(lambda: plans.parse_prices(given))
    created = await _refusals(gateway, plans.setting_plan(gateway.settings, name, prices), None)
    return JSONResponse({"plan": name, **prices, "created": created}, status_code=201 if created else 200)


async def list_plans(request: Request, caller: Caller, gateway: Gateway) -> JSONResponse:
    listed = await gateway.run(plans.listing_plans(gateway.settings))
    return JSONResponse({"plans": [plans.listed_data(plan) for plan in listed]})


async def assign_plan(request: Request, caller: Caller, gateway: Gateway) -> JSONResponse:
    account = request.path_params["account"]
    check_account(caller, account)
    name = _only(await json_object(request), ("plan",)).get("plan")
    if not isinstance(name, str):
        raise Problem(422, "invalid_plan", "the body is {\"plan\": NAME}")
    now = await _refusals(gateway, codec.assigning_plan(gateway.settings, account, name), account)
    return JSONResponse({"account": account, "plan": now})


def _only(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    if unknown := sorted(set(data) - set(names)):
        raise Problem(422, "field_not_allowed", f"unknown field(s) {unknown}; known: {', '.join(names)}")
    return data


def _checked(parse):
    try:
        return parse()
    except Invalid as exc:
        raise Problem(422, exc.reason, exc.detail) from None


async def _refusals(gateway: Gateway, plan: Plan[Any], account: str | None) -> Any:
    try:
        return await gateway.run(plan)
    except redis.ResponseError as exc:
        reason = lots.reason_of(exc)
        if reason == "unknown_account":
            raise Problem(404, reason, f"no account {account!r}") from None
        raise Problem(422 if lots.is_bad_input(reason) else 409, reason, str(exc)) from None


_ADMIN_ERRORS = (403, 404, 409, 413, 422)
ENDPOINTS = [
    Endpoint("POST", "/v1/accounts/{account}/grants", "admin", "Grant an account a credit lot (idempotent by lot id)",
             grant, "plans and lots", body="Grant", answers=((201, "Granted"), (200, "Granted")),
             errors=(400, *_ADMIN_ERRORS)),
    Endpoint("PUT", "/v1/accounts/{account}/plan", "admin", "Put an account on a plan (default: none)", assign_plan,
             "plans and lots", body="PlanChoice", answers=((200, "AccountPlan"),), errors=(400, *_ADMIN_ERRORS)),
    Endpoint("PUT", "/v1/plans/{name}", "admin", "Set a plan's prices on every partition", set_plan,
             "plans and lots", body="Prices", answers=((201, "PlanSet"), (200, "PlanSet")),
             errors=(400, 403, 413, 422)),
    Endpoint("GET", "/v1/plans", "read", "Every plan; partial: its partitions disagree (set it again)", list_plans,
             "plans and lots", answers=((200, "Plans"),), errors=(403,)),
]
