"""Plans and credit lots from the command line (docs/plans-and-lots.md): `charging plans`,
`accounts set-plan`, `accounts grant` and what `accounts show` says, run as a user types
them; every bad input one line on stderr and exit 2, with nothing written."""

from __future__ import annotations

import json
import time

import pytest

from charging import codec
from charging.app import plans
from charging.keys import all_partitions
from charging.plan import run
from charging.connection import connect
from tests.conftest import cli

GOLD = ("--sms", "1", "--voice", "4", "--data", "8")


def show(settings, account: str = "account1") -> dict:
    return json.loads(cli(settings, "accounts", "show", account, "--json").stdout)


def test_a_plan_is_set_on_every_partition_and_listed(settings):
    wide = settings.model_copy(update={"partitions": 4})
    client = connect(wide)

    made = cli(wide, "plans", "set", "gold", *GOLD, "--json")
    again = cli(wide, "plans", "set", "gold", "--sms", "2", "--voice", "4", "--data", "8")

    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout) == {"plan": "gold", "sms": 1, "voice": 4, "data": 8, "created": True}
    assert (again.returncode, again.stdout) == (0, "plan gold set: sms=2 voice=4 data=8\n")
    assert all(client.hexists(keys.plans, "gold") for keys in all_partitions(wide.namespace, 4))
    listed = json.loads(cli(wide, "plans", "list", "--json").stdout)
    assert listed == [{"plan": "gold", "sms": 2, "voice": 4, "data": 8, "partial": False}]


def test_a_plan_set_half_way_is_listed_partial_until_set_again(settings):
    wide = settings.model_copy(update={"partitions": 3})
    client = connect(wide)
    cli(wide, "plans", "set", "silver", "--sms", "2", "--voice", "6", "--data", "9")
    # A change that stopped after the first partition: only partition 0 has the new prices.
    codec.set_plan(client, all_partitions(wide.namespace, 3)[0], "silver", {"sms": 3, "voice": 6, "data": 9})

    partial = cli(wide, "plans", "list")
    assert "partial: set it again" in partial.stdout

    cli(wide, "plans", "set", "silver", "--sms", "3", "--voice", "6", "--data", "9")
    assert json.loads(cli(wide, "plans", "list", "--json").stdout)[0]["partial"] is False


@pytest.mark.parametrize("prices", [("--sms", "1.5"), ("--sms", "-1"), ("--sms", "0"), ("--sms", "1e3"),
                                    ("--sms", "10000000000000000")])
def test_a_bad_price_is_refused_in_one_line_with_exit_2(settings, client, prices):
    given = dict(zip(GOLD[::2], GOLD[1::2])) | {prices[0]: prices[1]}
    refused = cli(settings, "plans", "set", "gold", *(x for pair in given.items() for x in pair))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "invalid_price" in refused.stderr
    assert json.loads(cli(settings, "plans", "list", "--json").stdout) == []


def test_default_and_a_malformed_name_are_no_plans_to_set(settings):
    for name in ("default", "bad/name"):
        refused = cli(settings, "plans", "set", name, *GOLD)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, (name, refused.stderr)


def test_an_account_goes_on_a_plan_and_off_it(settings):
    cli(settings, "accounts", "reset", "--count", "1", "--balance", "100")
    cli(settings, "plans", "set", "gold", *GOLD)

    assert cli(settings, "accounts", "set-plan", "account1", "gold").stdout == "account1: plan gold\n"
    assert show(settings)["plan"] == "gold"
    assert cli(settings, "authorize", "--account", "account1", "--service", "voice", "--units", "2",
               "--json").returncode == 0
    assert show(settings)["balance"] == 92  # gold's 4 a minute, not the tariff's 5

    assert cli(settings, "accounts", "set-plan", "account1", "default").returncode == 0
    assert show(settings)["plan"] == "default"


def test_set_plan_refuses_an_unknown_plan_with_2_and_an_unknown_account_with_1(settings):
    cli(settings, "accounts", "reset", "--count", "1")
    cli(settings, "plans", "set", "gold", *GOLD)
    unknown_plan = cli(settings, "accounts", "set-plan", "account1", "platinum")
    unknown_account = cli(settings, "accounts", "set-plan", "ghost", "gold")
    assert unknown_plan.returncode == 2 and "unknown_plan" in unknown_plan.stderr
    assert (unknown_account.returncode, unknown_account.stderr) == (1, "error: unknown account 'ghost'\n")
    assert show(settings)["plan"] == "default"


