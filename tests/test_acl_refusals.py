"""Every abuse a role's credentials allowed before the roles were cut per command and key
(docs/security.md, "Threat model"): refused by Redis with NOPERM under the shipped deploy/users.acl,
or, where no ACL rule can refuse it, the documented mitigation at work."""

from __future__ import annotations

import json

import pytest
import redis

from charging import codec
from charging.app.audit import audit
from charging.connection import connect, library_source
from producer import Producer
from tests.conftest import cli, drain
from tests.roles import KEYS, ROOT, acl_server, denied, role, root

LAST_ID = "18446744073709551615-18446744073709551615"  # the last id a stream can hold
SETTLING = ("worker", "authorizer")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with acl_server(tmp_path_factory.mktemp("refusals")) as server:
        yield server


@pytest.fixture
def clients(server) -> dict[str, redis.Redis]:
    """A client per role, account1 with 100; the test superuser sets the scene."""
    scene = root(server)
    scene.flushall()
    codec.set_balances(scene, role(server, ROOT), [("account1", 100)])
    return {ROOT: scene, **{user: connect(role(server, user))
                            for user in ("producer", "authorizer", "worker", "maintainer", "admin")}}


def settle_all(server) -> None:
    drain(role(server, "worker"))


# ---- worker and authorizer: the commands of their functions, each on its own keys only ------

@pytest.mark.parametrize("user", SETTLING)
def test_a_settling_role_gets_noperm_turning_the_request_stream_into_a_string(server, clients, user):
    assert denied(lambda: clients[user].set(KEYS.requests, "x"))


@pytest.mark.parametrize("user", SETTLING)
def test_a_settling_role_gets_noperm_expiring_the_results(server, clients, user):
    clients[ROOT].xadd(KEYS.results, {"request_id": "r0"})
    assert denied(lambda: clients[user].pexpire(KEYS.results, 1))
    assert denied(lambda: clients[user].expire(KEYS.balances, 1))
    assert clients[ROOT].xlen(KEYS.results) == 1


@pytest.mark.parametrize("user", SETTLING)
def test_a_settling_role_gets_noperm_overwriting_the_balances(server, clients, user):
    assert denied(lambda: clients[user].set(KEYS.balances, "x"))
    assert denied(lambda: clients[user].delete(KEYS.balances))
    assert clients[ROOT].hget(KEYS.balances, "account1") == b"100"


def test_the_authorizer_gets_noperm_on_balances_beyond_what_its_functions_run(server, clients):
    """A single call is a batch of one: it reads balances with HMGET and writes them with
    HSET, as pump does; the authorizer holds those two and nothing else on them."""
    assert denied(lambda: clients["authorizer"].hincrby(KEYS.balances, "account1", 10**9))
    assert denied(lambda: clients["authorizer"].hdel(KEYS.balances, "account1"))
    assert clients[ROOT].hget(KEYS.balances, "account1") == b"100"


@pytest.mark.parametrize("user", SETTLING)
def test_a_settling_role_gets_noperm_changing_the_partition_count(server, clients, user):
    assert denied(lambda: clients[user].set("ch:partitions", 7))
    assert clients[ROOT].get("ch:partitions") == b"1"


# What each settling role's functions write to a balance, so Redis lets it write so directly:
# an HSET (a settling call writes the balances it charged with one), adding 1,000 here.
RAW_BALANCE_WRITE = {
    "authorizer": lambda client: client.hset(KEYS.balances, "account1", 1090),
    "worker": lambda client: client.hset(KEYS.balances, "account1", 1090),
}


@pytest.mark.parametrize("user", SETTLING)
def test_a_forged_outcome_or_raw_balance_write_redis_cannot_refuse_a_settling_role_is_caught_by_the_audit(
        server, clients, user):
    """The functions run XADD on results and HINCRBY or HSET on balances as the caller, so
    Redis must let the caller run them too: these roles are the engine's own
    (docs/security.md, "Threat model"). What they change outside the functions, the money
    check finds."""
    authorized = Producer(clients["authorizer"], role(server, "authorizer")).authorize(
        {"request_id": "real", "account": "account1", "amount": 10})
    forged = {"request_id": "forged", "account": "account1", "status": "approved", "reason": "", "charged": "50",
              "balance": "40", "duplicate": "0", "submitted_at": "", "processed_at": "1", "entry_id": ""}
    clients[user].xadd(KEYS.results, forged)
    RAW_BALANCE_WRITE[user](clients[user])

    report = audit(clients[ROOT], role(server, ROOT), {"account1": 100})

    assert authorized.approved
    assert report.money == {"account1": (60, -990)}  # outcomes say 60 charged; the balance rose by 990


