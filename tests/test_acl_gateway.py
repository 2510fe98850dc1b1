"""The HTTP gateway under the gateway role of deploy/users.acl, as docker-compose.yml runs
`charging serve`: its endpoints work with exactly that role's rights, and what the role
must not do is refused with NOPERM (docs/security.md). test_acl_needs.py checks that the
role holds nothing its code and its functions do not need."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import redis

from charging import codec
from charging.connection import connect, library_source
from tests.conftest import drain
from tests.gateway import Gateway
from tests.roles import KEYS, ROOT, acl_server, denied, role, root
from tests.test_http import assert_problem

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    with acl_server(tmp_path) as server:
        yield server


@pytest.fixture
def scene(server) -> redis.Redis:
    """The test superuser: loads the library (as the maintainer would) and makes account1 (100)."""
    scene = root(server)
    codec.set_balances(scene, role(server, ROOT), [("account1", 100)])
    return scene


def ready(http: httpx.Client) -> None:
    """Wait for the gateway's start-up check of the server (it runs in the background)."""
    deadline = time.monotonic() + 20
    while (answer := http.get("/readyz")).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ready", "redis": "ok", "library": "loaded"}


def first_events(http: httpx.Client, path: str, kind: str, count: int) -> list[dict]:
    """The data of the first count events of that kind on a Server-Sent Events stream."""
    found = []
    with http.stream("GET", path, timeout=20) as events:
        assert events.status_code == 200, events.read()
        lines = events.iter_lines()
        for line in lines:
            assert line != "event: problem", next(lines)
            if line == f"event: {kind}":
                found.append(json.loads(next(lines).removeprefix("data: ")))
                if len(found) == count:
                    return found
    raise AssertionError(f"the stream ended after {len(found)} {kind} events")


def test_the_gateway_role_serves_charges_outcomes_readiness_and_the_live_feed(server, scene):
    with Gateway(role(server, "gateway")) as gateway, gateway.client() as http:
        ready(http)
        queued = http.post("/v1/charges", headers={"Idempotency-Key": "gw-1"}, json={"account": "account1",
                                                                                     "amount": 7})
        assert queued.status_code == 202, queued.text
        drain(role(server, "worker"))
        stored = http.get("/v1/charges/gw-1")
        assert stored.status_code == 200, stored.text
        assert (stored.json()["status"], stored.json()["charged"], stored.json()["balance"]) == ("approved", 7, 93)
        now = http.post("/v1/charges/authorize", headers={"Idempotency-Key": "gw-2"},
                        json={"account": "account1", "amount": 3}).json()
        assert (now["status"], now["balance"]) == ("approved", 90)
        held = http.post("/v1/reservations", json={"account": "account1", "amount": 10, "request_id": "gw-r"})
        assert held.json()["held"] == 10, held.text
        done = http.post("/v1/reservations/account1/gw-r/commit", json={"amount": 4, "request_id": "gw-r.c"})
        assert (done.json()["charged"], done.json()["balance"]) == (4, 86), done.text
        assert http.get("/v1/accounts/account1").json() == {"account": "account1", "balance": 86, "held": 0,
                                                            "available": 86, "plan": "default", "lots": [], "breakage": {}}

        order = ["gw-1", "gw-2", "gw-r", "gw-r.c"]
        assert [e["request_id"] for e in first_events(http, "/v1/outcomes?from=start", "outcome", 4)] == order
        grouped = first_events(http, "/v1/outcomes?from=start&group=billing&consumer=b1", "outcome", 4)
        assert [e["request_id"] for e in grouped] == order
        [snapshot] = first_events(http, "/v1/live", "snapshot", 1)
        assert "error" not in snapshot and snapshot["status"]["results"] == 4
    assert int(scene.hget(KEYS.balances, "account1")) == 86


def test_reset_redis_is_an_admins_act_the_gateway_role_is_refused(server, scene):
    """/reset-redis sets balances (FCALL set_balances): a right of the admin role only, so
    under the shipped roles it answers a problem naming the ACL file and changes nothing."""
    with Gateway(role(server, "gateway")) as gateway, gateway.client() as http:
        ready(http)
        refused = assert_problem(http.post("/reset-redis"), 500, "redis_refused")
    assert "deploy/users.acl" in refused["detail"]
    assert int(scene.hget(KEYS.balances, "account1")) == 100


def test_the_gateway_role_is_refused_what_a_gateway_must_not_do(server, scene):
    gateway = connect(role(server, "gateway"))
    settings = role(server, "gateway")
    scene.xadd(KEYS.requests, {"request_id": "r1", "account": "account1", "amount": "1"})
    refusals = {
        "set balances": lambda: codec.set_balances(gateway, settings, [("account1", 10**9)]),
        "top up": lambda: codec.top_up(gateway, settings, "account1", 1),
        "HINCRBY a balance": lambda: gateway.hincrby(KEYS.balances, "account1", 10**9),  # its charges HSET
        "SET over the balances": lambda: gateway.set(KEYS.balances, "x"),
        "DEL the balances": lambda: gateway.delete(KEYS.balances),
        "read the request stream": lambda: gateway.xrange(KEYS.requests),
        "read it as the workers' group": lambda: gateway.xreadgroup("workers", "rogue", {KEYS.requests: ">"}),
        "trim it": lambda: gateway.xtrim(KEYS.requests, maxlen=0),
        "XADD to a key of another shape": lambda: gateway.xadd("ch:{p0}:x}:requests", {"a": "1"}),
        "trim the results": lambda: gateway.xtrim(KEYS.results, maxlen=0),
        "read a producer's replies": lambda: gateway.xread({KEYS.reply("producer"): "0"}),
        "settle as the workers": lambda: codec.pump(gateway, settings, KEYS, "rogue", 1),
        "dead-letter": lambda: gateway.xadd(KEYS.deadletter, {"error": "missing_field"}),
        "count a dead letter": lambda: gateway.hincrby(KEYS.deadletter_reasons, "missing_field", 1),
        "load code": lambda: gateway.function_load(library_source(), replace=True),
        "change the partition count": lambda: gateway.set("ch:partitions", 7),
        "INFO": lambda: gateway.info(),
        "KEYS": lambda: gateway.keys("*"),
    }
    allowed = [what for what, call in refusals.items() if not denied(call)]
    assert not allowed, f"the gateway role may: {allowed}"
    assert int(scene.hget(KEYS.balances, "account1")) == 100
    assert scene.xlen(KEYS.requests) == 1


def test_a_gateway_whose_login_redis_refuses_says_it_is_misconfigured(server, scene):
    """A wrong password is no outage: the gateway stops retrying and answers 503
    misconfigured, naming the refusal, instead of redis_unavailable for ever."""
    wrong = role(server, "gateway").model_copy(
        update={"redis_url": f"redis://gateway:not-its-password@127.0.0.1:{server.port}/0"})
    with Gateway(wrong) as gateway, gateway.client() as http:
        deadline = time.monotonic() + 20
        while (answer := http.get("/readyz")).json()["reason"] != "misconfigured":
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.05)
        problem = assert_problem(answer, 503, "misconfigured")
        assert "refused the login" in problem["detail"] and "not-its-password" not in problem["detail"]
        assert_problem(http.post("/v1/charges/authorize", json={"account": "account1", "amount": 1}), 503,
                       "misconfigured")
