"""The library is the only judge of a stream entry (lua/charging.lua judge_entry, run by
pump): for every entry, well formed or hostile, it must give the verdict the
schema gives (charging/schema.py parse_request, charging/tariff.py price, and the
partition rule): the same accept or refuse, the same reason. An entry it accepts must be
the request the schema reads, fingerprint included: replayed through the synchronous path
(codec.settle) it is answered as a duplicate, never as an idempotency conflict."""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from charging import codec
from charging.keys import Keys, partition_of
from charging.plan import run
from charging.schema import EntryFields, Invalid, parse_request
from charging.settings import Settings
from charging.streams import ensure_group
from charging.tariff import price
from tests.documents import DOCS
from tests.test_bad_entries import BAD_ENTRIES

PARTITIONS = 4
ACCOUNTS = [f"acct{i}" for i in range(12)]
ENTRIES_PER_CALL = 25
# Small limits, so that units x price goes over max_amount and ttls over their maximum.
LIMITS = {"partitions": PARTITIONS, "max_units": 1000, "max_amount": 5000, "max_reservation_ttl_s": 3600,
          "reservation_ttl_s": 300}

# ---- entries, well formed and hostile -------------------------------------------------------

NOT_DIGITS = ["0", "00", "-3", "+3", "1e3", "0x10", " 5", "5 ", "1.5", "NaN", "inf", "", "\u0663", "1_000",
              "9" * 20, "9" * 21, "0007", "0" * 20 + "1"]
