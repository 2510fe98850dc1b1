"""What each function of lua/charging.lua runs, measured, against what deploy/users.acl grants.

Redis checks every command a function runs against the caller's ACL user. So each
function is run here through its codec call (charging/codec.py), with MONITOR recording
the commands it runs inside Redis and COMMAND GETKEYS naming their keys. Then:
- every role that calls a function runs it for real, and every other role is refused;
- ACL DRYRUN checks each recorded command under each role that calls the function, so a
  change to the Lua library that needs a new rule fails here naming the rule;
- a matrix of commands by key kind shows each role is granted exactly what its functions
  and its own code need, nothing more;
- the documented table of what each function runs (docs/security.md) is the measured one.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import pytest
import redis

from charging import codec
from charging.codec import RESERVATION_SEP
from charging.connection import connect, library_source
from charging.plan import run
from charging.settings import Settings
from charging.streams import ensure_group
from producer import Producer
from tests.documents import section
from tests.roles import KEYS, ROLES, ROOT, acl_server, role, root

# Key kinds, as the ACL file spells their patterns; every key a function touches must be one.
KINDS = {
    "balances": "ch:{p*}:balances", "held": "ch:{p*}:held", "reservations": "ch:{p*}:reservations",
    "expiries": "ch:{p*}:expiries", "holds": "ch:{p*}:holds", "wallets": "ch:{p*}:wallets",
    "lot_expiries": "ch:{p*}:lot_expiries", "plans": "ch:{p*}:plans",
    "dedupe:*": "ch:{p*}:dedupe:*", "requests": "ch:{p*}:requests",
    "results": "ch:{p*}:results", "reply:*": "ch:{p*}:reply:*", "deadletter": "ch:{p*}:deadletter",
    "deadletter:reasons": "ch:{p*}:deadletter:reasons", "partitions": "ch:partitions",
}
NO_KEY = "(no key)"
CONTAINERS = {"xgroup", "xinfo", "function", "config", "script", "client", "acl", "object", "memory"}


# ---- the scenes: what each function needs to find so that every path of it runs ---------
# A scene is set up by the test superuser and returns what the call needs to know (the
# entries a worker would have in hand); the call is what the role runs: codec calls only.

def accounts(scene: redis.Redis, settings: Settings) -> None:
    codec.set_balances(scene, settings, [("account1", 1000)])


def expired_reservation(scene: redis.Redis) -> None:
    """An open reservation of account1 whose expiry has passed: any settling call releases it."""
    scene.hset(KEYS.reservations, "account1/old", RESERVATION_SEP.join(["account1", "10", "1", "1", "1000"]))
    scene.zadd(KEYS.expiries, {"account1/old": 1, "account1/gone": 1})  # and an expiry whose reservation went
    scene.zadd(KEYS.holds, {"account1/old": 0, "account1/gone": 0})
    scene.hincrby(KEYS.held, "account1", 10)


def pending(scene: redis.Redis, settings: Settings, entries: list[dict]) -> list[str]:
    """XADD entries and read them as a consumer of the workers' group: their entry ids."""
    run(scene, ensure_group(KEYS.requests, settings.group))
    for fields in entries:
        scene.xadd(KEYS.requests, fields)
    read = scene.xreadgroup(settings.group, "w1", {KEYS.requests: ">"})
    return [eid.decode() for _, messages in read for eid, _ in messages]


def lots(scene: redis.Redis, settings: Settings) -> None:
    """account1 on a plan, with a bundle and a lot that has expired (any settling call, and
    the sweep, records its breakage)."""
    codec.set_plan(scene, KEYS, "gold", {"sms": 1, "voice": 4, "data": 8})
    codec.assign_plan(scene, settings, "account1", "gold")
    codec.grant(scene, settings, "account1", "bundle", "units", 100, "sms")
    codec.grant(scene, settings, "account1", "gone", "money", 7, expires_in_ms=1)
    time.sleep(0.005)


def settle_scene(scene, settings):
    accounts(scene, settings)
    expired_reservation(scene)
    lots(scene, settings)


