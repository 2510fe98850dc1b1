"""The ACL roles of deploy/users.acl, loaded into a real redis-server: each role can do its
job and nothing more. Only the passwords are swapped for test ones; every rule is the
shipped file's, verbatim."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import redis

from charging import codec
from charging.connection import connect, library_source
from charging.keys import Keys
from charging.settings import Settings
from charging.streams import partition_status
from charging.tools.redis_server import RedisServer
from producer import Producer
from tests.conftest import cli, drain

ACL_FILE = Path(__file__).resolve().parent.parent / "deploy" / "users.acl"
NAMESPACE = "ch"  # the key patterns of the shipped file
KEYS = Keys(NAMESPACE, 0)
ROLES = ("producer", "authorizer", "worker", "admin")


def password_of(user: str) -> str:
    return f"test-{user}-secret"


@pytest.fixture
def server(tmp_path) -> RedisServer:
    rules = re.sub(r"^user (\S+) on #[0-9a-f]{64} ", lambda m: f"user {m[1]} on >{password_of(m[1])} ",
                   ACL_FILE.read_text(), flags=re.M)
    acl = tmp_path / "users.acl"
    acl.write_text(rules)
    with RedisServer(tmp_path / "data", extra_args=("--aclfile", str(acl)),
                     credentials=("admin", password_of("admin"))) as server:
        yield server


def role(server: RedisServer, user: str) -> Settings:
    return Settings(redis_url=f"redis://{user}:{password_of(user)}@127.0.0.1:{server.port}/0", namespace=NAMESPACE,
                    reclaim_idle_ms=500, maintenance_interval_s=0.2, block_ms=200)


@pytest.fixture
def clients(server) -> dict[str, redis.Redis]:
    admin = connect(role(server, "admin"))  # loads the library
    codec.set_balances(admin, role(server, "admin"), [("account1", 100)])
    return {"admin": admin, **{user: connect(role(server, user)) for user in ROLES if user != "admin"}}


def balance(clients) -> int:
    return int(clients["admin"].hget(KEYS.balances, "account1"))


def denied(call) -> bool:
    """True when Redis answers NOPERM (redis-py raises NoPermissionError for it)."""
    try:
        call()
    except redis.exceptions.NoPermissionError as refused:
        return "no permissions" in str(refused)
    return False


def test_the_shipped_acl_file_has_every_role_and_turns_the_default_user_off(server):
    users = {line.split()[1]: line for line in ACL_FILE.read_text().splitlines()}
    assert set(users) == {"default", *ROLES}
    assert " off " in users["default"]
    default = redis.Redis(port=server.port)
    with pytest.raises(redis.exceptions.AuthenticationError):
        default.ping()


def test_each_role_does_its_job_with_its_own_credentials(server, clients):
    producer = Producer(clients["producer"], role(server, "producer"))
    ids = producer.submit([{"account": "account1", "service": "voice", "units": 2} for _ in range(3)], reply=True)
    clients["producer"].xadd(KEYS.requests, {"account": "account1", "units": "oops"})

    drain(role(server, "worker"))

    outcomes = producer.wait(ids, timeout=10)
    assert [o.status for o in outcomes.values()] == ["approved"] * 3
    # maintenance the burst worker had no cause to run: results trimming; trim is exact-
    # by-node ('~'), so four outcomes in one node stay
    few = role(server, "worker").model_copy(update={"results_maxlen": 1})
    assert codec.trim_results(clients["worker"], few, KEYS) == 0
    # what the worker reads for its metrics gauges
    seen_by_worker = partition_status(clients["worker"], role(server, "worker"), KEYS)
    assert seen_by_worker["deadletter_reasons"] == {"missing_field": 1} and seen_by_worker["pending"] == 0
    authorized = Producer(clients["authorizer"], role(server, "authorizer")).authorize(
        {"request_id": "auth-1", "account": "account1", "amount": 5})
    assert authorized.approved and authorized.balance == 100 - 30 - 5
    codec.top_up(clients["admin"], role(server, "admin"), "account1", 45)
    assert balance(clients) == 110
    status = cli(role(server, "admin"), "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) | {"partitions": []} == json.loads(status.stdout) | {
        "partitions": [], "pending": 0, "lag": 0, "results": 4, "deadletters": 1}


def test_a_producer_gets_noperm_setting_or_changing_a_balance(server, clients):
    producer = clients["producer"]
    settings = role(server, "producer")
    attempts = {
        "HSET": lambda: producer.hset(KEYS.balances, "account1", 10**9),
        "HINCRBY": lambda: producer.hincrby(KEYS.balances, "account1", 10**9),
        "set_balances": lambda: codec.set_balances(producer, settings, [("account1", 10**9)]),
        "top_up": lambda: codec.top_up(producer, settings, "account1", 10**6),
        "charge": lambda: Producer(producer, settings).authorize({"account": "account1", "amount": 1}),
        "reserve": lambda: Producer(producer, settings).reserve({"account": "account1", "amount": 1}),
        "expire_reservations": lambda: codec.expire_reservations(producer, settings, KEYS),
        "EVAL": lambda: producer.eval("return redis.call('HSET', KEYS[1], 'account1', 1)", 1, KEYS.balances),
        "DEL": lambda: producer.delete(KEYS.balances),
    }
    for name, attempt in attempts.items():
        assert denied(attempt), name
    assert balance(clients) == 100


def test_a_producer_gets_noperm_reading_any_key_but_its_replies(server, clients):
    producer = clients["producer"]
    Producer(producer, role(server, "producer")).submit([{"account": "account1", "amount": 1}])
    attempts = {
        "balance": lambda: producer.hget(KEYS.balances, "account1"),
        "all balances": lambda: producer.hgetall(KEYS.balances),
        "request stream": lambda: producer.xrange(KEYS.requests),
        "request stream by XREAD": lambda: producer.xread({KEYS.requests: "0"}),
        "results stream": lambda: producer.xread({KEYS.results: "0"}),
        "dead letters": lambda: producer.xread({KEYS.deadletter: "0"}),
        "dedupe record": lambda: producer.get(KEYS.seen("r1")),
        "key listing": lambda: producer.scan(),
        "another namespace": lambda: producer.xread({"other:{p0}:reply:x": "0"}),
    }
    for name, attempt in attempts.items():
        assert denied(attempt), name
    assert producer.xread({KEYS.reply("someone"): "0"}) == []  # its replies it may read


def test_a_producer_gets_noperm_loading_or_dropping_functions(server, clients):
    producer = clients["producer"]
    assert denied(lambda: producer.function_load(library_source(), replace=True))
    assert denied(lambda: producer.function_delete("charging"))
    assert denied(lambda: producer.function_flush())
    assert denied(lambda: producer.config_set("appendonly", "no"))
    assert clients["admin"].function_list(library="charging")


def test_the_cli_prints_noperm_for_a_producer_that_tries_to_top_up_or_authorize(server, clients):
    settings = role(server, "producer")
    top_up = cli(settings, "accounts", "top-up", "account1", "1000")
    authorize = cli(settings, "authorize", "--account", "account1", "--amount", "1")
    produced = cli(settings, "produce", "--account", "account1", "--amount", "1")

    assert top_up.returncode == 1 and "NOPERM" in top_up.stderr, top_up.stderr
    assert authorize.returncode == 1 and "NOPERM" in authorize.stderr, authorize.stderr
    assert produced.returncode == 0, produced.stderr
    assert balance(clients) == 100


def test_worker_and_authorizer_cannot_set_balances_or_run_server_commands(server, clients):
    for user in ("worker", "authorizer"):
        client, settings = clients[user], role(server, user)
        assert denied(lambda: codec.set_balances(client, settings, [("account1", 1)])), user
        assert denied(lambda: codec.top_up(client, settings, "account1", 1)), user
        assert denied(lambda: client.hset(KEYS.balances, "account1", 1)), user
        assert denied(lambda: client.config_get("requirepass")), user
        assert denied(lambda: client.function_flush()), user
    assert denied(lambda: clients["authorizer"].xrange(KEYS.requests))
    assert balance(clients) == 100


def test_admin_manages_accounts_but_not_the_server_or_other_keys(server, clients):
    admin = clients["admin"]
    assert denied(lambda: admin.flushall())
    assert denied(lambda: admin.config_set("appendfsync", "no"))
    assert denied(lambda: admin.acl_setuser("producer", enabled=True, commands=["+@all"]))
    assert denied(lambda: admin.get("someone-elses-key"))


def direct_fcall(client, op: str, request_id: str, amount="", units="", unit_price="", reservation="", ttl_ms=""):
    """FCALL one settling function by hand, as a client holding the role could."""
    names = [KEYS.balances, KEYS.seen(request_id), KEYS.results, KEYS.requests, KEYS.held, KEYS.reservations,
             KEYS.expiries]
    return client.fcall(op, len(names), *names, request_id, "account1", f"account1|{op}|{request_id}", "", "",
                         60_000, "", 60_000, amount, units, unit_price, reservation, ttl_ms)


def test_a_direct_fcall_cannot_turn_a_charge_into_a_top_up(server, clients):
    authorizer = clients["authorizer"]
    for amount in ("-50", "0", "2.5", "nan"):
        with pytest.raises(redis.ResponseError, match="invalid_amount"):
            direct_fcall(authorizer, "charge", f"neg{amount}", amount=amount)
    assert balance(clients) == 100


def test_a_direct_fcall_cannot_hold_or_release_negative_or_fractional_amounts(server, clients):
    authorizer = clients["authorizer"]
    held = direct_fcall(authorizer, "reserve", "r1", amount=40, unit_price=1, reservation="account1/r1", ttl_ms=60_000)
    assert held[0] == b"approved"
    refused = [
        ("reserve", {"amount": "-40", "unit_price": 1, "reservation": "account1/r2", "ttl_ms": 60_000}),
        ("reserve", {"amount": 40, "unit_price": 1, "reservation": "account1/r3", "ttl_ms": "-1"}),
        ("extend", {"amount": "-40", "reservation": "account1/r1"}),
        ("extend", {"units": "0.5", "reservation": "account1/r1"}),
        ("commit", {"amount": "-40", "reservation": "account1/r1"}),
        ("commit", {"reservation": "account1/r1"}),
        ("release", {}),
    ]
    for number, (op, args) in enumerate(refused):
        with pytest.raises(redis.ResponseError, match="invalid_"):
            direct_fcall(authorizer, op, f"bad-{number}", **args)
    assert balance(clients) == 100
    assert clients["admin"].hget(KEYS.held, "account1") == b"40"


def test_authorizer_and_worker_run_sessions_and_the_sweep_with_their_own_roles(server, clients):
    authorizer = Producer(clients["authorizer"], role(server, "authorizer"))
    call = authorizer.reserve({"request_id": "call-1", "account": "account1", "service": "voice", "units": 6})
    assert authorizer.extend({"reservation": call.reservation, "units": 2}).approved
    assert authorizer.commit({"reservation": call.reservation, "units": 5}).charged == 25
    producer = Producer(clients["producer"], role(server, "producer"))
    ids = producer.submit([{"op": "reserve", "request_id": "call-2", "account": "account1", "amount": 30, "ttl": 1},
                           {"op": "reserve", "request_id": "call-3", "account": "account1", "amount": 10}], reply=True)
    drain(role(server, "worker"))
    assert [o.status for o in producer.wait(ids, timeout=10).values()] == ["approved"] * 2
    ended = producer.submit([{"op": "release", "reservation": "account1/call-3"}], reply=True)
    drain(role(server, "worker"))
    assert producer.wait(ended, timeout=10)[ended[0]].approved
    time.sleep(1.1)  # call-2 expires; the worker's sweep releases it
    assert codec.expire_reservations(clients["worker"], role(server, "worker"), KEYS) == 1
    assert balance(clients) == 75
    assert clients["admin"].hlen(KEYS.held) == 0


def test_the_gateway_as_the_authorizer_role_charges_and_says_what_its_user_lacks(server, clients):
    """deploy/users.acl's authorizer, as docker-compose.yml runs the gateway (the admin loaded
    the library and set account1 to 100): settling works; a right the role lacks is a 500
    redis_refused naming the ACL file."""
    from tests.gateway import Gateway
    from tests.test_http import assert_problem

    with Gateway(role(server, "authorizer")) as gateway, gateway.client() as http:
        assert http.post("/charge-request-redis").json() == {"remainingBalance": 95, "charges": 5,
                                                              "isAuthorized": True}
        held = http.post("/v1/reservations", json={"account": "account1", "amount": 10, "request_id": "acl-r"})
        assert held.json()["held"] == 10
        refused = http.post("/reset-redis")
        if refused.status_code != 200:  # an authorizer may not set balances
            assert_problem(refused, 500, "redis_refused")
            assert "deploy/users.acl" in refused.json()["detail"]
        with http.stream("GET", "/v1/outcomes?from=start", timeout=10) as events:
            first = next(line for line in events.iter_lines() if line.startswith("event: "))
        # An outcome, or (a role without XREAD) the refusal as a problem event, never a cut stream.
        assert first in ("event: outcome", "event: problem")