NOT_TEXT = ["", "a b", "x" * 65, "é", "acct1/x", "acct1\n", "\x00", "x" * 129]
NOT_UTF8 = [b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xf0\x9f\x98"]
UTF8 = ["é€😀".encode(), "\U0010ffff".encode(), b"a" * 256]
OPS = ["charge", "reserve", "commit", "extend", "release", "grant"]
LOTS = ["b1", "promo.2", "main", "a b", "x" * 65, "", "é"]
# Far from now either way: the schema judges an expiry by this clock, the library by Redis's.
EXPIRES_AT = st.sampled_from(["1000", "1700000000000", "4000000000000", "99999999999999", "100000000000001"])


def number(high: int) -> st.SearchStrategy[str]:
    return st.one_of(st.integers(1, high).map(str), st.integers(1, 9).map(lambda n: "0" * n + "5"),
                     st.integers(high + 1, 10**17).map(str), st.sampled_from(NOT_DIGITS))


def reply_to(account: str, settings: Settings) -> st.SearchStrategy[str]:
    own = Keys(settings.namespace, partition_of(account, PARTITIONS))
    other = Keys(settings.namespace, (own.partition + 1) % PARTITIONS)
    return st.sampled_from([own.reply("p1"), own.reply("p-_9"), other.reply("p1"), own.reply("a.b"), own.reply(""),
                            own.reply("x" * 65), "other:key", own.reply("p1") + "\n"])


@st.composite
def request(draw, settings: Settings) -> dict[str, str]:
    """A well-formed request of some op (a charge without op most often)."""
    op = draw(st.sampled_from([None, None, *OPS]))
    account = draw(st.sampled_from(ACCOUNTS))
    rid = f"r{draw(st.integers(0, 40))}"
    fields = {"request_id": rid}
    if op:
        fields["op"] = op
    if op in ("commit", "extend", "release"):
        fields["reservation"] = f"{account}/r{draw(st.integers(0, 40))}"
        if draw(st.booleans()):
            fields["account"] = account
    else:
        fields["account"] = account
    if op == "grant":
        fields["lot"] = draw(st.sampled_from(LOTS[:2]))
        if draw(st.booleans()):
            fields["service"] = draw(st.sampled_from(["sms", "voice", "data"]))
        fields["units" if "service" in fields and draw(st.booleans()) else "amount"] = str(draw(st.integers(1, 400)))
        expiry = draw(st.sampled_from([None, "expires_at", "expires_in"]))
        if expiry:
            fields[expiry] = "4000000000000" if expiry == "expires_at" else str(draw(st.integers(1, 10**6)))
    elif op in (None, "charge", "reserve") and draw(st.booleans()):
        fields |= {"service": draw(st.sampled_from(["sms", "voice", "data"])), "units": str(draw(st.integers(1, 600)))}
    elif op != "release":
        fields[draw(st.sampled_from(["amount", "units"])) if op in ("commit", "extend") else "amount"] = \
            str(draw(st.integers(1, 400)))
    if op in ("reserve", "extend") and draw(st.booleans()):
        fields["ttl"] = str(draw(st.integers(1, 3600)))
    if draw(st.booleans()):
        fields["reply_to"] = Keys(settings.namespace, partition_of(account, PARTITIONS)).reply("p1")
    if draw(st.booleans()):
        fields["submitted_at"] = str(draw(st.integers(0, 2 * 10**12)))
    return fields


@st.composite
def entry(draw, settings: Settings) -> list[tuple[bytes, bytes]]:
    """A request, then up to four changes that may spoil it: a field dropped or given a
    hostile value (several at once, too), a field added (unknown, of another op, or a
    repeated name), names and values too long or not UTF-8, too many fields."""
    fields = draw(request(settings))
    pairs = [(k.encode(), v.encode()) for k, v in fields.items()]
    account = fields.get("account") or fields["reservation"].split("/")[0]
    values = {"op": st.sampled_from([*OPS, "refund", "", "CHARGE", "charge "]),
              "request_id": st.sampled_from(NOT_TEXT), "account": st.sampled_from([*ACCOUNTS, *NOT_TEXT]),
              "service": st.sampled_from(["sms", "voice", "data", "mms", "SMS", ""]),
              "units": number(1000), "amount": number(5000), "ttl": number(3600), "submitted_at": number(10**14),
              "reservation": st.sampled_from([f"{account}/r1", "acct1/r1", "r1", "a b/r1", "acct1/", "/r1",
                                              "acct1/" + "x" * 129, "acct1/r 1", "acct1/r/1"]),
              "reply_to": reply_to(account, settings), "lot": st.sampled_from(LOTS),
              "expires_at": st.one_of(EXPIRES_AT, number(10**14)), "expires_in": number(315_360_000)}
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 2, 3, 4]))):
        change = draw(st.sampled_from(["drop", "value", "value", "number", "number", "spoil", "spoil", "add",
                                       "repeat", "name", "bytes", "many"]))
        if change == "drop" and pairs:
            pairs.pop(draw(st.integers(0, len(pairs) - 1)))
        elif change in ("value", "number", "add"):
            name = draw(st.sampled_from(["units", "amount", "ttl", "submitted_at", "expires_at", "expires_in"]
                                        if change == "number"
                                        else sorted(values)))
            pairs = pairs if change == "add" else [p for p in pairs if p[0] != name.encode()]
            pairs.append((name.encode(), draw(values[name]).encode()))
        elif change == "spoil":  # several fields at once: which one the judges report first
            for name in draw(st.lists(st.sampled_from(sorted(values)), min_size=2, max_size=4, unique=True)):
                pairs = [p for p in pairs if p[0] != name.encode()] + [(name.encode(), draw(values[name]).encode())]
        elif change == "repeat" and pairs:
            pairs.insert(draw(st.integers(0, len(pairs))), draw(st.sampled_from(pairs)))
        elif change == "name":
            pairs.insert(draw(st.integers(0, len(pairs))),
                         (draw(st.sampled_from([b"unit", b"Account", b"x" * 257, *NOT_UTF8, *UTF8])), b"1"))
        elif change == "bytes" and pairs:
            at = draw(st.integers(0, len(pairs) - 1))
            pairs[at] = (pairs[at][0], draw(st.sampled_from([*NOT_UTF8, *UTF8, b"x" * 257, b"x" * 5000])))
        elif change == "many":
            pairs += [(f"x{i}".encode(), b"1") for i in range(draw(st.integers(1, 16)))]
    return pairs or [(b"account", account.encode())]  # XADD takes no entry without a pair


# ---- both judges ------------------------------------------------------------------------------

