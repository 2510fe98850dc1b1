"""The ACL roles of deploy/users.acl, loaded into a real redis-server: each role does its job
with its own credentials, the worker leaves what it may not do to the maintainer, and a
producer user made by the documented recipe (docs/security.md) reads only its own replies. What each role is refused
is in test_acl_refusals.py; what each function needs, measured, in test_acl_needs.py."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import threading
import time

import pytest
import redis

from charging import codec
from charging.connection import connect
from charging.streams import partition_status
from producer import Producer
from tests import documents
from tests.conftest import cli, drain
from tests.roles import KEYS, ROLES, ROOT, acl_server, denied, password_of, role, root, shipped_users
from worker.loop import Worker


@pytest.fixture
def server(tmp_path):
    with acl_server(tmp_path) as server:
        yield server


@pytest.fixture
def clients(server) -> dict[str, redis.Redis]:
    """A client per role; the test superuser loads the library and makes account1 (100)."""
    scene = root(server)
    codec.set_balances(scene, role(server, ROOT), [("account1", 100)])
    return {ROOT: scene, **{user: connect(role(server, user)) for user in ROLES}}


def balance(clients) -> int:
    return int(clients[ROOT].hget(KEYS.balances, "account1"))


def test_the_shipped_acl_file_has_every_role_and_turns_the_default_user_off(server):
    users = shipped_users()
    assert set(users) == {"default", *ROLES}
    assert " off " in users["default"]
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=server.port).ping()


def test_each_role_does_its_job_with_its_own_credentials(server, clients):
    producer = Producer(clients["producer"], role(server, "producer"))
    ids = producer.submit([{"account": "account1", "service": "voice", "units": 2} for _ in range(3)], reply=True)
    clients["producer"].xadd(KEYS.requests, {"account": "account1", "units": "oops"})

    drain(role(server, "worker"))

    outcomes = producer.wait(ids, timeout=10)
    assert [o.status for o in outcomes.values()] == ["approved"] * 3
    seen_by_worker = partition_status(clients["worker"], role(server, "worker"), KEYS)  # its metrics gauges
    assert seen_by_worker["deadletter_reasons"] == {"missing_field": 1} and seen_by_worker["pending"] == 0
    assert clients[ROOT].xlen(KEYS.requests) == 4  # trimming is the maintainer's
    maintained = cli(role(server, "maintainer"), "maintain", "--once")
    assert maintained.returncode == 0, maintained.stderr
    assert clients[ROOT].xlen(KEYS.requests) == 1  # all acked; trimming by MINID keeps its bound
    authorized = Producer(clients["authorizer"], role(server, "authorizer")).authorize(
        {"request_id": "auth-1", "account": "account1", "amount": 5})
    assert authorized.approved and authorized.balance == 100 - 30 - 5
    codec.top_up(clients["admin"], role(server, "admin"), "account1", 45)
    assert balance(clients) == 110
    status = cli(role(server, "admin"), "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) | {"partitions": []} == json.loads(status.stdout) | {
        "partitions": [], "pending": 0, "lag": 0, "results": 4, "deadletters": 1, "length": 1}
    shown = cli(role(server, "admin"), "accounts", "list", "--json")
    assert json.loads(shown.stdout) == [{"account": "account1", "balance": 110, "held": 0, "available": 110}]


def test_a_worker_leaves_trimming_and_idle_consumers_to_the_maintainer_and_keeps_working(server, clients, caplog):
    caplog.set_level(logging.INFO, logger="charging")
    producer = Producer(clients["producer"], role(server, "producer"))
    producer.submit([{"account": "account1", "amount": 1}])
    [worker] = drain(role(server, "worker"))
    producer.submit([{"account": "account1", "amount": 1}])
    drain(role(server, "worker"))  # a second worker process

    refused = [r.duty for r in caplog.records if r.getMessage() == "duty_left_to_maintainer"]
    assert sorted(refused) == ["repair", "repair", "trim", "trim"]  # once per worker, not per round
    assert worker.settled == 1 and balance(clients) == 98
    assert clients[ROOT].xpending(KEYS.requests, "workers")["pending"] == 0


def test_a_worker_waits_for_the_maintainer_to_load_the_functions(server, clients):
    clients[ROOT].function_flush()  # a server that came back without its library
    Producer(clients["producer"], role(server, "producer")).submit([{"account": "account1", "amount": 7}])
    worker = Worker(connect(role(server, "worker")), role(server, "worker"), "w1", burst=True)
    thread = threading.Thread(target=worker.run)
    thread.start()
    time.sleep(0.5)  # the worker finds no library, may not load it, and waits
    assert thread.is_alive() and balance(clients) == 100

    maintained = cli(role(server, "maintainer"), "maintain", "--once")
    thread.join(timeout=30)

    assert maintained.returncode == 0, maintained.stderr
    assert not thread.is_alive() and balance(clients) == 93


def test_the_cli_says_the_maintainer_loads_the_functions_when_they_are_missing(server, clients):
    clients[ROOT].function_flush()
    reset = cli(role(server, "admin"), "accounts", "reset", "--count", "2")
    assert reset.returncode == 1
    assert "charging maintain" in reset.stderr and "Traceback" not in reset.stderr, reset.stderr


def test_the_cli_prints_noperm_for_a_producer_that_tries_to_top_up_or_authorize(server, clients):
    settings = role(server, "producer")
    top_up = cli(settings, "accounts", "top-up", "account1", "1000")
    authorize = cli(settings, "authorize", "--account", "account1", "--amount", "1")
    produced = cli(settings, "produce", "--account", "account1", "--amount", "1")

    assert top_up.returncode == 1 and "NOPERM" in top_up.stderr, top_up.stderr
    assert authorize.returncode == 1 and "NOPERM" in authorize.stderr, authorize.stderr
    assert produced.returncode == 0, produced.stderr
    assert balance(clients) == 100


def direct_fcall(client, op: str, request_id: str, amount="", units="", unit_price="", reservation="", ttl_ms=""):
    """FCALL one settling function by hand, as a client holding the role could."""
    names = codec.settle_keys(KEYS)
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
    assert clients[ROOT].hget(KEYS.held, "account1") == b"40"


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
    assert clients[ROOT].hlen(KEYS.held) == 0


# ---- one ACL user per producer, made by the documented recipe ----------------------------

def recipe() -> str:
    """The shell lines of the per-producer recipe ("A user per producer")."""
    return re.search(r"```sh\n(.*?)```", documents.section("A user per producer"), re.S)[1]


def test_the_documented_recipe_makes_a_producer_user_that_reads_only_its_own_replies(tmp_path):
    made = subprocess.run(["sh", "-c", recipe()], capture_output=True, text=True, check=True,
                          cwd=documents.ROOT, env={**os.environ, "PRODUCER": "billing",
                                                  "PASSWORD": password_of("billing")})
    line = made.stdout.strip()
    assert line.startswith("user billing on #") and ":reply:billing)" in line
    with acl_server(tmp_path, extra_users=(line,)) as server:
        scene = root(server)
        codec.set_balances(scene, role(server, ROOT), [("account1", 100)])
        billing = connect(role(server, "billing"))
        other = connect(role(server, "producer"))
        ids = Producer(billing, role(server, "billing")).submit([{"account": "account1", "amount": 3}], reply=True)
        drain(role(server, "worker"))

        assert Producer(billing, role(server, "billing")).id == "billing"
        assert billing.xread({KEYS.reply("billing"): "0"})[0][1][0][1][b"request_id"] == ids[0].encode()
        assert denied(lambda: other.xread({KEYS.reply("billing"): "0"}))
        assert denied(lambda: billing.xread({KEYS.reply("producer"): "0"}))


def test_produce_wait_works_for_a_producer_user_given_its_producer_id(server, clients, monkeypatch):
    worker = Worker(connect(role(server, "worker")), role(server, "worker"), "w1")
    thread = threading.Thread(target=worker.run)
    thread.start()
    monkeypatch.setenv("CHARGING_PRODUCER_ID", "producer")
    try:
        produced = cli(role(server, "producer"), "produce", "--account", "account1", "--amount", "4", "--wait",
                       "--json")
    finally:
        worker.stop()
        thread.join(timeout=30)
    assert produced.returncode == 0, produced.stderr
    assert json.loads(produced.stdout)["status"] == "approved"


def test_a_producer_user_without_its_producer_id_may_not_read_the_random_reply_stream(server, clients):
    settings = role(server, "producer").model_copy(update={"producer_id": None})
    producer = Producer(clients["producer"], settings)
    assert denied(lambda: producer.charge({"account": "account1", "amount": 1}, timeout=1))