# ---- worker: no trimming, no deleting consumers, no loading code ------------------------------

def test_a_worker_gets_noperm_trimming_any_stream(server, clients):
    clients[ROOT].xadd(KEYS.results, {"request_id": "r0"})
    worker = clients["worker"]
    assert denied(lambda: worker.xtrim(KEYS.results, maxlen=0))
    assert denied(lambda: worker.xtrim(KEYS.requests, maxlen=0))
    assert denied(lambda: codec.trim_results(worker, role(server, "worker"), KEYS))
    assert clients[ROOT].xlen(KEYS.results) == 1


def test_a_worker_gets_noperm_deleting_a_consumer_and_its_entries_stay_pending(server, clients):
    producer = Producer(clients["producer"], role(server, "producer"))
    ids = producer.submit([{"account": "account1", "amount": 1} for _ in range(3)], reply=True)
    worker = clients["worker"]
    worker.xgroup_create(KEYS.requests, "workers", id="0")
    worker.xreadgroup("workers", "victim", {KEYS.requests: ">"})  # read, then the victim dies

    assert denied(lambda: worker.xgroup_delconsumer(KEYS.requests, "workers", "victim"))
    settle_all(server)  # reclaimed from the dead victim and settled

    assert [o.status for o in producer.wait(ids, timeout=10).values()] == ["approved"] * 3


@pytest.mark.parametrize("user", ["worker", "authorizer", "producer", "admin"])
def test_only_the_maintainer_may_load_code(server, clients, user):
    rogue = library_source().replace("return settle('charge', keys, args)",
                                     "return redis.call('HINCRBY', keys[1], args[2], 1000)")
    assert denied(lambda: clients[user].function_load(rogue, replace=True))
    assert denied(lambda: clients[user].function_delete("charging"))
    assert clients["maintainer"].function_load(library_source(), replace=True) == b"charging"
    charged = Producer(clients["authorizer"], role(server, "authorizer")).authorize(
        {"account": "account1", "amount": 1})
    assert charged.balance == 99


# ---- producer: what its XADD arguments can do ----------------------------------------------

@pytest.mark.parametrize("trim", ["MAXLEN 0", "MINID"])
def test_entries_a_producer_trims_before_they_are_read_are_recorded_as_removed(server, clients, trim):
    """No ACL rule refuses XADD's trimming arguments: the maintainer records the loss."""
    producer = Producer(clients["producer"], role(server, "producer"))
    if trim == "MINID":
        producer.submit([{"account": "account1", "amount": 5}])
    settle_all(server)  # the workers' group exists and has read everything (for MINID: one charge)
    producer.submit([{"account": "account1", "amount": 1} for _ in range(3)])
    fields = {"request_id": "last", "account": "account1", "amount": "2"}
    if trim == "MINID":
        own = f"{int(clients[ROOT].xinfo_stream(KEYS.requests)['last-generated-id'].decode().split('-')[0]) + 1}-0"
        clients["producer"].xadd(KEYS.requests, fields, id=own, minid=own, approximate=False)
        lost, balance = 3, b"93"  # the trimming entry itself stays, and is charged
    else:
        clients["producer"].xadd(KEYS.requests, fields, maxlen=0, approximate=False)
        lost, balance = 4, b"100"

    maintained = cli(role(server, "maintainer"), "maintain", "--once")
    settle_all(server)

    assert maintained.returncode == 0, maintained.stderr
    [(_, dead)] = clients["admin"].xrange(KEYS.deadletter)
    assert (dead[b"error"], dead[b"group"], dead[b"removed"]) == (b"entries_removed", b"workers", str(lost).encode())
    assert clients["admin"].hgetall(KEYS.deadletter_reasons) == {b"entries_removed": b"1"}
    assert clients[ROOT].hget(KEYS.balances, "account1") == balance  # none of the removed was charged
    cli(role(server, "maintainer"), "maintain", "--once")  # recorded once, not at every round
    assert clients["admin"].xlen(KEYS.deadletter) == 1


