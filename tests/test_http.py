"""The HTTP gateway (docs/http-api.md): the original service's acceptance case over HTTP,
REST v1 with a worker running, who may do what, and every refusal as a problem."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter

import httpx
import pytest
from openapi_spec_validator import validate

from charging.app.http.access import Keyring, KeysFileError, digest
from charging.app.http.body import MAX_BODY_BYTES
from charging.app.http.problems import Problem
from charging.codec import set_balances
from tests.conftest import CHARGING, cli, drain, environment
from tests.gateway import Gateway, Served, keys_file

pytestmark = pytest.mark.slow

PROBLEM = "application/problem+json"


def together(calls, count: int) -> list:
    """Run call() count times at once from count threads; their results."""
    start = threading.Barrier(count)
    answers: list = [None] * count

    def one(i: int) -> None:
        start.wait()
        answers[i] = calls(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def test_forty_parallel_original_charges_after_a_reset_authorize_exactly_twenty(settings):
    """The original service's acceptance case, over HTTP: balance 100, 40 charges of 5."""
    with Served(settings) as served, httpx.Client(base_url=served.url, timeout=30) as http:
        reset = http.post("/reset-redis")
        assert reset.status_code == 200 and reset.json() == {"accounts": 100, "balance": 100}
        answers = together(lambda i: http.post("/charge-request-redis"), 40)
    bodies = [a.json() for a in answers]
    assert all(a.status_code == 200 for a in answers)
    approved = [b for b in bodies if b["isAuthorized"]]
    assert len(approved) == 20
    assert sorted(b["remainingBalance"] for b in approved) == list(range(0, 100, 5))
    assert all(b["charges"] == 5 for b in approved)
    refused = [b for b in bodies if not b["isAuthorized"]]
    assert len(refused) == 20 and all(b == {"remainingBalance": 0, "charges": 0, "isAuthorized": False}
                                      for b in refused)
    assert json.loads(cli(settings, "accounts", "show", "account1", "--json").stdout)["balance"] == 0


def test_forty_parallel_v1_charges_settle_through_a_worker_exactly_twenty(settings):
    """The same case through the request stream: 202 for each, a running worker settles them,
    GET /v1/charges/{id} answers 404 until then and the stored outcome after."""
    worker = subprocess.Popen([CHARGING, "worker", "--consumer", "http-w"], env={**environment(settings)},
                              stderr=subprocess.DEVNULL)
    try:
        with Served(settings) as served, httpx.Client(base_url=served.url, timeout=30) as http:
            assert http.post("/reset-redis").status_code == 200
            accepted = together(lambda i: http.post("/v1/charges", json={"account": "account1", "amount": 5},
                                                    headers={"Idempotency-Key": f"v1-{i}"}), 40)
            assert [a.status_code for a in accepted] == [202] * 40
            assert sorted(a.json()["request_id"] for a in accepted) == sorted(f"v1-{i}" for i in range(40))
            outcomes = {}
            deadline = time.monotonic() + 60
            while len(outcomes) < 40 and time.monotonic() < deadline:
                for i in set(range(40)) - set(outcomes):
                    got = http.get(f"/v1/charges/v1-{i}")
                    assert got.status_code in (200, 404)
                    if got.status_code == 200:
                        outcomes[i] = got.json()
                time.sleep(0.05)
    finally:
        worker.terminate()
        worker.wait(20)
    assert len(outcomes) == 40
    approved = [o for o in outcomes.values() if o["status"] == "approved"]
    assert len(approved) == 20 and sorted(o["balance"] for o in approved) == list(range(0, 100, 5))
    assert Counter(o["reason"] for o in outcomes.values() if o["status"] == "rejected") == {"insufficient_funds": 20}


@pytest.fixture
def keyed(settings, client, tmp_path):
    """A gateway with keys: everything, charge only, read only, one limited to partner-*
    accounts, and one of 2 requests per a long while."""
    path = tmp_path / "keys.toml"
    tokens = keys_file(path, ("ops", ["charge", "authorize", "reserve", "read", "admin"], {}),
                       ("charger", ["charge"], {}), ("reader", ["read"], {}),
                       ("partner", ["authorize", "read"], {"accounts": ["partner-*"]}),
                       ("slow", ["authorize"], {"rate": 0.001, "burst": 2}))
    set_balances(client, settings, [("account1", 100), ("partner-7", 100)])
    with Gateway(settings, Keyring.load(path)) as gateway:
        yield gateway, tokens