def schema_verdict(pairs, partition: int, settings: Settings):
    """(reason, None) for an entry the schema refuses, else (None, the request)."""
    try:
        request = parse_request(EntryFields([part for pair in pairs for part in pair]), settings)
        if partition_of(request.account, settings.partitions) != partition:
            return "wrong_partition", None
        price(request, settings)
        return None, request
    except Invalid as invalid:
        return invalid.reason, None


@dataclass(frozen=True)
class Verdict:
    """What the library did with one entry, read from what Redis holds: its dead letter's
    reason, or the outcome it posted (status, reason, charged, balance)."""

    entry_id: str
    dead: str | None
    posted: dict | None


def library_verdicts(client, settings: Settings, keys: Keys, consumer: str = "w1") -> list[Verdict]:
    """pump the partition, ENTRIES_PER_CALL entries a call, until it reads nothing; then the
    verdict on every entry of its stream, in order, from its dead letter or its outcome."""
    while (done := codec.summary(codec.pump(client, settings, keys, consumer, ENTRIES_PER_CALL))).read:
        assert done.refused == 0, done
    dead = {f[b"entry_id"].decode(): f[b"error"].decode() for _, f in client.xrange(keys.deadletter)}
    posted = {f[b"entry_id"].decode(): f for _, f in client.xrange(keys.results)}
    ids = [eid.decode() for eid, _ in client.xrange(keys.requests)]
    ids += sorted(set(dead) - set(ids), key=lambda eid: tuple(map(int, eid.split("-"))))  # deleted ones
    return [Verdict(eid, dead.get(eid), posted.get(eid)) for eid in ids]


def compare(client, settings: Settings, placed: dict[int, list]) -> Counter:
    """XADD each partition's entries raw (a repeated name kept), read them, settle them, and
    compare both verdicts entry by entry. Returns how many of each verdict ('settled' for an
    accepted entry); fails on the first difference."""
    seen: Counter = Counter()
    for partition, entries in placed.items():
        keys = Keys(settings.namespace, partition)
        run(client, ensure_group(keys.requests, settings.group))
        for pairs in entries:
            client.execute_command("XADD", keys.requests, "*", *[part for pair in pairs for part in pair])
        verdicts = library_verdicts(client, settings, keys)
        assert client.xpending(keys.requests, settings.group)["pending"] == 0
        assert len(verdicts) == len(entries)
        for pairs, verdict in zip(entries, verdicts):
            reason, request = schema_verdict(pairs, partition, settings)
            assert (verdict.dead is None) != (verdict.posted is None), (pairs, verdict)
            assert verdict.dead == reason, \
                f"{pairs}: the library says {verdict.dead or 'settled'}, the schema {reason or 'settled'}"
            seen[reason or "settled"] += 1
            if request is not None:
                same_request(client, settings, request, verdict.posted)
    return seen


def same_request(client, settings: Settings, request, posted: dict) -> None:
    """What the library settled is the request the schema read: the outcome it posted, and
    a synchronous replay of the request answered from the record it left."""
    assert posted[b"request_id"].decode() == request.request_id and posted[b"account"].decode() == request.account
    assert posted[b"submitted_at"].decode() == str(request.submitted_at or "")
    if request.op == "grant":  # settled through the stream only: no synchronous replay
        assert (posted[b"op"].decode(), posted[b"lot"].decode()) == ("grant", request.lot)
        return
    if request.op != "charge":
        assert (posted[b"op"].decode(), posted[b"reservation"].decode()) == (request.op, request.reservation_id)
    if posted[b"reason"] == b"idempotency_conflict":
        return  # another entry of the request id was settled first: its record is not this one's
    again = codec.settled(codec.settle(client, settings, request, price(request, settings)))
    assert again.duplicate and again.reason != "idempotency_conflict", (request, again)
    assert (again.status, again.reason, str(again.charged), str(again.balance)) == \
        tuple(posted[name].decode() for name in (b"status", b"reason", b"charged", b"balance"))


def limited(settings: Settings, tag: str) -> Settings:
    return settings.model_copy(update={**LIMITS, "namespace": f"{settings.namespace}{tag}"})


TALLY: Counter = Counter()  # every verdict compared, over the whole run (pytest -s prints it)
EXAMPLES = itertools.count()  # a namespace per example: a failed one leaves its entries behind