def test_a_grant_is_idempotent_by_lot_id(settings):
    cli(settings, "accounts", "reset", "--count", "1", "--balance", "10")
    grant = ("accounts", "grant", "account1", "--id", "promo", "--amount", "500", "--expires-in", "30d", "--json")

    first = cli(settings, *grant)
    again = cli(settings, *grant)
    other = cli(settings, "accounts", "grant", "account1", "--id", "promo", "--amount", "900")

    assert first.returncode == 0, first.stderr
    granted, duplicate = json.loads(first.stdout), json.loads(again.stdout)
    assert granted["status"] == "granted" and duplicate["status"] == "duplicate"
    assert granted["left"] == duplicate["left"] == 500
    # The server counted the 30 days from the first grant: the replay names the same expiry.
    assert duplicate["expires_at"] == granted["expires_at"]
    assert abs(granted["expires_at"] - (time.time() * 1000 + 30 * 86_400_000)) < 60_000
    assert other.returncode == 1 and "idempotency_conflict" in other.stderr and other.stderr.count("\n") == 1
    assert show(settings)["balance"] == 510


def test_units_of_a_service_and_scoped_money_are_shown_with_their_scope(settings):
    cli(settings, "accounts", "reset", "--count", "1", "--balance", "10")
    assert cli(settings, "accounts", "grant", "account1", "--id", "sms100", "--units", "100", "--service", "sms",
               "--expires-at", "2099-01-31T00:00:00Z").returncode == 0
    assert cli(settings, "accounts", "grant", "account1", "--id", "voice-pack", "--amount", "50",
               "--service", "voice").returncode == 0

    shown = cli(settings, "accounts", "show", "account1").stdout.splitlines()
    data = show(settings)

    assert shown == ["account1: 60 (held 0, available 60)",
                     "  lot sms100: 100 of 100 left (held 0), sms units, expires 2099-01-31T00:00:00Z",
                     "  lot voice-pack: 50 of 50 left (held 0), money, voice only"]
    assert [lot["lot"] for lot in data["lots"]] == ["sms100", "voice-pack"]
    assert data["lots"][0] | {"expires_at": 0} == {"lot": "sms100", "kind": "units", "service": "sms",
                                                   "granted": 100, "left": 100, "held": 0, "expires_at": 0,
                                                   "expired": False}
    assert data["breakage"] == {}


def test_an_expired_lot_is_shown_expired_until_its_breakage_is_recorded(settings):
    cli(settings, "accounts", "reset", "--count", "1", "--balance", "10")
    cli(settings, "accounts", "grant", "account1", "--id", "flash", "--amount", "30", "--expires-in", "1500ms")
    assert show(settings)["balance"] == 40
    time.sleep(1.6)

    stored = show(settings)
    assert stored["balance"] == 10 and stored["lots"][0]["expired"] is True
    assert ", expired " in cli(settings, "accounts", "show", "account1").stdout

    # The first call on the account records the breakage and drops the lot.
    cli(settings, "authorize", "--account", "account1", "--amount", "1")
    after = show(settings)
    assert (after["lots"], after["breakage"], after["balance"]) == ([], {"money": 30}, 9)
    assert "  breakage: money=30" in cli(settings, "accounts", "show", "account1").stdout


BAD_GRANTS = [
    (["--id", "p1", "--amount", "1.5"], "invalid_amount"),
    (["--id", "p1", "--amount", "-5"], "invalid_amount"),
    (["--id", "p1", "--amount", "0"], "invalid_amount"),
    (["--id", "p1", "--amount", "99999999999999999999"], "invalid_amount"),
    (["--id", "p1", "--units", "2.5", "--service", "sms"], "invalid_units"),
    (["--id", "p1", "--units", "10"], "missing_service"),
    (["--id", "p1", "--units", "10", "--service", "fax"], "unknown_service"),
    (["--id", "p1", "--amount", "10", "--units", "10", "--service", "sms"], "invalid_kind"),
    (["--id", "p1"], "invalid_kind"),
    (["--id", "main", "--amount", "10"], "invalid_lot"),
    (["--id", "no/slash", "--amount", "10"], "invalid_lot"),
    (["--id", "p1", "--amount", "10", "--expires-at", "2020-01-01T00:00:00Z"], "invalid_expiry"),
    (["--id", "p1", "--amount", "10", "--expires-at", "2099-01-01T00:00:00"], "invalid_expiry"),
    (["--id", "p1", "--amount", "10", "--expires-in", "30 days"], "invalid_expiry"),
    (["--id", "p1", "--amount", "10", "--expires-in", "0s"], "invalid_expiry"),
    (["--id", "p1", "--amount", "10", "--expires-in", "1d", "--expires-at", "2099-01-01T00:00:00Z"],
     "--expires-in cannot be combined with --expires-at"),
]