def settle_call(client, settings, _):
    """authorize: every op, synchronously (no entry to ack, no reply stream)."""
    producer = Producer(client, settings)
    outcomes = [producer.authorize({"request_id": "c1", "account": "account1", "amount": 5}),
                producer.authorize({"request_id": "c1", "account": "account1", "amount": 5}),  # a replay
                producer.authorize({"request_id": "c2", "account": "account1", "service": "sms", "units": 3})]
    held = producer.reserve({"request_id": "s1", "account": "account1", "amount": 50})
    outcomes += [held, producer.extend({"reservation": held.reservation, "amount": 10}),
                 producer.commit({"reservation": held.reservation, "amount": 20})]
    held = producer.reserve({"request_id": "s2", "account": "account1", "amount": 50})
    outcomes += [held, producer.release({"reservation": held.reservation})]
    assert [o.status for o in outcomes] == ["approved"] * 8


BATCH = [{"request_id": "b1", "account": "account1", "amount": 5},
         {"request_id": "b4", "account": "account1", "service": "sms", "units": 2},
         {"op": "reserve", "request_id": "b2", "account": "account1", "amount": 50},
         {"op": "extend", "reservation": "account1/b2", "amount": 10},
         {"op": "commit", "reservation": "account1/b2", "amount": 20},
         {"op": "reserve", "request_id": "b3", "account": "account1", "amount": 50},
         {"op": "release", "reservation": "account1/b3"}]


def posted_before(scene: redis.Redis, *streams: str) -> None:
    """Streams a call posts to that already exist, so that it checks them (postable)."""
    for stream in streams:
        scene.xadd(stream, {"earlier": "1"})


def pump_scene(scene, settings):
    """Every path of pump: entries of a dead consumer to reclaim (one of them deleted while
    pending), new ones, every op with a reply stream, and a bad entry to dead-letter."""
    settle_scene(scene, settings)
    posted_before(scene, KEYS.results, KEYS.reply("someone"), KEYS.deadletter)
    fields = [Producer(scene, settings, "someone").prepare(data, reply=True).to_fields() for data in BATCH]
    pending(scene, settings, fields[:2])  # read by w1, which died
    gone = pending(scene, settings, [{"n": "deleted"}])
    scene.xdel(KEYS.requests, *gone)
    for entry in [*fields[2:], {"account": "account1"}]:
        scene.xadd(KEYS.requests, entry)
    time.sleep(0.005)  # w1's entries idle past the 1 ms of the call


def pump_call(client, settings, _):
    done = codec.summary(codec.pump(client, settings, KEYS, "w2", 25, reclaim_idle_ms=1))
    assert (done.reclaimed, done.read, done.approved, done.refused) == (2, 8, 2, 0), done
    assert done.dead == {"entry_deleted": 1, "missing_field": 1}, done
    assert done.operations == {("reserve", "approved"): 2, ("extend", "approved"): 1, ("commit", "approved"): 1,
                               ("release", "approved"): 1}, done


def expire_call(client, settings, _):
    assert codec.expire_reservations(client, settings, KEYS) == 1


def trim_scene(scene, settings):
    ids = pending(scene, settings, [{"n": str(i)} for i in range(3)])
    scene.xack(KEYS.requests, settings.group, *ids)
    for i in range(200):
        scene.xadd(KEYS.results, {"n": str(i)})
    run(scene, ensure_group(KEYS.results, "billing"))
    scene.xreadgroup("billing", "b", {KEYS.results: ">"}, count=100)


def trim_call(client, settings, _):
    codec.trim_requests(client, settings, KEYS)
    codec.trim_results(client, settings.model_copy(update={"results_maxlen": 10, "results_groups": "billing"}), KEYS)
    codec.trim_results(client, settings.model_copy(update={"results_maxlen": 10}), KEYS)


def repair_scene(scene, settings):
    """A producer's XADD MAXLEN removed two entries no worker had read, then one pushed the
    ids to the last one possible; the workers settled what was left."""
    posted_before(scene, KEYS.deadletter)
    first = pending(scene, settings, [{"n": "1"}])
    scene.xadd(KEYS.requests, {"n": "2"})
    scene.xadd(KEYS.requests, {"n": "3"}, maxlen=0, approximate=False)
    scene.xadd(KEYS.requests, {"n": "4"}, id="18446744073709551615-18446744073709551615")
    rest = scene.xreadgroup(settings.group, "w1", {KEYS.requests: ">"})
    scene.xack(KEYS.requests, settings.group, *first, *[eid for _, messages in rest for eid, _ in messages])