@hypothesis_settings(max_examples=80, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                            HealthCheck.data_too_large])
@given(data=st.data())
def test_the_library_judges_every_entry_as_the_schema_does(client, settings, data):
    test_settings = limited(settings, f"h{next(EXAMPLES)}")
    codec.set_balances(client, test_settings, [(a, 2000) for a in ACCOUNTS])
    entries = data.draw(st.lists(entry(test_settings), min_size=20, max_size=40))
    placed: dict[int, list] = defaultdict(list)
    for pairs in entries:
        names = dict(pairs)
        account = names.get(b"account", b"").decode("utf-8", "replace")
        own = partition_of(account, PARTITIONS)
        placed[data.draw(st.sampled_from([own, own, own, own, (own + 1) % PARTITIONS]))].append(pairs)
    TALLY.update(compare(client, test_settings, placed))
    print(f"{sum(TALLY.values())} entries compared so far: {dict(TALLY)}")


# ---- every row of the dead-letter table ---------------------------------------------------------

GOOD = {"request_id": "r-row", "account": "acct1", "service": "sms", "units": "1"}
ROWS = [
    *[(fields, reason) for _, fields, reason in BAD_ENTRIES],
    ({"request_id": "r", "account": "acct1", "service": "data", "units": "600"}, "invalid_amount"),  # 6000 > 5000
    ([("request_id", "r"), ("amount", "1"), ("account", "acct1"), ("amount", "777")], "duplicate_field"),
    ([("request_id", "r"), ("amount", "1"), ("amount", "7"), (b"\xff", "1")], "invalid_encoding"),
    ({"request_id": "r", "account": "acct0", "amount": "5"}, "wrong_partition"),  # acct0 is not of partition 1's
    ({**GOOD, "units": "1000"}, "settled"),
    ({"op": "grant", "request_id": "g1", "account": "acct1", "lot": "main", "amount": "5"}, "invalid_lot"),
    ({"op": "grant", "request_id": "g2", "account": "acct1", "lot": "b", "amount": "5", "expires_at": "1000"},
     "invalid_expiry"),
    ({"op": "grant", "request_id": "g3", "account": "acct1", "lot": "b", "amount": "5", "expires_at": "4000000000000",
      "expires_in": "60"}, "invalid_expiry"),
    ({"op": "grant", "request_id": "g4", "account": "acct1", "lot": "b", "units": "5"}, "missing_field"),
    ({"op": "grant", "request_id": "g5", "account": "acct1", "lot": "b", "service": "sms", "units": "5",
      "expires_in": "60"}, "settled"),
]
REASONS_NOT_OF_FIELDS = {"entry_deleted", "max_deliveries", "id_in_future", "entries_removed"}


def encoded(fields) -> list[tuple[bytes, bytes]]:
    pairs = fields.items() if isinstance(fields, dict) else fields
    return [tuple(p if isinstance(p, bytes) else str(p).encode() for p in pair) for pair in pairs]


def test_every_reason_of_the_dead_letter_table_is_judged_as_the_schema_judges_it(client, settings):
    settings = limited(settings, "rows")
    codec.set_balances(client, settings, [("acct1", 100)])
    placed = {partition_of("acct1", PARTITIONS): [encoded(fields) for fields, _ in ROWS]}
    seen = compare(client, settings, placed)

    assert {reason for _, reason in ROWS} == set(seen)
    assert dead_letter_reasons() - REASONS_NOT_OF_FIELDS - set(seen) == set(), "rows no entry here checks"


def dead_letter_reasons() -> set[str]:
    """The reason codes of docs/wire-format.md's dead-letter table (its first column)."""
    text = (DOCS / "wire-format.md").read_text()
    table = text[text.index("| `error` | cause |"):].split("\n\n", 1)[0]
    return {code for line in table.splitlines()[2:] for code in re.findall(r"`(\w+)`", line.split(" | ")[0])}


