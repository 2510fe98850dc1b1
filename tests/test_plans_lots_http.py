"""Plans and credit lots over HTTP (docs/http-api.md#plans-and-lots): set and list plans,
put an account on one, grant lots, read them with the account; who may, and every refusal
as a problem."""

from __future__ import annotations

import pytest

from charging.app.http.access import Keyring
from charging.codec import set_balances
from tests.gateway import Gateway, keys_file
from tests.test_http import assert_problem

GOLD = {"sms": 1, "voice": 4, "data": 8}


@pytest.fixture
def gateway(settings, client, tmp_path):
    """A gateway with an admin key and a read-only one; account1 holds 20."""
    path = tmp_path / "keys.toml"
    tokens = keys_file(path, ("ops", ["authorize", "read", "admin"], {}), ("reader", ["read"], {}))
    set_balances(client, settings, [("account1", 20)])
    with Gateway(settings, Keyring.load(path)) as served:
        with served.client(tokens["ops"]) as ops, served.client(tokens["reader"]) as reader:
            yield ops, reader


def test_a_plan_is_set_listed_and_an_account_put_on_it(gateway):
    ops, _ = gateway

    made = ops.put("/v1/plans/gold", json=GOLD)
    changed = ops.put("/v1/plans/gold", json={**GOLD, "sms": 2})
    chosen = ops.put("/v1/accounts/account1/plan", json={"plan": "gold"})

    assert (made.status_code, made.json()) == (201, {"plan": "gold", **GOLD, "created": True})
    assert (changed.status_code, changed.json()["created"]) == (200, False)
    assert ops.get("/v1/plans").json() == {"plans": [{"plan": "gold", **GOLD, "sms": 2, "partial": False}]}
    assert (chosen.status_code, chosen.json()) == (200, {"account": "account1", "plan": "gold"})
    assert ops.get("/v1/accounts/account1").json()["plan"] == "gold"


def test_a_grant_is_idempotent_and_shown_with_the_account(gateway):
    ops, _ = gateway
    body = {"lot": "sms100", "units": 100, "service": "sms", "expires_in": "30d"}

    first = ops.post("/v1/accounts/account1/grants", json=body)
    again = ops.post("/v1/accounts/account1/grants", json=body)
    other = ops.post("/v1/accounts/account1/grants", json={**body, "units": 50})

    assert first.status_code == 201, first.text
    assert first.json() | {"expires_at": 0} == {"account": "account1", "lot": "sms100", "status": "granted",
                                                "kind": "units", "service": "sms", "left": 100, "expires_at": 0}
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    assert again.json()["expires_at"] == first.json()["expires_at"]
    assert_problem(other, 409, "idempotency_conflict")
    account = ops.get("/v1/accounts/account1").json()
    assert account | {"lots": []} == {"account": "account1", "balance": 20, "held": 0, "available": 20,
                                      "plan": "default", "lots": [], "breakage": {}}
    assert [(lot["lot"], lot["left"], lot["expired"]) for lot in account["lots"]] == [("sms100", 100, False)]


def test_the_worked_example_over_http_shows_the_draws(gateway):
    ops, _ = gateway
    ops.put("/v1/plans/gold", json=GOLD)
    ops.put("/v1/accounts/account1/plan", json={"plan": "gold"})
    ops.post("/v1/accounts/account1/grants", json={"lot": "sms100", "units": 100, "service": "sms",
                                                    "expires_in": "30d"})
    ops.post("/v1/accounts/account1/grants", json={"lot": "promo", "amount": 500,
                                                    "expires_at": "2099-01-04T00:00:00Z"})

    sms = ops.post("/v1/charges/authorize", json={"account": "account1", "service": "sms", "units": 100}).json()
    data = ops.post("/v1/charges/authorize", json={"account": "account1", "service": "data", "units": 63}).json()

    assert (sms["charged"], sms["balance"], sms["draws"]) == (0, 520, "sms100:100u")
    assert (data["charged"], data["balance"], data["draws"]) == (504, 16, "promo:500,main:4")


@pytest.mark.parametrize(("body", "reason"), [
    ({"lot": "p1", "amount": 1.5}, "invalid_amount"),
    ({"lot": "p1", "amount": -5}, "invalid_amount"),
    ({"lot": "p1", "amount": 0}, "invalid_amount"),
    ({"lot": "p1", "amount": 10**20}, "invalid_amount"),
    ({"lot": "p1", "amount": True}, "invalid_amount"),
    ({"lot": "p1", "units": 10}, "missing_service"),
    ({"lot": "p1", "units": 10, "service": "fax"}, "unknown_service"),
    ({"lot": "p1"}, "invalid_kind"),
    ({"lot": "main", "amount": 10}, "invalid_lot"),
    ({"amount": 10}, "invalid_lot"),
    ({"lot": "p1", "amount": 10, "expires_at": "2020-01-01T00:00:00Z"}, "invalid_expiry"),
    ({"lot": "p1", "amount": 10, "expires_in": "1d", "expires_at": "2099-01-01T00:00:00Z"}, "invalid_expiry"),
    ({"lot": "p1", "amount": 10, "colour": "red"}, "field_not_allowed"),
])
def test_a_bad_grant_is_a_422_and_grants_nothing(gateway, body, reason):
    ops, _ = gateway
    assert_problem(ops.post("/v1/accounts/account1/grants", json=body), 422, reason)
    assert ops.get("/v1/accounts/account1").json()["lots"] == []


def test_refusals_of_plans_and_accounts(gateway):
    ops, reader = gateway
    assert_problem(ops.put("/v1/plans/gold", json={**GOLD, "sms": 0}), 422, "invalid_price")
    assert_problem(ops.put("/v1/plans/gold", json={"sms": 1, "voice": 4}), 422, "invalid_price")
    assert_problem(ops.put("/v1/plans/default", json=GOLD), 422, "invalid_plan")
    assert_problem(ops.put("/v1/accounts/account1/plan", json={"plan": "platinum"}), 422, "unknown_plan")
    assert_problem(ops.post("/v1/accounts/ghost/grants", json={"lot": "p1", "amount": 10}), 404, "unknown_account")
    assert_problem(ops.put("/v1/accounts/ghost/plan", json={"plan": "default"}), 404, "unknown_account")
    assert_problem(reader.put("/v1/plans/gold", json=GOLD), 403, "scope_missing")
    assert_problem(reader.post("/v1/accounts/account1/grants", json={"lot": "p1", "amount": 10}), 403,
                   "scope_missing")
    assert reader.get("/v1/plans").json() == {"plans": []}