def repair_call(client, settings, _):
    assert codec.repair(client, settings, KEYS) == (2, True)


def plans_scene(scene, settings):
    """account1 with a lot that has expired: a grant records its breakage first."""
    accounts(scene, settings)
    codec.grant(scene, settings, "account1", "gone", "money", 7, expires_in_ms=1)
    time.sleep(0.005)


def plans_call(client, settings, _):
    assert codec.set_plan(client, KEYS, "gold", {"sms": 1, "voice": 4, "data": 8}) == 1
    assert codec.assign_plan(client, settings, "account1", "gold") == "gold"
    assert codec.grant(client, settings, "account1", "promo", "money", 500, expires_in_ms=60_000).status == "granted"
    assert codec.grant(client, settings, "account1", "promo", "money", 500, expires_in_ms=60_000).status == "duplicate"


def accounts_call(client, settings, _):
    assert codec.set_balances(client, settings, [("account2", 10)]) == 1
    assert codec.top_up(client, settings, "account2", 5) == 15


@dataclass(frozen=True)
class Row:
    """Functions that run the same commands, the roles that call them, and how."""

    functions: tuple[str, ...]
    roles: tuple[str, ...]
    scene: Callable[[redis.Redis, Settings], object]
    call: Callable[[redis.Redis, Settings, object], None]

    @property
    def name(self) -> str:
        return " ".join(f"`{f}`" for f in self.functions)


ROWS = [
    Row(("charge", "reserve", "extend", "commit", "release"), ("authorizer", "gateway"), settle_scene, settle_call),
    Row(("pump",), ("worker",), pump_scene, pump_call),
    Row(("expire_reservations",), ("worker",), settle_scene, expire_call),
    Row(("trim",), ("maintainer",), trim_scene, trim_call),
    Row(("repair",), ("maintainer",), repair_scene, repair_call),
    Row(("set_balances", "top_up"), ("admin",), lambda scene, settings: None, accounts_call),
    Row(("set_plan", "assign_plan", "grant"), ("admin", "gateway"), plans_scene, plans_call),
]

# What each role's own code runs besides its functions: (command, key kind).
DIRECT = {
    "producer": {("xadd", "requests"), ("xlen", "requests"), ("xread", "reply:producer"), ("get", "partitions")},
    "authorizer": {("get", "partitions")},
    # charging serve (charging/app/http): submit (XADD, the backlog's XLEN), stored outcomes
    # and funds, outcome events (XREAD, or as a group of the results), the live page (what
    # charging status reads, and XINFO STREAM / XREVRANGE of the results).
    "gateway": {("xadd", "requests"), ("xlen", "requests"), ("xpending", "requests"), ("xinfo|groups", "requests"),
                ("xinfo|consumers", "requests"), ("hget", "balances"), ("hget", "held"), ("hvals", "held"),
                ("hlen", "reservations"), ("xlen", "results"), ("xread", "results"),
                ("xrevrange", "results"), ("xinfo|stream", "results"), ("xreadgroup", "results"),
                ("xack", "results"), ("xgroup|create", "results"), ("xlen", "deadletter"),
                ("hgetall", "deadletter:reasons"), ("get", "partitions")},
    "worker": {("xreadgroup", "requests"), ("xack", "requests"), ("xautoclaim", "requests"), ("xpending", "requests"),
               ("xlen", "requests"), ("xgroup|create", "requests"), ("xinfo|groups", "requests"),
               ("xinfo|consumers", "requests"), ("xlen", "results"), ("xlen", "deadletter"),
               ("hgetall", "deadletter:reasons"), ("hlen", "reservations"), ("hvals", "held"),
               ("get", "partitions")},
    "maintainer": {("xinfo|groups", "requests"), ("xinfo|consumers", "requests"), ("xgroup|delconsumer", "requests"),
                   ("get", "partitions"), ("set", "partitions")},
    "admin": {("hget", "balances"), ("hscan", "balances"), ("hget", "held"), ("hscan", "held"), ("hvals", "held"),
              ("hlen", "reservations"), ("xlen", "requests"), ("xinfo|groups", "requests"), ("xpending", "requests"),
              ("xinfo|consumers", "requests"), ("xlen", "results"), ("xread", "results"), ("xreadgroup", "results"),
              ("xack", "results"), ("xgroup|create", "results"), ("xlen", "deadletter"), ("xrange", "deadletter"),
              ("xrevrange", "deadletter"), ("hgetall", "deadletter:reasons"), ("get", "partitions")},
}
KEYLESS = {"producer": {"ping", "wait"}, "authorizer": {"ping", "wait", "time"},
           "gateway": {"ping", "wait", "time", "function|list"}, "worker": {"ping", "time"},
           "maintainer": {"ping", "time", "info", "function|load", "function|list"}, "admin": {"ping", "info"}}