def test_an_entry_with_the_last_possible_id_is_dead_lettered_and_the_stream_rewound(server, clients):
    """An explicit id cannot be refused either: the worker dead-letters it, which settles the
    stream, and the maintainer takes the stream's ids back to the server's clock."""
    producer = Producer(clients["producer"], role(server, "producer"))
    settle_all(server)
    clients["producer"].xadd(KEYS.requests, {"request_id": "forged", "account": "account1", "amount": "1"},
                             id=LAST_ID)
    with pytest.raises(redis.ResponseError, match="exhausted"):
        producer.submit([{"account": "account1", "amount": 1}])

    settle_all(server)
    maintained = cli(role(server, "maintainer"), "maintain", "--once")
    ids = producer.submit([{"account": "account1", "amount": 5}], reply=True)
    settle_all(server)

    assert maintained.returncode == 0, maintained.stderr
    assert producer.wait(ids, timeout=10)[ids[0]].balance == 95  # the forged entry charged nothing
    [(_, dead)] = clients["admin"].xrange(KEYS.deadletter)
    assert (dead[b"error"], dead[b"entry_id"]) == (b"id_in_future", LAST_ID.encode())


def test_entries_after_an_id_far_in_the_future_are_dead_lettered_until_the_stream_is_rewound(server, clients):
    producer = Producer(clients["producer"], role(server, "producer"))
    settle_all(server)
    clients["producer"].xadd(KEYS.requests, {"request_id": "forged", "account": "account1", "amount": "1"},
                             id="99999999999999-0")
    follower = producer.submit([{"account": "account1", "amount": 1}])  # Redis gives it an id after the forged one
    settle_all(server)
    cli(role(server, "maintainer"), "maintain", "--once")
    again = producer.submit([{"account": "account1", "request_id": follower[0], "amount": 1}], reply=True)
    settle_all(server)

    reasons = clients["admin"].hgetall(KEYS.deadletter_reasons)
    assert reasons == {b"id_in_future": b"2"}
    assert producer.wait(again, timeout=10)[again[0]].balance == 99  # resubmitted with its request id: charged once


def test_a_stray_group_on_a_request_stream_blocks_neither_the_rewind_nor_the_trim_and_is_reported(server, clients):
    """The worker role may XGROUP CREATE on a request stream: a group no worker reads must
    not hold the stream's entries, nor its ids in the future, for good."""
    producer = Producer(clients["producer"], role(server, "producer"))
    settle_all(server)
    clients["worker"].xgroup_create(KEYS.requests, "stray", id="0")
    producer.submit([{"account": "account1", "amount": 1} for _ in range(3)])
    settle_all(server)
    trimmed = cli(role(server, "maintainer"), "maintain", "--once")
    assert clients[ROOT].xlen(KEYS.requests) == 1  # acked by the workers: trimmed to its bound
    clients["producer"].xadd(KEYS.requests, {"request_id": "forged", "account": "account1", "amount": "1"},
                             id="99999999999999-0")
    follower = producer.submit([{"account": "account1", "amount": 1}])  # Redis gives it an id after the forged one
    settle_all(server)

    rewound = cli(role(server, "maintainer"), "maintain", "--once")
    again = producer.submit([{"account": "account1", "request_id": follower[0], "amount": 1}], reply=True)
    settle_all(server)

    assert clients["admin"].hgetall(KEYS.deadletter_reasons) == {b"id_in_future": b"2"}
    assert producer.wait(again, timeout=10)[again[0]].balance == 96
    events = [json.loads(line) for line in (trimmed.stderr + rewound.stderr).splitlines() if line.startswith("{")]
    assert "requests_rewound" in [e["event"] for e in events]
    assert {"event": "stray_group_found", "partition": 0, "group": "stray"} in [
        {k: e.get(k) for k in ("event", "partition", "group")} for e in events]
    status = json.loads(cli(role(server, "admin"), "status", "--json").stdout)
    assert status["stray_groups"] == ["stray"] and status["partitions"][0]["stray_groups"] == ["stray"]
    assert "stray groups on request streams: stray (partition 0)" in cli(role(server, "admin"), "status").stdout