def test_deleted_entries_are_dead_lettered_entry_deleted(client, settings):
    settings = limited(settings, "del")
    keys = Keys(settings.namespace, partition_of("acct1", PARTITIONS))
    run(client, ensure_group(keys.requests, settings.group))
    entry_id = client.xadd(keys.requests, GOOD).decode()
    client.xreadgroup(settings.group, "w1", {keys.requests: ">"})  # pending to w1
    client.xdel(keys.requests, entry_id)
    _, messages = client.xreadgroup(settings.group, "w1", {keys.requests: "0"})[0]
    assert messages[0][0].decode() == entry_id and not messages[0][1]  # its id, no pair

    verdict, = library_verdicts(client, settings, keys)

    assert (verdict.entry_id, verdict.dead) == (entry_id, "entry_deleted")
    assert client.hgetall(keys.deadletter_reasons) == {b"entry_deleted": b"1"}


def test_an_entry_delivered_too_often_is_dead_lettered_with_the_workers_detail(client, settings):
    settings = limited(settings, "max").model_copy(update={"max_deliveries": 2})
    keys = Keys(settings.namespace, partition_of("acct1", PARTITIONS))
    run(client, ensure_group(keys.requests, settings.group))
    entry_id = client.xadd(keys.requests, GOOD).decode()
    client.xreadgroup(settings.group, "w1", {keys.requests: ">"})  # delivered, never settled: a worker
    client.xreadgroup(settings.group, "w1", {keys.requests: "0"})  # that died, twice

    verdict, = library_verdicts(client, settings, keys)  # its delivery max_deliveries + 1

    assert (verdict.entry_id, verdict.dead) == (entry_id, "max_deliveries")
    (_, letter), = client.xrange(keys.deadletter)
    assert letter[b"detail"].decode() == f"delivered {settings.max_deliveries + 1} times without being settled"
    assert letter[b"request_id"] == b"r-row" and letter[b"entry_id"].decode() == entry_id
    assert client.xpending(keys.requests, settings.group)["pending"] == 0


def test_an_entry_whose_id_is_ahead_of_the_server_clock_is_dead_lettered_id_in_future(client, settings):
    settings = limited(settings, "fut")
    keys = Keys(settings.namespace, partition_of("acct1", PARTITIONS))
    run(client, ensure_group(keys.requests, settings.group))
    ahead_ms = settings.max_clock_skew_ms + 3_600_000
    entry_id = client.xadd(keys.requests, GOOD, id=f"{int(time.time() * 1000) + ahead_ms}-0").decode()

    verdict, = library_verdicts(client, settings, keys)

    assert (verdict.entry_id, verdict.dead) == (entry_id, "id_in_future")
    (_, letter), = client.xrange(keys.deadletter)
    assert re.fullmatch(rf"entry id {entry_id} is \d+ ms ahead of the Redis clock; producers must let Redis "
                        r"choose the id \(XADD \*\)", letter[b"detail"].decode())


class Recorder:
    """A target that keeps the FCALL a codec call queues instead of sending it."""

    def fcall(self, *args):
        self.args = list(args)


def test_a_call_with_a_header_out_of_range_is_refused_before_anything_is_written(client, settings):
    settings = limited(settings, "hdr")
    keys = Keys(settings.namespace, 1)
    run(client, ensure_group(keys.requests, settings.group))
    client.xadd(keys.requests, {"request_id": "r", "account": "acct0", "amount": "5"})  # wrong_partition
    call = Recorder()
    codec.pump(call, settings, keys, "w1", ENTRIES_PER_CALL)
    header = 2 + len(codec.entries_keys(keys)) + 4  # the function's name, the key count, the keys, pump's own four
    for at, value, reason in ((0, "", "invalid_group"), (4, "1", "invalid_partition"), (3, "2", "invalid_partition"),
                              (7, "0", "invalid_price"), (9, "1e3", "invalid_max_units"),
                              (10, "0", "invalid_max_amount"), (12, "3601", "invalid_reservation_ttl"),
                              (14, "999", "invalid_max_skew")):
        args = [*call.args[:header + at], value, *call.args[header + at + 1:]]
        try:
            client.fcall(*args)
            raise AssertionError(f"{reason}: accepted")
        except redis.ResponseError as exc:
            assert reason in str(exc)
    assert client.xlen(keys.deadletter) == 0 and client.xinfo_groups(keys.requests)[0]["consumers"] == 0  # nothing read