# ---- measuring -------------------------------------------------------------------------------

@dataclass
class Run:
    fcalls: list[list[str]]  # the FCALLs as the client sent them
    inside: list[list[str]]  # every command the functions ran


_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r'\\(x[0-9a-fA-F]{2}|.)')
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b"}


def _unescape(arg: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m[1][1:], 16)) if m[1][0] == "x" and len(m[1]) == 3
                       else _ESCAPES.get(m[1], m[1]), arg)


def record(scene: redis.Redis, run: Callable[[], None]) -> Run:
    """Run run() with MONITOR on; MONITOR marks the commands a function runs with 'lua'."""
    marker = "end-of-run"
    recorded = Run([], [])
    with scene.monitor() as monitor:
        run()
        scene.echo(marker)
        while True:
            line = monitor.connection.read_response()
            line = line.decode() if isinstance(line, bytes) else line
            source, args = re.match(r"\S+ \[\d+ (\S+)\] (.*)", line).groups()
            args = [_unescape(a) for a in _ARG.findall(args)]
            if args == ["ECHO", marker]:
                return recorded
            if source == "lua":
                recorded.inside.append(args)
            elif args[0].upper() == "FCALL":
                recorded.fcalls.append(args)


def command_name(args: list[str]) -> str:
    name = args[0].lower()
    return f"{name}|{args[1].lower()}" if name in CONTAINERS else name


def keys_of(scene: redis.Redis, args: list[str]) -> list[str]:
    try:
        return [k.decode() if isinstance(k, bytes) else k for k in scene.command_getkeys(*args)]
    except redis.ResponseError:  # a command without keys
        return []


def kind_of(key: str) -> str:
    found = [kind for kind, pattern in KINDS.items() if fnmatchcase(key, pattern)]
    assert len(found) == 1, f"{key} is of no known kind (or of several): add it to KINDS and to deploy/users.acl"
    return found[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with acl_server(tmp_path_factory.mktemp("acl-needs")) as server:
        yield server


@pytest.fixture(scope="module")
def scene(server) -> redis.Redis:
    return root(server)


def fresh(scene: redis.Redis) -> None:
    scene.flushall()  # the keys, not the library


@pytest.fixture(scope="module")
def measured(server, scene) -> dict[str, Run]:
    settings = role(server, ROOT)
    runs = {}
    for row in ROWS:
        fresh(scene)
        given = row.scene(scene, settings)
        runs[row.name] = record(scene, lambda: row.call(scene, settings, given))
    return runs


def needs(scene: redis.Redis, run: Run) -> dict[str, set[str]]:
    """key kind -> the commands run on it (NO_KEY for commands without keys)."""
    found: dict[str, set[str]] = defaultdict(set)
    for args in run.inside:
        for key in keys_of(scene, args) or [None]:
            found[NO_KEY if key is None else kind_of(key)].add(command_name(args))
    return found


def dry_run(scene: redis.Redis, user: str, args: list[str]) -> str:
    answer = scene.execute_command("ACL", "DRYRUN", user, *args)
    return answer.decode() if isinstance(answer, bytes) else answer


# ---- the tests ---------------------------------------------------------------------------------

def test_every_function_of_the_library_is_measured():
    registered = set(re.findall(r"redis\.register_function\('(\w+)'", library_source()))
    assert registered == {f for row in ROWS for f in row.functions}


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.functions[0])
@pytest.mark.parametrize("user", ROLES)
def test_every_function_runs_under_the_roles_that_call_it_and_is_refused_to_the_others(server, scene, row, user):
    settings = role(server, ROOT)
    fresh(scene)
    given = row.scene(scene, settings)
    client = connect(role(server, user))
    if user in row.roles:
        row.call(client, role(server, user), given)
    else:
        with pytest.raises(redis.exceptions.NoPermissionError, match="fcall"):
            row.call(client, role(server, user), given)