def assert_problem(response: httpx.Response, status: int, reason: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert (body["status"], body["reason"], body["type"]) == (status, reason, f"/problems/{reason}")
    assert body["title"] and body["detail"]
    return body


def test_no_key_or_an_unknown_key_is_401(keyed):
    gateway, tokens = keyed
    with gateway.client() as anonymous, gateway.client("chk_not-a-key") as stranger:
        missing = anonymous.post("/v1/charges/authorize", json={"account": "account1", "amount": 1})
        assert_problem(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert_problem(stranger.get("/v1/accounts/account1"), 401, "unauthorized")
    with gateway.client(tokens["ops"]) as ops:
        assert ops.get("/v1/accounts/account1").json()["balance"] == 100  # nothing was charged


def test_a_missing_scope_or_an_account_outside_the_key_is_403(keyed):
    gateway, tokens = keyed
    with gateway.client(tokens["charger"]) as charger, gateway.client(tokens["partner"]) as partner:
        assert_problem(charger.post("/v1/charges/authorize", json={"account": "account1", "amount": 1}),
                       403, "scope_missing")
        assert_problem(charger.post("/reset-redis"), 403, "scope_missing")
        assert_problem(partner.post("/v1/charges/authorize", json={"account": "account1", "amount": 1}),
                       403, "account_not_allowed")
        assert_problem(partner.get("/v1/accounts/account1"), 403, "account_not_allowed")
        assert_problem(partner.get("/v1/live"), 403, "account_not_allowed")
        ok = partner.post("/v1/charges/authorize", json={"account": "partner-7", "amount": 1, "request_id": "p-1"})
        assert ok.status_code == 200 and ok.json()["balance"] == 99
        assert_problem(partner.get("/v1/charges/p-1", params={"account": "account1"}), 403, "account_not_allowed")
        assert partner.get("/v1/charges/p-1").json()["charged"] == 1
    with gateway.client(tokens["reader"]) as reader:
        # An outcome of an account the key may not touch is not found for it.
        assert reader.get("/v1/charges/p-1").status_code == 200
    with gateway.client(tokens["ops"]) as ops:
        assert ops.get("/v1/accounts/account1").json()["balance"] == 100


def test_a_body_over_the_limit_is_413_and_never_read(keyed):
    gateway, tokens = keyed
    with gateway.client(tokens["ops"]) as ops:
        big = json.dumps({"account": "account1", "amount": 1, "request_id": "x" * MAX_BODY_BYTES})
        assert_problem(ops.post("/v1/charges", content=big), 413, "body_too_large")

        def chunks():  # no Content-Length: refused while it streams in
            yield b'{"account": "account1", "request_id": "'
            for _ in range(MAX_BODY_BYTES // 1000 + 1):
                yield b"y" * 1000
            yield b'"}'
        assert_problem(ops.post("/v1/charges/authorize", content=chunks()), 413, "body_too_large")
        assert ops.get("/v1/accounts/account1").json()["balance"] == 100


@pytest.mark.parametrize("body, headers, reason", [
    ({"account": "account1", "service": "sms", "units": 1.5}, {}, "invalid_units"),
    ({"account": "account1", "service": "sms", "units": "-2"}, {}, "invalid_units"),
    ({"account": "account1", "service": "fax", "units": 2}, {}, "unknown_service"),
    ({"account": "account1", "service": "sms"}, {}, "missing_field"),
    ({"account": "account1", "amount": 5, "service": "sms", "units": 1}, {}, "ambiguous_charge"),
    ({"account": "account1", "amount": 5, "colour": "red"}, {}, "unknown_field"),
    ({"account": "account 1", "amount": 5}, {}, "invalid_account"),
    ({"account": "account1", "amount": 10**13}, {}, "invalid_amount"),
    ({"account": "account1", "amount": 5, "ttl": 3}, {}, "field_not_allowed"),
    ({"account": "account1", "amount": 5, "reply_to": "x"}, {}, "field_not_allowed"),
    ({"account": "account1", "amount": 5, "op": "reserve"}, {}, "field_not_allowed"),
    ({"account": "account1", "amount": 5, "note": "é" * 200}, {}, "field_too_long"),
    ({"account": "account1", "amount": 5, "request_id": "a"}, {"Idempotency-Key": "b"}, "invalid_request_id"),
])
def test_an_invalid_request_is_422_with_the_wire_formats_reason(keyed, body, headers, reason):
    gateway, tokens = keyed
    with gateway.client(tokens["ops"]) as ops:
        for path in ("/v1/charges", "/v1/charges/authorize"):
            assert_problem(ops.post(path, json=body, headers=headers), 422, reason)
        assert ops.get("/v1/accounts/account1").json()["balance"] == 100
    assert json.loads(cli(gateway_settings(gateway), "status", "--json").stdout)["length"] == 0


def gateway_settings(gateway):
    return gateway.server.config.app.state.gateway.settings


def test_malformed_json_is_400(keyed):
    gateway, tokens = keyed
    with gateway.client(tokens["ops"]) as ops:
        assert_problem(ops.post("/v1/charges", content=b"{not json"), 400, "invalid_json")
        assert_problem(ops.post("/v1/charges", content=b"[1, 2]"), 400, "invalid_json")
        assert_problem(ops.post("/v1/charges", content=b'{"amount": 1, "amount": 2}'), 400, "invalid_json")


def test_a_key_past_its_rate_is_429_with_retry_after(keyed):
    gateway, tokens = keyed
    with gateway.client(tokens["slow"]) as slow:
        sent = [slow.post("/v1/charges/authorize", json={"account": "account1", "amount": 1}) for _ in range(3)]
    assert [r.status_code for r in sent[:2]] == [200, 200]
    assert_problem(sent[2], 429, "rate_limited")
    assert int(sent[2].headers["retry-after"]) >= 1
    with gateway.client(tokens["ops"]) as ops:
        assert ops.get("/v1/accounts/account1").json()["balance"] == 98


def test_redis_unreachable_is_503_and_not_ready(settings):
    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0", "retry_attempts": 0,
                                       "socket_timeout_s": 1.0, "block_ms": 100})
    with Gateway(down) as gateway, gateway.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert_problem(http.get("/readyz"), 503, "redis_unavailable")
        refused = assert_problem(http.post("/charge-request-redis"), 503, "redis_unavailable")
        assert "unreachable" in refused["detail"]
        assert http.post("/v1/charges", json={"account": "a", "amount": 1}).headers["retry-after"] == "1"


def test_a_full_backlog_is_503_and_writes_nothing(settings):
    with Gateway(settings.model_copy(update={"max_backlog": 2})) as gateway, gateway.client() as http:
        for i in range(2):
            assert http.post("/v1/charges", json={"account": "account1", "amount": 1}).status_code == 202
        full = assert_problem(http.post("/v1/charges", json={"account": "account1", "amount": 1}), 503,
                              "backlog_full")
        assert "nothing was submitted" in full["detail"]
    assert json.loads(cli(settings, "status", "--json").stdout)["length"] == 2


def test_without_keys_only_loopback_callers_get_in():
    from charging.app.http.gateway import Gateway as Runtime
    from charging.settings import Settings

    runtime = Runtime(Settings(), Keyring())
    assert runtime.caller(None, "127.0.0.1").name == "loopback"
    assert runtime.caller(None, "::1").name == "loopback"
    with pytest.raises(Problem) as refused:
        runtime.caller("Bearer anything", "10.1.2.3")
    assert refused.value.status == 401


def test_serve_without_keys_says_it_serves_loopback_only_and_refuses_other_addresses(settings):
    refused = subprocess.run([CHARGING, "serve", "--host", "0.0.0.0"], env=environment(settings),
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "without API keys" in refused.stderr
    with Served(settings) as served:
        pass
    assert "loopback callers may use every endpoint" in served.process.stderr.read()


def test_a_keys_file_keeps_only_hashes_and_refuses_bad_entries(tmp_path):
    path = tmp_path / "keys.toml"
    tokens = keys_file(path, ("a", ["read"], {}))
    text = path.read_text()
    assert tokens["a"] not in text and digest(tokens["a"]) in text
    assert Keyring.load(path).identify(tokens["a"]).scopes == {"read"}
    for bad in ('[keys.b]\nsha256 = "00"\nscopes = ["read"]\n',
                f'[keys.b]\nsha256 = "{"0" * 64}"\nscopes = ["fly"]\n',
                f'[keys.b]\nsha256 = "{"0" * 64}"\nscopes = ["read"]\nrole = "x"\n'):
        path.write_text(bad)
        with pytest.raises(KeysFileError):
            Keyring.load(path)


def test_replaying_an_idempotency_key_charges_once(keyed):
    gateway, tokens = keyed
    with gateway.client(tokens["ops"]) as ops:
        answers = [ops.post("/v1/charges", json={"account": "account1", "amount": 7},
                            headers={"Idempotency-Key": "same-1"}) for _ in range(3)]
        assert [a.status_code for a in answers] == [202] * 3
        drain(gateway_settings(gateway))
        assert ops.get("/v1/charges/same-1").json() == {
            "request_id": "same-1", "account": "account1", "status": "approved", "reason": "", "charged": 7,
            "balance": 93, "op": "charge"}
        assert ops.get("/v1/accounts/account1").json()["balance"] == 93
        assert_problem(ops.get("/v1/charges/never-sent"), 404, "unknown_request")


def test_a_voice_call_over_http_reserves_extends_and_commits(keyed):
    gateway, tokens = keyed
    with gateway.client(tokens["ops"]) as ops:
        held = ops.post("/v1/reservations", json={"account": "account1", "service": "voice", "units": 10,
                                                  "request_id": "call-9"}).json()
        assert (held["status"], held["reservation"], held["held"]) == ("approved", "account1/call-9", 50)
        more = ops.post("/v1/reservations/account1/call-9/extend", json={"units": 2}).json()
        assert (more["status"], more["held"]) == ("approved", 60)
        assert ops.get("/v1/accounts/account1").json() == {"account": "account1", "balance": 100, "held": 60,
                                                           "available": 40, "plan": "default", "lots": [], "breakage": {}}
        done = ops.post("/v1/reservations/account1/call-9/commit", json={"units": 7}).json()
        assert (done["status"], done["charged"], done["balance"], done["held"]) == ("approved", 35, 65, 0)
        gone = ops.post("/v1/reservations/account1/call-9/release", json={}).json()
        assert (gone["status"], gone["reason"]) == ("rejected", "unknown_reservation")
        assert_problem(ops.post("/v1/reservations/account1/call-9/commit",
                                json={"units": 1, "reservation": "account1/other"}), 422, "field_not_allowed")


def test_outcome_events_resume_after_the_last_event_id(keyed):
    gateway, tokens = keyed
    with gateway.client(tokens["ops"]) as ops:
        for i in range(3):
            ops.post("/v1/charges/authorize", json={"account": "account1", "amount": 1, "request_id": f"e-{i}"})
        first = read_events(ops, "/v1/outcomes?from=start", 2)
        assert [e["data"]["request_id"] for e in first] == ["e-0", "e-1"]
        ops.post("/v1/charges/authorize", json={"account": "account1", "amount": 1, "request_id": "e-3"})
        rest = read_events(ops, "/v1/outcomes", 2, {"Last-Event-ID": first[-1]["id"]})
        assert [e["data"]["request_id"] for e in rest] == ["e-2", "e-3"]
        assert_problem(ops.get("/v1/outcomes", headers={"Last-Event-ID": "garbage"}), 400, "invalid_last_event_id")


def test_a_results_group_delivers_each_outcome_to_one_member(keyed):
    gateway, tokens = keyed
    with gateway.client(tokens["ops"]) as ops:
        def charge(request_id: str) -> None:
            ops.post("/v1/charges/authorize", json={"account": "account1", "amount": 1, "request_id": request_id})
        charge("g-0")
        charge("g-1")
        one = read_events(ops, "/v1/outcomes?group=billing&from=start&consumer=m1", 2)
        charge("g-2")
        other = read_events(ops, "/v1/outcomes?group=billing&consumer=m2", 1)
    assert [e["data"]["request_id"] for e in one] == ["g-0", "g-1"]
    assert [e["data"]["request_id"] for e in other] == ["g-2"]  # the group had acked what m1 was sent


def read_events(http: httpx.Client, path: str, count: int, headers: dict | None = None) -> list[dict]:
    events = []
    with http.stream("GET", path, headers=headers, timeout=10) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        block: dict = {}
        for line in response.iter_lines():
            if line.startswith("id: "):
                block["id"] = line[4:]
            elif line.startswith("data: "):
                block["data"] = json.loads(line[6:])
            elif not line and "data" in block:
                events.append(block)
                block = {}
                if len(events) == count:
                    return events
    return events


def test_the_openapi_document_is_valid_and_names_every_endpoint(keyed):
    from charging.app.http.app import ENDPOINTS

    gateway, _ = keyed
    with gateway.client() as anyone:
        document = anyone.get("/openapi.json").json()
        assert anyone.get("/docs").status_code == 200
        assert anyone.get("/").headers["content-type"].startswith("text/html")
        assert_problem(anyone.get("/no/such/thing"), 404, "not_found")
        assert_problem(anyone.post("/charge-request-memcached"), 410, "gone")
    validate(document)
    documented = {(method.upper(), path) for path, methods in document["paths"].items() for method in methods}
    assert documented == {(e.method, e.template) for e in ENDPOINTS}
    assert document["paths"]["/v1/charges"]["post"]["responses"]["422"]["content"]["application/problem+json"]


def test_metrics_count_requests_by_route(keyed):
    gateway, tokens = keyed
    with gateway.client(tokens["ops"]) as ops:
        ops.get("/v1/accounts/account1")
        scrape = ops.get("/metrics").text
    assert 'charging_http_requests_total{method="GET",route="/v1/accounts/{account}",status="200"}' in scrape



def test_serve_with_two_workers_sums_their_metrics(settings):
    with Served(settings, "--workers", "2") as served, httpx.Client(base_url=served.url, timeout=30) as http:
        assert http.post("/reset-redis").status_code == 200
        answers = together(lambda i: httpx.post(served.url + "/charge-request-redis", timeout=30), 12)
        assert sorted(a.json()["remainingBalance"] for a in answers) == list(range(40, 100, 5))
        scrape = http.get("/metrics").text
    assert 'charging_http_requests_total{method="POST",route="/charge-request-redis",status="200"} 12.0' in scrape
