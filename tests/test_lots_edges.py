"""Edge states of plans and credit lots that a review of the change reproduced before it
landed, each now refused or answered as docs/plans-and-lots.md says (tests/test_model.py
checks the same rules after every step of random sequences)."""

from __future__ import annotations

import time

import pytest
import redis

from charging import codec
from charging.keys import keys_of
from tests.test_trusts_nothing import pending_to_w0, pump, refused, snapshot


def test_an_extend_in_units_paid_by_a_bundle_cannot_take_a_reservation_past_the_limit(client, settings):
    """An extend in units a bundle pays needs no money, so nothing bounded units x price: the
    library wrote a reservation of 1,000,001,000,000,000 it then refused to read, and every
    later call on the account failed (corrupt_reservation)."""
    codec.set_balances(client, settings, [("u", 0)])
    codec.set_plan(client, keys_of("u", settings), "pricey", {"sms": 10**9, "voice": 1, "data": 1})
    codec.assign_plan(client, settings, "u", "pricey")
    codec.grant(client, settings, "u", "bundle", "units", 3 * 10**6, "sms")
    keys = pending_to_w0(client, settings,
                         {"op": "reserve", "request_id": "r1", "account": "u", "service": "sms", "units": "1"},
                         {"op": "extend", "request_id": "e1", "reservation": "u/r1", "units": "1000000"},
                         {"op": "release", "request_id": "x1", "reservation": "u/r1"})
    assert pump(client, settings, keys).operations == {
        ("reserve", "approved"): 1, ("extend", "invalid_amount"): 1, ("release", "approved"): 1}


def test_a_breakage_total_past_the_limit_of_a_balance_does_not_lock_the_account(client, settings, producer):
    """Breakage adds up over an account's life: two lots of 6 x 10^14 that expire one after
    the other made a total the library then refused to read (corrupt_wallet on every call)."""
    codec.set_balances(client, settings, [("a", 0)])
    for lot in ("p0", "p1"):
        codec.grant(client, settings, "a", lot, "money", 6 * 10**14, expires_in_ms=1)
        time.sleep(0.005)
        assert producer.authorize({"request_id": f"c-{lot}", "account": "a", "amount": 1}).reason == "insufficient_funds"
    assert codec.wallet(client.hget(keys_of("a", settings).wallets, "a")).breakage == 12 * 10**14
    assert producer.authorize({"request_id": "c", "account": "a", "amount": 1}).reason == "insufficient_funds"


def test_each_breakage_event_has_a_request_id_of_its_own(client, settings, producer):
    """A lot pinned by a reservation when it expires posts its breakage twice: at the expiry,
    and when the reservation gives its part back. Both events had one request id."""
    codec.set_balances(client, settings, [("a", 0)])
    codec.grant(client, settings, "a", "promo", "money", 100, expires_in_ms=300)
    producer.reserve({"request_id": "r", "account": "a", "amount": 30, "ttl": 60})
    time.sleep(0.35)
    producer.authorize({"request_id": "c", "account": "a", "amount": 1})  # records the unpinned 70
    producer.release({"reservation": "a/r"})  # the 30 go back to a lot that has expired
    events = [f for _, f in client.xrange(keys_of("a", settings).results) if f.get(b"op") == b"expire"]
    assert [int(f[b"breakage"]) for f in events] == [70, 30]
    assert len({f[b"request_id"] for f in events}) == 2


def test_a_lot_id_granted_again_after_its_lot_expired_grants_a_new_lot(client, settings, producer):
    """A monthly bundle granted under the same id and content: the expired lot was still
    stored (no call had recorded its breakage), so the new grant was a duplicate and granted
    nothing."""
    codec.set_balances(client, settings, [("a", 0)])
    codec.grant(client, settings, "a", "monthly", "units", 100, "sms", expires_in_ms=50)
    time.sleep(0.1)
    assert codec.grant(client, settings, "a", "monthly", "units", 100, "sms", expires_in_ms=50).status == "granted"
    assert producer.authorize({"request_id": "c", "account": "a", "service": "sms", "units": 1}).draws == "monthly:1u"
    wallet = codec.wallet(client.hget(keys_of("a", settings).wallets, "a"))
    assert (wallet.breakage_units["sms"], [lot.left for lot in wallet.lots]) == (100, [99])