def rule_to_add(scene: redis.Redis, args: list[str], answer: str) -> str:
    """What the role's line lacks for this command, from ACL DRYRUN's answer."""
    refused_key = re.search(r"access the '(.+)' key", answer)
    keys = [refused_key[1]] if refused_key else keys_of(scene, args)
    if args[0].upper() == "FCALL":
        return f"add ~{KINDS[kind_of(keys[0])]} to its selector with +fcall|{args[1]}"
    if not keys:
        return f"add +{command_name(args)} to its root rules"
    return f"add +{command_name(args)} to its selector for {KINDS[kind_of(keys[0])]}"


def test_every_command_a_function_runs_is_granted_to_the_roles_that_call_it(scene, measured):
    missing: dict[str, None] = {}  # each rule once, in order
    for row in ROWS:
        run = measured[row.name]
        for user in row.roles:
            for args in run.fcalls + run.inside:
                answer = dry_run(scene, user, args)
                if answer != "OK":
                    missing[f"{user} calls {row.name}, which runs {' '.join(args[:2])}: {answer} -> "
                            f"{rule_to_add(scene, args, answer)} in deploy/users.acl"] = None
    assert not missing, "\n".join(missing)


KEY_PROBES = {
    "get": "GET {k}", "set": "SET {k} x", "del": "DEL {k}", "unlink": "UNLINK {k}", "type": "TYPE {k}",
    "exists": "EXISTS {k}", "pexpire": "PEXPIRE {k} 1", "expire": "EXPIRE {k} 1", "persist": "PERSIST {k}",
    "move": "MOVE {k} 1", "dump": "DUMP {k}", "restore": "RESTORE {k} 0 x",
    "hget": "HGET {k} f", "hmget": "HMGET {k} f", "hset": "HSET {k} f 1", "hincrby": "HINCRBY {k} f 1", "hdel": "HDEL {k} f",
    "hgetall": "HGETALL {k}", "hscan": "HSCAN {k} 0", "hvals": "HVALS {k}", "hlen": "HLEN {k}",
    "zadd": "ZADD {k} 1 m", "zrem": "ZREM {k} m", "zrange": "ZRANGE {k} 0 1",
    "xadd": "XADD {k} * f v", "xlen": "XLEN {k}", "xrange": "XRANGE {k} - +", "xrevrange": "XREVRANGE {k} + -",
    "xread": "XREAD STREAMS {k} 0", "xreadgroup": "XREADGROUP GROUP g c STREAMS {k} >",
    "xack": "XACK {k} g 1-1", "xautoclaim": "XAUTOCLAIM {k} g c 0 0", "xclaim": "XCLAIM {k} g c 0 1-1",
    "xpending": "XPENDING {k} g", "xtrim": "XTRIM {k} MAXLEN 0", "xdel": "XDEL {k} 1-1", "xsetid": "XSETID {k} 1-1",
    "xgroup|create": "XGROUP CREATE {k} g 0", "xgroup|setid": "XGROUP SETID {k} g 0",
    "xgroup|destroy": "XGROUP DESTROY {k} g", "xgroup|delconsumer": "XGROUP DELCONSUMER {k} g c",
    "xgroup|createconsumer": "XGROUP CREATECONSUMER {k} g c", "xinfo|stream": "XINFO STREAM {k}",
    "xinfo|groups": "XINFO GROUPS {k}", "xinfo|consumers": "XINFO CONSUMERS {k} g",
}
# A concrete key of each kind, and the kinds it belongs to.
PROBE_KEYS = {KEYS.balances: {"balances"}, KEYS.held: {"held"}, KEYS.reservations: {"reservations"},
              KEYS.expiries: {"expiries"}, KEYS.holds: {"holds"}, KEYS.requests: {"requests"},
              KEYS.results: {"results"}, KEYS.reply("someone"): {"reply:*"},
              KEYS.reply("producer"): {"reply:*", "reply:producer"}, KEYS.deadletter: {"deadletter"},
              KEYS.deadletter_reasons: {"deadletter:reasons"}, "ch:partitions": {"partitions"},
              "other:{p0}:balances": set(), "ch-other:{p0}:requests": set()}