def test_bad_grants_are_refused_in_one_line_with_exit_2_and_grant_nothing(settings):
    cli(settings, "accounts", "reset", "--count", "1", "--balance", "10")
    for args, reason in BAD_GRANTS:
        refused = cli(settings, "accounts", "grant", "account1", *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert reason in refused.stderr and refused.stderr.count("\n") == 1, (args, refused.stderr)
    assert show(settings)["lots"] == []


def test_a_grant_to_an_unknown_account_exits_1(settings):
    refused = cli(settings, "accounts", "grant", "ghost", "--id", "p1", "--amount", "10")
    assert (refused.returncode, refused.stderr) == (1, "error: unknown account 'ghost'\n")


def test_an_account_holds_at_most_32_lots(settings, client):
    cli(settings, "accounts", "reset", "--count", "1", "--balance", "10")
    for n in range(32):
        codec.grant(client, settings, "account1", f"lot{n}", "money", 1)
    refused = cli(settings, "accounts", "grant", "account1", "--id", "lot32", "--amount", "1")
    assert refused.returncode == 1 and "too_many_lots" in refused.stderr


def test_the_worked_example_spends_lots_in_the_stated_order(settings):
    """Plan gold: sms 1, voice 4, data 8; a bundle of 100 sms for 30 days; a promotional 500
    that expires Sunday; a main balance of 20."""
    cli(settings, "plans", "set", "gold", *GOLD)
    cli(settings, "accounts", "reset", "--count", "1", "--balance", "20")
    cli(settings, "accounts", "set-plan", "account1", "gold")
    cli(settings, "accounts", "grant", "account1", "--id", "sms100", "--units", "100", "--service", "sms",
        "--expires-in", "30d")
    cli(settings, "accounts", "grant", "account1", "--id", "promo", "--amount", "500", "--expires-at",
        _next_sunday())

    def charge(service: str, units: int) -> dict:
        done = cli(settings, "authorize", "--account", "account1", "--service", service, "--units", str(units),
                   "--json")
        return json.loads(done.stdout)

    first, second, third = charge("sms", 4), charge("voice", 10), charge("sms", 100)
    short, last = charge("data", 60), charge("data", 59)

    assert (first["charged"], first["balance"], first["draws"]) == (0, 520, "sms100:4u")
    assert (second["charged"], second["balance"], second["draws"]) == (40, 480, "promo:40")
    assert (third["charged"], third["balance"], third["draws"]) == (4, 476, "sms100:96u,promo:4")
    assert (short["reason"], short["balance"], short.get("draws", "")) == ("insufficient_funds", 476, "")
    assert (last["charged"], last["balance"], last["draws"]) == (472, 4, "promo:456,main:16")
    shown = show(settings)
    assert [(lot["lot"], lot["left"]) for lot in shown["lots"]] == [("sms100", 0), ("promo", 0)]


def _next_sunday() -> str:
    """Sunday midnight UTC, at least a day away."""
    day = 86_400
    now = int(time.time()) // day * day + day
    while time.gmtime(now).tm_wday != 6:
        now += day
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


def test_prices_are_parsed_as_whole_numbers_of_every_service():
    assert plans.parse_prices({"sms": "1", "voice": 4, "data": "8"}) == {"sms": 1, "voice": 4, "data": 8}
    with pytest.raises(ValueError, match="data"):
        plans.parse_prices({"sms": "1", "voice": "4"})


def test_listing_reads_every_partition_in_one_round_trip(settings):
    wide = settings.model_copy(update={"partitions": 2})
    client = connect(wide)
    run(client, plans.setting_plan(wide, "gold", {"sms": 1, "voice": 4, "data": 8}))
    assert run(client, plans.listing_plans(wide)) == [plans.Listed("gold", {"sms": 1, "voice": 4, "data": 8}, False)]