def test_a_grant_retried_after_its_lot_expired_grants_nothing(client, settings):
    """The retry of a grant whose lot has expired meanwhile: refused (its expiry is past) and
    writes nothing; the sweep then records the lot's breakage once. Nothing is granted twice."""
    codec.set_balances(client, settings, [("a", 0)])
    until = int(time.time() * 1000) + 200
    assert codec.grant(client, settings, "a", "flash", "money", 5, expires_at=until).status == "granted"
    time.sleep(0.25)
    for _ in range(2):
        with pytest.raises(redis.ResponseError, match="invalid_expiry"):
            codec.grant(client, settings, "a", "flash", "money", 5, expires_at=until)
    keys = keys_of("a", settings)
    assert [lot.left for lot in codec.wallet(client.hget(keys.wallets, "a")).lots] == [5]
    codec.expire_reservations(client, settings, keys)
    assert codec.wallet(client.hget(keys.wallets, "a")) == codec.Wallet(breakage=5, breakage_units=dict.fromkeys(
        ("sms", "voice", "data"), 0))


@pytest.mark.parametrize("forge", [
    lambda w: w.replace("\x1epromo\x1fmoney", "\x1emain\x1fmoney"),  # a lot named main
    lambda w: w.replace("\x1f100\x1f100\x1f", "\x1f100\x1f150\x1f"),  # more left than granted
    lambda w: w.replace("\x1f100\x1f30\x1f", "\x1f100\x1f70\x1f"),  # held that no reservation pins
])
def test_a_wallet_the_library_did_not_write_is_refused(client, settings, producer, forge):
    keys = keys_of("a", settings)
    codec.set_balances(client, settings, [("a", 100)])
    codec.grant(client, settings, "a", "promo", "money", 100)
    producer.reserve({"request_id": "r", "account": "a", "amount": 30})
    client.hset(keys.wallets, "a", forge(client.hget(keys.wallets, "a").decode()))
    before = snapshot(client, settings)
    assert "corrupt_wallet" in refused(lambda: producer.authorize({"request_id": "c", "account": "a", "amount": 30}))
    assert snapshot(client, settings) == before


@pytest.mark.parametrize("forge", [
    lambda r: r.replace("\x1f60\x1f", "\x1f61\x1f", 1),  # an amount its draws do not make
    lambda r: r.replace("\x1fvoice\x1f", "\x1fdata\x1f"),  # units of a bundle of another service
])
def test_a_reservation_the_library_did_not_write_is_refused(client, settings, producer, forge):
    keys = keys_of("a", settings)
    codec.set_balances(client, settings, [("a", 0)])
    codec.grant(client, settings, "a", "minutes", "units", 100, "voice")
    held = producer.reserve({"request_id": "r", "account": "a", "service": "voice", "units": 12})
    assert (held.reserved, held.draws) == (12 * settings.tariff["voice"], "minutes:12u")
    packed = client.hget(keys.reservations, "a/r").decode()
    client.hset(keys.reservations, "a/r", forge(packed.replace(f"\x1f{held.reserved}\x1f", "\x1f60\x1f", 1)))
    before = snapshot(client, settings)
    assert "corrupt_" in refused(lambda: producer.commit({"reservation": "a/r", "units": 12}))
    assert snapshot(client, settings) == before


def test_a_commit_takes_what_lots_pinned_before_the_main_balance(client, settings, producer):
    """An extend's second pin of the main balance merged into the first one's place, so a
    commit took main balance while a promotion pinned later went back unspent."""
    codec.set_balances(client, settings, [("a", 100)])
    codec.grant(client, settings, "a", "promo1", "money", 5, expires_in_ms=60_000)
    producer.reserve({"request_id": "r", "account": "a", "amount": 10})
    codec.grant(client, settings, "a", "promo2", "money", 3, expires_in_ms=30_000)
    producer.extend({"reservation": "a/r", "amount": 10})
    done = producer.commit({"reservation": "a/r", "amount": 17})
    assert done.draws == "promo1:5,main:9,promo2:3"
    assert client.hget(keys_of("a", settings).balances, "a") == b"91"