KEYLESS_PROBES = {
    "ping": ["PING"], "time": ["TIME"], "info": ["INFO"], "wait": ["WAIT", "0", "0"], "select": ["SELECT", "1"],
    "function|load": ["FUNCTION", "LOAD", "x"], "function|list": ["FUNCTION", "LIST"],
    "function|delete": ["FUNCTION", "DELETE", "charging"], "function|flush": ["FUNCTION", "FLUSH"],
    "function|restore": ["FUNCTION", "RESTORE", "x"], "eval": ["EVAL", "return 0", "0"],
    "script|load": ["SCRIPT", "LOAD", "return 0"], "config|get": ["CONFIG", "GET", "*"],
    "config|set": ["CONFIG", "SET", "appendonly", "no"], "flushall": ["FLUSHALL"], "flushdb": ["FLUSHDB"],
    "keys": ["KEYS", "*"], "scan": ["SCAN", "0"], "acl|setuser": ["ACL", "SETUSER", "x"], "acl|list": ["ACL", "LIST"],
    "shutdown": ["SHUTDOWN"], "monitor": ["MONITOR"], "debug": ["DEBUG", "SLEEP", "0"],
    "bgrewriteaof": ["BGREWRITEAOF"], "swapdb": ["SWAPDB", "0", "1"], "replicaof": ["REPLICAOF", "NO", "ONE"],
    "client|kill": ["CLIENT", "KILL", "ID", "1"],
}


def granted_by_design(scene, measured, user: str) -> set[tuple[str, str]]:
    """(command, key kind) the role needs: its functions' commands and its own code's."""
    pairs = set(DIRECT[user])
    for row in ROWS:
        if user in row.roles:
            pairs |= {(c, kind) for kind, commands in needs(scene, measured[row.name]).items() for c in commands}
    return pairs


@pytest.mark.parametrize("user", ROLES)
def test_each_role_is_granted_exactly_what_its_functions_and_its_code_need(scene, measured, user):
    """Every (command, key) a probe tries: allowed if and only if the role needs it."""
    by_design = granted_by_design(scene, measured, user)
    probes: list[tuple[str, list[str], bool]] = []
    for command, template in KEY_PROBES.items():
        for key, kinds in PROBE_KEYS.items():
            probes.append((f"{command} {key}", template.format(k=key).split(" "),
                           any((command, kind) in by_design for kind in kinds)))
    for command, args in KEYLESS_PROBES.items():
        probes.append((command, args, command in KEYLESS[user] or (command, NO_KEY) in by_design))
    for row in ROWS:
        fcall = measured[row.name].fcalls[0]
        for function in row.functions:
            probes.append((f"fcall {function}", ["FCALL", function, *fcall[2:]], user in row.roles))
    pipe = scene.pipeline(transaction=False)
    for _, args, _ in probes:
        pipe.execute_command("ACL", "DRYRUN", user, *args)
    wrong = [f"{what}: {'refused' if expected else 'allowed'}, but the role {'needs' if expected else 'does not need'} it"
             for (what, _, expected), answer in zip(probes, pipe.execute(raise_on_error=False))
             if (answer in (b"OK", "OK")) != expected]
    assert not wrong, f"{user}:\n" + "\n".join(wrong)


def documented_row(scene, measured, row: Row) -> str:
    found = needs(scene, measured[row.name])
    cells = [f"`{kind}`: {', '.join(sorted(c.upper().replace('|', ' ') for c in found[kind]))}"
             for kind in [*KINDS, NO_KEY] if kind in found]
    return f"| {row.name} | {', '.join(row.roles)} | {'; '.join(cells)} |"


def test_the_documented_table_of_what_each_function_runs_is_the_measured_one(scene, measured):
    text = section("What each function runs, per key")
    missing = [line for line in (documented_row(scene, measured, row) for row in ROWS) if line not in text]
    assert not missing, "the table in docs/security.md should have these rows:\n" + "\n".join(missing)