def test_a_producer_gets_noperm_creating_keys_the_request_pattern_would_match_with_a_glob(server, clients):
    producer = clients["producer"]
    for key in ("ch:{p0}:x}:requests", "ch:{p0}:seen:r1}:requests", "ch:{p00}:requests", "ch:{p}:requests",
                "ch:{p0}:results"):
        assert denied(lambda: producer.xadd(key, {"a": "1"})), key
    assert producer.xadd("ch:{p1023}:requests", {"a": "1"})  # every partition number up to the maximum
    assert producer.xadd("ch:{p7}:requests", {"a": "1"})


def test_a_producer_gets_noperm_reading_another_producers_replies(server, clients):
    clients[ROOT].xadd(KEYS.reply("billing"), {"request_id": "theirs"})
    producer = clients["producer"]
    assert denied(lambda: producer.xread({KEYS.reply("billing"): "0"}))
    assert denied(lambda: producer.xread({KEYS.results: "0"}))
    assert producer.xread({KEYS.reply("producer"): "0"}) == []  # its own it may read


# ---- admin: accounts, not the server -------------------------------------------------------------

def test_admin_gets_noperm_copying_or_moving_keys_to_another_database(server, clients):
    admin = clients["admin"]
    assert denied(lambda: admin.execute_command("SELECT", 1))
    assert denied(lambda: admin.copy(KEYS.balances, KEYS.balances, destination_db=1))
    assert denied(lambda: admin.move(KEYS.balances, 1))
    assert denied(lambda: admin.flushall())
    assert denied(lambda: admin.config_set("appendfsync", "no"))
    assert denied(lambda: admin.acl_setuser("producer", enabled=True, commands=["+@all"]))
    assert denied(lambda: admin.get("someone-elses-key"))


def test_a_top_up_of_a_negative_amount_is_refused(server, clients):
    admin = clients["admin"]
    for amount in ("-50", "0", "2.5"):
        with pytest.raises(redis.ResponseError, match="invalid_amount"):
            admin.fcall("top_up", 1, KEYS.balances, "account1", amount)
    assert clients[ROOT].hget(KEYS.balances, "account1") == b"100"


@pytest.mark.parametrize("write, stored", [
    (lambda admin: admin.hincrby(KEYS.balances, "account1", -1000000), "-999900"),
    (lambda admin: admin.hincrby(KEYS.balances, "account1", 5 * 10**18), "5000000000000000100"),
    (lambda admin: admin.hset(KEYS.balances, "account1", "1.5"), "1.5"),
], ids=["negative", "huge", "fraction"])
def test_a_raw_balance_write_by_admin_charges_nothing_and_is_reported(server, clients, write, stored):
    """Found by an outside probe: admin wrote -999900, 5*10^18 and 1.5 into a balance with
    HINCRBY / HSET, which set_balances and top_up refuse. Redis lets admin run them because its
    functions run them as admin (docs/security.md, "Threat model"), so what the engine does is
    refuse every call on such a balance (corrupt_balance, nothing written) and report it: the
    account's line, `accounts list`, the audit."""
    write(clients["admin"])
    authorizer = Producer(clients["authorizer"], role(server, "authorizer"))
    with pytest.raises(redis.ResponseError, match="corrupt_balance"):
        authorizer.authorize({"request_id": "after-raw", "account": "account1", "amount": 1})
    with pytest.raises(redis.ResponseError, match="corrupt_balance"):
        clients["admin"].fcall("top_up", 1, KEYS.balances, "account1", "5")

    shown = cli(role(server, "admin"), "accounts", "show", "account1")
    listed = json.loads(cli(role(server, "admin"), "accounts", "list", "--json").stdout)
    report = audit(clients[ROOT], role(server, ROOT), {})

    assert shown.returncode == 1 and "corrupt_balance" in shown.stderr and stored in shown.stderr
    assert {"account": "account1", "corrupt_balance": stored} in listed
    assert report.corrupt == {"account1": stored} and not report.ok
    assert clients[ROOT].hget(KEYS.balances, "account1") == stored.encode()
