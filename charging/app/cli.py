"""The app's commands of `charging` (the tools add theirs: charging/cli.py). Every wrong
invocation, setting or URL ends in one line on stderr (a traceback only with --debug or
CHARGING_LOG_LEVEL=debug) and an exit code: 0 done (or approved), 1 rejected or a runtime
error (Redis unreachable, login refused, unknown account), 2 usage or invalid input."""

from __future__ import annotations

import functools
import inspect
import json
import os
import signal
import sys
import traceback
import typing
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import redis
import typer
from redis.exceptions import RedisClusterException
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from charging import __version__, codec
from charging import log as logging_setup
from charging.app import accounts as accounts_mod
from charging.app import lots as lots_mod
from charging.app import plans as plans_mod
from charging.app.status import status as read_status
from charging.connection import NotReplicated, PartitionsChanged, RedisRefused, RedisTooOld, connect, missing_function
from charging.keys import parse_partitions
from charging.schema import Invalid, Outcome, parse_top_up
from charging.plan import run
from charging.settings import LIBRARY_MAX_BALANCE, SERVICES, InvalidSettings, Settings, load
from producer import BacklogFull, Producer, WaitTimeout
from producer.subscriber import Subscriber, outcomes
from worker import supervisor
from worker.metrics import MetricsPortUnavailable

try:  # typer carries its own copy of click since 0.2x
    from typer._click import core as click_core
    from typer._click import exceptions as click_errors
except ImportError:  # an older typer, on click itself
    from click import core as click_core
    from click import exceptions as click_errors



def _no_flag_metavars(command: click_core.Command, ctx: click_core.Context) -> None:
    """A flag takes no value, so its help shows none (a recent typer shows `<bool>` after
    each one, --help included); an empty metavar is shown as nothing."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False):
            param.metavar = ""


class HelpGroup(typer.core.TyperGroup):
    """The help of every command and group without a metavar on flags."""

    def get_command(self, ctx: click_core.Context, name: str) -> click_core.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            _no_flag_metavars(command, ctx)
        return command

    def format_help(self, ctx: click_core.Context, formatter: Any) -> None:
        _no_flag_metavars(self, ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(cls=HelpGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Prepaid charging engine on Redis.")
accounts_app = typer.Typer(cls=HelpGroup, no_args_is_help=True, help="Create, inspect and top up accounts; put them on plans, grant them lots.")
app.add_typer(accounts_app, name="accounts")
plans_app = typer.Typer(cls=HelpGroup, no_args_is_help=True, help="Set and list plans, the price lists accounts pay.")
app.add_typer(plans_app, name="plans")


def make_console(stderr: bool = False, markup: bool = False) -> Console:
    """Human output that never wraps or cuts a line when it is not a terminal (rich would
    assume 80 columns for a pipe or a file). Without markup, text is printed as it is (an
    account may hold [brackets])."""
    console = Console(stderr=stderr, soft_wrap=True, highlight=False, markup=markup)
    if not console.is_terminal:
        console.width = 10_000
    return console


out = make_console()
err = make_console(stderr=True)


class State:
    """What the command line chose: the Redis URL (from --redis-url, before or after the
    command), --debug; and the settings and client, made once when a command needs them."""

    def __init__(self) -> None:
        self.redis_url: str | None = None
        self.debug = os.environ.get("CHARGING_LOG_LEVEL", "").lower() == "debug"
        self._settings: Settings | None = None
        self._client: redis.Redis | None = None

    def use_url(self, url: str | None) -> None:
        if url is None or url == self.redis_url:
            return
        if self.redis_url is not None:
            fail(2, "--redis-url is given twice, with two different URLs; give it once")
        self.redis_url = url

    @property
    def url_source(self) -> str:
        """Where the URL came from, for a message that says what to change."""
        return "--redis-url" if self.redis_url else "CHARGING_REDIS_URL"

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load(**({"redis_url": self.redis_url} if self.redis_url else {}))
            # One-shot commands log only warnings unless debugging; the worker sets its own level.
            logging_setup.configure("debug" if self._settings.log_level == "debug" else "warning")
        return self._settings

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = connect(self.settings)
        return self._client


state = State()


def say_error(message: str) -> None:
    """One line on stderr, whatever the message holds (newlines, [brackets])."""
    err.print(Text.assemble(("error:", "bold red"), " ", " ".join(str(message).split())))


def fail(code: int, message: str):
    say_error(message)
    raise typer.Exit(code)


def refuse_together(option: str, **given: Any) -> None:
    """Exit 2 if any of the options in given (name=value, None when not given) was given
    along with option, which makes them meaningless."""
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value not in (None, False)]
    if named:
        fail(2, f"{option} cannot be combined with {', '.join(named)}; drop one or the other")


RedisUrl = Annotated[str | None, typer.Option(
    "--redis-url", metavar="URL", show_default=False,
    help="The Redis server, e.g. redis://user:password@host:6379/0. Overrides the environment variable "
         "CHARGING_REDIS_URL (default redis://127.0.0.1:6379/0).")]


def talks_to_redis(command):
    """The command takes --redis-url after its name too (`charging status --redis-url URL`),
    not only before it."""
    signature = inspect.signature(command, eval_str=True)

    @functools.wraps(command)
    def with_url(*args, redis_url: str | None = None, **kwargs):
        state.use_url(redis_url)
        return command(*args, **kwargs)

    url = inspect.Parameter("redis_url", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RedisUrl)
    with_url.__signature__ = signature.replace(parameters=[*signature.parameters.values(), url])
    with_url.__annotations__ = {**typing.get_type_hints(command, include_extras=True), "redis_url": RedisUrl}
    return with_url


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"charging {__version__}")
        raise typer.Exit()


@app.callback()
def root(redis_url: RedisUrl = None,
         debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
         version: Annotated[bool, typer.Option("--version", "-V", callback=_show_version, is_eager=True,
                                               help="Print the version and exit.")] = False):
    state.use_url(redis_url)
    state.debug = state.debug or debug


def emit(data: dict[str, Any] | list, as_json: bool, human: str | Table | Group) -> None:
    if as_json:
        typer.echo(json.dumps(data))
    else:
        out.print(human)


def outcome_text(outcome: Outcome) -> str:
    """One line; one more for a grant or a lot's expiry, two more for a reservation operation."""
    text = (f"{outcome.request_id}: {outcome.status}"
            f"{' (' + outcome.reason + ')' if outcome.reason else ''} charged={outcome.charged} "
            f"balance={outcome.balance}{' duplicate' if outcome.duplicate else ''}")
    if outcome.draws:
        text += f" draws={outcome.draws}"
    expires = "" if outcome.expires_at is None else f" expires_at={moment(outcome.expires_at)}"
    if outcome.op == "grant":
        text += f"\n  grant {outcome.lot}: granted={outcome.granted}{expires}"
    elif outcome.op == "expire":
        text += f"\n  lot {outcome.lot} expired: breakage={outcome.breakage}"
    elif outcome.op is not None:
        text += (f"\n  {outcome.op} {outcome.reservation}: reserved={outcome.reserved}{expires}"
                 f"\n  held={outcome.held} available={outcome.available}")
    return text


def lots_text(outcome: Outcome) -> str:
    """What an outcome says of credit lots, on its line: the draws, a grant, a breakage."""
    if outcome.op == "grant":
        return f" lot={outcome.lot} granted={outcome.granted}"
    if outcome.op == "expire":
        return f" lot={outcome.lot} breakage={outcome.breakage}"
    return f" draws={outcome.draws}" if outcome.draws else ""


def moment(ms: int) -> str:
    """A time in ms since the epoch as an operator reads it: 2030-01-06T00:00:00Z."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def show_outcome(outcome: Outcome, as_json: bool) -> None:
    emit(outcome.as_dict(), as_json, outcome_text(outcome))
    if not outcome.approved:
        raise typer.Exit(1)


# ---- accounts -------------------------------------------------------------------------

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@accounts_app.command("reset")
@talks_to_redis
def accounts_reset(count: Annotated[int, typer.Option(min=1, max=1_000_000)] = 100,
                   balance: Annotated[int, typer.Option(min=0)] = 100, as_json: AsJson = False):
    """Set account1..accountN to BALANCE, creating missing ones."""
    if balance > LIBRARY_MAX_BALANCE:
        fail(2, f"--balance {balance} is over the maximum of {LIBRARY_MAX_BALANCE}")
    done = codec.set_balances(state.client, state.settings,
                                  ((a, balance) for a in accounts_mod.numbered(count)))
    emit({"accounts": done, "balance": balance}, as_json, f"{done} accounts set to {balance}")


@accounts_app.command("show")
@talks_to_redis
def accounts_show(account: str, as_json: AsJson = False):
    """Show one account: balance, held, available, plan, lots and breakage."""
    main, main_held = accounts_mod.funds(state.client, state.settings, account)
    holdings = run(state.client, lots_mod.holdings_reading(state.settings, account))
    data = lots_mod.account_data(account, main, main_held, holdings)
    lines = [f"{account}: {data['balance']} (held {data['held']}, available {data['available']})",
             *holdings_lines(holdings)]
    emit(data, as_json, "\n".join(lines))


def holdings_lines(holdings: lots_mod.Holdings) -> list[str]:
    """Nothing for an account on the default plan with no lots and no breakage."""
    lines = [] if holdings.plan == lots_mod.DEFAULT_PLAN else [f"  plan {holdings.plan}"]
    for lot in holdings.lots:
        measure = f"{lot.service} units" if lot.kind == "units" else "money" + (
            f", {lot.service} only" if lot.service else "")
        when = "" if lot.expires_at is None else (
            f", {'expired' if holdings.expired(lot) else 'expires'} {moment(lot.expires_at)}")
        lines.append(f"  lot {lot.id}: {lot.left} of {lot.granted} left (held {lot.held}), {measure}{when}")
    if holdings.breakage:
        lines.append("  breakage: " + " ".join(f"{name}={n}" for name, n in holdings.breakage.items()))
    return lines


@accounts_app.command("set-plan")
@talks_to_redis
def accounts_set_plan(account: str, plan: str, as_json: AsJson = False):
    """Put ACCOUNT on PLAN (default: the tariff, no plan)."""
    try:
        now = codec.assign_plan(state.client, state.settings, account, plan)
    except redis.exceptions.NoPermissionError:
        raise  # an ACL refusal, reported by main()
    except redis.ResponseError as exc:
        refused(exc, account)
    emit({"account": account, "plan": now}, as_json, f"{account}: plan {now}")


Id = Annotated[str, typer.Option("--id", help="The lot's id: granting it again is a duplicate, not a second lot.")]


@accounts_app.command("grant")
@talks_to_redis
def accounts_grant(account: str, lot: Id,
                   amount: Annotated[str | None, typer.Option(help="Money, minor units.")] = None,
                   units: Annotated[str | None, typer.Option(help="Units of --service, instead of an amount.")] = None,
                   service: Annotated[str | None, typer.Option(help="sms, voice or data: what the units are of, or "
                                                                    "the one service the money pays for.")] = None,
                   expires_in: Annotated[str | None, typer.Option(help="30d, 12h, 90m, 45s or 1500ms after the "
                                                                       "grant.")] = None,
                   expires_at: Annotated[str | None, typer.Option(help="An ISO-8601 time with a timezone, "
                                                                       "2030-01-06T00:00:00Z.")] = None,
                   as_json: AsJson = False):
    """Give ACCOUNT a credit lot: money (--amount) or --units of a --service, optionally expiring."""
    if expires_in is not None:
        refuse_together("--expires-in", expires_at=expires_at)
    fields = {"account": account, "lot": lot, "amount": amount, "units": units, "service": service,
              "expires_in": expires_in, "expires_at": expires_at}
    grant = lots_mod.parse_grant(fields, state.settings, lots_mod.wall_clock_ms())
    try:
        granted = run(state.client, lots_mod.granting(state.settings, grant))
    except redis.exceptions.NoPermissionError:
        raise
    except redis.ResponseError as exc:
        refused(exc, account)
    data = lots_mod.granted_data(grant, granted)
    until = "" if granted.expires_at is None else f", expires {moment(granted.expires_at)}"
    emit(data, as_json, f"{account}: lot {granted.lot} {granted.status}, {granted.left} left{until}")


def refused(exc: redis.ResponseError, account: str) -> typing.NoReturn:
    """A refusal of the library, worded once: exit 2 for what the input got wrong, 1 for the rest."""
    reason = lots_mod.reason_of(exc)
    if reason == "unknown_account":
        raise accounts_mod.UnknownAccount(account) from None
    fail(2 if lots_mod.is_bad_input(reason) else 1, f"{exc} (account {account!r})")


# ---- plans ----------------------------------------------------------------------------

Price = Annotated[str, typer.Option(help="Price per unit, minor units.", show_default=False)]


@plans_app.command("set")
@talks_to_redis
def plans_set(name: str, sms: Price, voice: Price, data: Price, as_json: AsJson = False):
    """Set plan NAME's prices on every partition (again, to finish a change that stopped half way)."""
    prices = plans_mod.parse_prices({"sms": sms, "voice": voice, "data": data})
    try:
        created = run(state.client, plans_mod.setting_plan(state.settings, name, prices))
    except redis.exceptions.NoPermissionError:
        raise
    except redis.ResponseError as exc:
        fail(2 if lots_mod.is_bad_input(lots_mod.reason_of(exc)) else 1, f"{exc} (plan {name!r})")
    emit({"plan": name, **prices, "created": created}, as_json,
         f"plan {name} {'created' if created else 'set'}: " + " ".join(f"{s}={prices[s]}" for s in SERVICES))


@plans_app.command("list")
@talks_to_redis
def plans_list(as_json: AsJson = False):
    """Every plan with its prices; a plan whose partitions disagree is partial: set it again."""
    listed = run(state.client, plans_mod.listing_plans(state.settings))
    table = Table("plan", *SERVICES, "partitions")
    for plan in listed:
        table.add_row(plan.name, *(str(plan.prices[s]) for s in SERVICES),
                      "partial: set it again" if plan.partial else "all")
    emit([plans_mod.listed_data(plan) for plan in listed], as_json, table)


@accounts_app.command("top-up")
@talks_to_redis
def accounts_top_up(account: str, amount: str, as_json: AsJson = False):
    """Add AMOUNT (minor units) to an existing account."""
    account, value = parse_top_up(account, amount, state.settings)
    try:
        new = codec.top_up(state.client, state.settings, account, value)
    except redis.exceptions.NoPermissionError:
        raise  # an ACL refusal, reported by main()
    except redis.ResponseError as exc:
        if "unknown_account" in str(exc):
            raise accounts_mod.UnknownAccount(account) from None
        fail(1, f"{exc} (account {account!r})")
    emit({"account": account, "balance": new}, as_json, f"{account}: {new}")


@accounts_app.command("list")
@talks_to_redis
def accounts_list(as_json: AsJson = False):
    """List every account: balance, held by open reservations, available."""
    balances, corrupt = accounts_mod.stored_balances(state.client, state.settings)
    held = accounts_mod.all_held(state.client, state.settings)
    listed = [{"account": a, "balance": b, "held": held.get(a, 0), "available": b - held.get(a, 0)}
              for a, b in sorted(balances.items())]
    # A balance the library did not write is listed as it is stored: every charge on it is refused.
    listed += [{"account": a, "corrupt_balance": v} for a, v in sorted(corrupt.items())]
    table = Table("account", "balance", "held", "available")
    for row in listed:
        if "corrupt_balance" in row:
            table.add_row(row["account"], f"corrupt: {row['corrupt_balance']!r}", "-", "-")
        else:
            table.add_row(row["account"], str(row["balance"]), str(row["held"]), str(row["available"]))
    emit(listed, as_json, table)


# ---- charging -------------------------------------------------------------------------

Account = Annotated[str | None, typer.Option(help="Account id.")]
Service = Annotated[str | None, typer.Option(help="sms, voice or data.")]
Units = Annotated[str | None, typer.Option(help="Whole number of units, rated by the tariff.")]
Amount = Annotated[str | None, typer.Option(help="Explicit amount in minor units, instead of service/units.")]
RequestId = Annotated[str | None, typer.Option(help="Idempotency key; a new one is made if omitted.")]


def _request(account, service, units, amount, request_id) -> dict[str, Any]:
    return {"account": account, "service": service, "units": units, "amount": amount, "request_id": request_id}


@app.command()
@talks_to_redis
def produce(account: Account = None, service: Service = None, units: Units = None, amount: Amount = None,
            request_id: RequestId = None,
            file: Annotated[str | None, typer.Option(help="JSON lines file of requests; - for stdin.")] = None,
            skip_invalid: Annotated[bool, typer.Option(help="With --file: submit the valid lines anyway.")] = False,
            wait: Annotated[bool, typer.Option(help="Wait for the outcome.")] = False,
            timeout: Annotated[float | None, typer.Option(min=0.1, help="Seconds to wait (default 10).",
                                                          show_default=False)] = None,
            as_json: AsJson = False):
    """Publish charge requests to the request stream."""
    if file is not None:
        refuse_together("--file", **_request(account, service, units, amount, request_id))
    elif skip_invalid:
        fail(2, "--skip-invalid applies to --file only")
    if timeout is not None and not wait:
        fail(2, "--timeout applies to --wait only")
    producer = Producer(state.client, state.settings)
    if file is not None:
        requests = _read_jsonl(file, producer, skip_invalid)
    else:
        requests = [_prepare(producer, _request(account, service, units, amount, request_id), wait)]
    try:
        ids = producer.submit(requests, reply=wait)
    except BacklogFull as exc:
        fail(1, str(exc))
    if not wait:
        emit({"submitted": len(ids), "request_ids": ids}, as_json,
             f"submitted {len(ids)} request(s)" + (f": {ids[0]}" if len(ids) == 1 else ""))
        return
    try:
        outcomes = producer.wait(ids, 10.0 if timeout is None else timeout)
    except WaitTimeout as exc:
        fail(1, f"{exc}. The charges may still be settled; resubmitting with the same request id is safe.")
    for outcome in outcomes.values():
        emit(outcome.as_dict(), as_json, outcome_text(outcome))
    if any(not o.approved for o in outcomes.values()):
        raise typer.Exit(1)


def _prepare(producer, data: dict, reply: bool = False):
    try:
        return producer.prepare(data, reply)
    except Invalid as exc:
        fail(2, str(exc))


def _read_jsonl(file: str, producer, skip_invalid: bool) -> list:
    """Validate every line first; report all bad ones with their line numbers."""
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text()
    except OSError as exc:
        fail(2, f"cannot read {file}: {exc}")
    requests, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise Invalid("invalid_json", "each line must be a JSON object")
            requests.append(producer.prepare(data))
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: invalid_json: {exc.msg}")
        except Invalid as exc:
            problems.append(f"line {number}: {exc}")
    for problem in problems:
        err.print(problem)
    if problems and not skip_invalid:
        fail(2, f"{len(problems)} invalid line(s); nothing submitted (use --skip-invalid to submit the rest)")
    if not requests:
        fail(2, "no valid requests")
    return requests


@app.command()
@talks_to_redis
def authorize(account: Account = None, service: Service = None, units: Units = None, amount: Amount = None,
              request_id: RequestId = None, as_json: AsJson = False):
    """Charge synchronously (no stream) and print the outcome. Exit 1 when rejected."""
    producer = Producer(state.client, state.settings)
    data = _request(account, service, units, amount, request_id)
    try:
        outcome = producer.authorize(data)
    except Invalid as exc:
        fail(2, str(exc))
    show_outcome(outcome, as_json)


# ---- reservations (sessions) ------------------------------------------------------------

Reservation = Annotated[str, typer.Option(help="Reservation id, <account>/<request id of the reserve>.")]
Ttl = Annotated[str | None, typer.Option(help="Seconds until an uncommitted reservation is released.")]


def _settle(op: str, data: dict[str, Any], as_json: bool) -> None:
    """One synchronous reservation operation; exit 1 when rejected, 2 when invalid."""
    try:
        outcome = Producer(state.client, state.settings).authorize({**data, "op": op})
    except Invalid as exc:
        fail(2, str(exc))
    show_outcome(outcome, as_json)


@app.command()
@talks_to_redis
def reserve(account: Account = None, service: Service = None, units: Units = None, amount: Amount = None,
            ttl: Ttl = None, request_id: RequestId = None, as_json: AsJson = False):
    """Hold funds for a session; the reservation id is <account>/<request id>."""
    _settle("reserve", {**_request(account, service, units, amount, request_id), "ttl": ttl}, as_json)


@app.command()
@talks_to_redis
def extend(reservation: Reservation, units: Units = None, amount: Amount = None, ttl: Ttl = None,
           request_id: RequestId = None, as_json: AsJson = False):
    """Hold more for an open reservation (units at its unit price, or an amount)."""
    _settle("extend", {"reservation": reservation, "units": units, "amount": amount, "ttl": ttl,
                       "request_id": request_id}, as_json)


@app.command()
@talks_to_redis
def commit(reservation: Reservation, units: Units = None, amount: Amount = None, request_id: RequestId = None,
           as_json: AsJson = False):
    """Charge what was used (at most what is held) and release the rest."""
    _settle("commit", {"reservation": reservation, "units": units, "amount": amount, "request_id": request_id},
            as_json)


@app.command()
@talks_to_redis
def release(reservation: Reservation, request_id: RequestId = None, as_json: AsJson = False):
    """Release everything a reservation holds, charging nothing."""
    _settle("release", {"reservation": reservation, "request_id": request_id}, as_json)


# ---- operations -----------------------------------------------------------------------

@app.command()
@talks_to_redis
def worker(processes: Annotated[int, typer.Option(min=1, max=256)] = 1,
           batch: Annotated[int | None, typer.Option(min=1, max=10_000, help="Entries per read.")] = None,
           consumer: Annotated[str | None, typer.Option(help="Stable consumer name (default: hostname).")] = None,
           burst: Annotated[bool, typer.Option(help="Exit 0 once drained and nothing is pending.")] = False,
           partitions: Annotated[str | None, typer.Option(help="Partitions to consume, e.g. 0-5,8 (default all).")]
           = None,
           metrics_port: Annotated[int | None, typer.Option(min=1, max=65535, help="Serve Prometheus metrics "
                                                            "on this port (all processes summed).")] = None):
    """Run consumer-group workers until SIGTERM / SIGINT (or, with --burst, until drained)."""
    settings = state.settings if batch is None else state.settings.model_copy(update={"batch": batch})
    try:
        chosen = None if partitions is None else parse_partitions(partitions, settings.partitions)
    except ValueError as exc:
        fail(2, f"--partitions: {exc}")
    raise typer.Exit(supervisor.run(settings, processes, consumer, burst, chosen, metrics_port=metrics_port))


@app.command()
@talks_to_redis
def maintain(once: Annotated[bool, typer.Option(help="One round, then exit.")] = False,
             partitions: Annotated[str | None, typer.Option(help="Partitions to look after, e.g. 0-5,8 "
                                                                 "(default all).")] = None):
    """Load the functions, then every maintenance interval trim the streams, forget idle
    consumers and repair the request streams (the maintainer ACL role), until SIGTERM / SIGINT."""
    try:
        chosen = None if partitions is None else parse_partitions(partitions, state.settings.partitions)
    except ValueError as exc:
        fail(2, f"--partitions: {exc}")
    raise typer.Exit(supervisor.run_maintainer(state.settings, chosen, once))


@app.command()
@talks_to_redis
def status(as_json: AsJson = False):
    """Stream lengths, pending entries, lag, consumers, dead letters and held funds."""
    data = read_status(state.client, state.settings)
    table = Table("partition", "requests", "pending", "lag", "oldest pending ms", "results", "dead letters",
                  "consumers")
    for p in data["partitions"]:
        table.add_row(str(p["partition"]), str(p["length"]), str(p["pending"]),
                      "unknown" if p["lag"] is None else str(p["lag"]),
                      "-" if p["oldest_pending_age_ms"] is None else str(p["oldest_pending_age_ms"]),
                      str(p["results"]), str(p["deadletters"]), str(len(p["consumers"])))
    per_consumer: Counter = Counter()
    for p in data["partitions"]:
        per_consumer.update({c["name"]: c["pending"] for c in p["consumers"]})
    summary = Text(f"pending per consumer: {_pairs(per_consumer) or '-'}\n"
                   f"dead letters by reason (ever): {_pairs(data['deadletter_reasons']) or '-'}\n"
                   f"open reservations: {data['open_reservations']}, holding {data['held']}\n"
                   f"stray groups on request streams: {_strays(data['partitions']) or '-'}")
    emit(data, as_json, Group(table, summary))


def _pairs(counts: dict[str, int]) -> str:
    return " ".join(f"{name}={n}" for name, n in sorted(counts.items()))


def _strays(partitions: list[dict]) -> str:
    """Each group other than the workers' with the partitions it is on: 'audit (partition 0)'."""
    where: dict[str, list[int]] = {}
    for p in partitions:
        for name in p["stray_groups"]:
            where.setdefault(name, []).append(p["partition"])
    return ", ".join(f"{name} (partition{'s' if len(ps) > 1 else ''} {', '.join(map(str, ps))})"
                     for name, ps in sorted(where.items()))


@app.command()
@talks_to_redis
def results(follow: Annotated[bool, typer.Option(help="Keep printing new outcomes.")] = False,
            group: Annotated[str | None, typer.Option(
                help="Read as this consumer group: each outcome is printed once for the group and acked after it "
                     "was printed; the next call goes on where this one stopped.")] = None,
            count: Annotated[int | None, typer.Option(min=1, help="Stop after this many.")] = None,
            start: Annotated[str, typer.Option("--from", help="start or now: where a new group (or a read without "
                                                               "a group) begins.")] = "start",
            as_json: AsJson = False):
    """Print outcomes from the results streams."""
    if start not in ("start", "now"):
        fail(2, f"--from must be start or now, got {start!r}")

    def show(outcome: Outcome) -> None:
        emit(outcome.as_dict(), as_json,
             f"{outcome.request_id} {outcome.account} {outcome.status} {outcome.reason} "
             f"charged={outcome.charged} balance={outcome.balance}{' duplicate' if outcome.duplicate else ''}"
             f"{lots_text(outcome)}")
        sys.stdout.flush()  # out of this process before it is acked

    if group is None:
        for outcome in outcomes(state.client, state.settings, follow=follow, start=start, limit=count):
            show(outcome)
        return
    subscriber = Subscriber(state.client, state.settings, group, start=start)

    def stop(*_: object) -> None:
        """Print and ack the outcomes in hand, then exit 0; a second Ctrl-C stops at once."""
        subscriber.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        subscriber.run(show, limit=count, follow=follow)
    except KeyboardInterrupt:  # the second Ctrl-C: what was acked stays acked, the rest is pending for next time
        raise typer.Exit(130) from None


@app.command()
@talks_to_redis
def serve(host: Annotated[str, typer.Option(help="Address to listen on; other than loopback only with API keys.")]
          = "127.0.0.1",
          port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
          workers: Annotated[int, typer.Option(min=1, max=64, help="Processes, each with its own pool.")] = 1):
    # "\\[" below: the help is rich markup, which would take [http] for a style and drop it.
    """Serve the HTTP API and the live page (docs/http-api.md); needs the \\[http] extra."""
    try:
        from charging.app.http import serve as gateway
        from charging.app.http.access import KeysFileError
    except ModuleNotFoundError as exc:
        fail(1, f"charging serve needs {exc.name}, which comes with the http extra: pip install 'redis-charging[http]'")
    logging_setup.configure(state.settings.log_level)
    try:
        gateway.serve(state.settings, host, port, workers)
    except (gateway.Refused, KeysFileError) as exc:
        fail(2, str(exc))
    except gateway.PortUnavailable as exc:
        fail(1, str(exc))


@app.command("api-key")
def api_key(name: Annotated[str, typer.Argument(help="Who holds the key, e.g. partner-a.")],
            scope: Annotated[list[str], typer.Option(help="charge, authorize, reserve, read or admin; repeat.")],
            account: Annotated[list[str] | None, typer.Option(help="An account (or pattern, partner-*) it may "
                                                                   "touch; repeat. Default: every account.")] = None,
            rate: Annotated[float | None, typer.Option(min=0.001, help="Requests/s per gateway process.")] = None):
    """Make an API key for `charging serve`: prints the key once, and the table for the keys file."""
    from charging.app.http.access import KeysFileError, new_key

    try:
        token, table = new_key(name, scope, account, rate)
    except KeysFileError as exc:
        fail(2, str(exc))
    err.print("the key (shown once; the keys file keeps only its SHA-256):", highlight=False)
    typer.echo(token, err=True)
    typer.echo(table, nl=False)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except Exception as exc:  # every error ends here, as one line (and a traceback with --debug)
        code = report(exc)
    sys.exit(code if isinstance(code, int) else 0)


def report(exc: Exception) -> int:
    """Say what went wrong in one line on stderr (after the traceback with --debug); the exit code."""
    if isinstance(exc, getattr(click_errors, "NoArgsIsHelpError", ())):
        typer.echo(exc.ctx.get_help())  # `charging` or `charging accounts` alone: the help, as before
        return 2
    code, message = explain(exc)
    if state.debug:
        traceback.print_exception(exc)
    say_error(message)
    return code


def explain(exc: Exception) -> tuple[int, str]:
    """The exit code and the one line for an error: one wording per error, whichever
    command met it, naming what to change."""
    url = state.url_source
    if isinstance(exc, click_errors.UsageError):
        help_hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        return 2, exc.format_message() + help_hint
    if isinstance(exc, click_errors.ClickException):
        return exc.exit_code, exc.format_message()
    if isinstance(exc, InvalidSettings):
        return 2, exc.describe({"redis_url": url} if state.redis_url else {})
    if isinstance(exc, Invalid):
        return 2, str(exc)
    if isinstance(exc, RedisRefused):
        return 1, f"{exc} (check {url})"
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return 1, (f"Redis refused: NOPERM {exc} (the ACL user of {url} lacks this right; see deploy/users.acl)")
    if missing_function(exc):
        return 1, (f"the charging functions are not loaded on this Redis ({exc}); the maintainer loads them: "
                   "run `charging maintain` with the maintainer's CHARGING_REDIS_URL")
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, RedisClusterException)):
        return 1, _unreachable(exc, url)
    if isinstance(exc, (accounts_mod.UnknownAccount, accounts_mod.CorruptBalance, BacklogFull, NotReplicated, PartitionsChanged, RedisTooOld,
                        MetricsPortUnavailable)):
        return 1, str(exc)
    if isinstance(exc, redis.RedisError):
        return 1, f"Redis answered with an error: {exc}"
    return 1, f"unexpected {type(exc).__name__}: {exc} (--debug shows where)"


def _unreachable(exc: Exception, url_source: str) -> str:
    shown = state.settings.redis_url if state._settings else "Redis"
    message = f"cannot reach Redis at {shown} ({url_source}): {str(exc).rstrip('.')}"
    if str(shown).startswith("rediss") and isinstance(exc, redis.TimeoutError):
        return message + ("; a rediss:// URL needs a server that speaks TLS on that port (redis:// for one that "
                          "does not)")
    return message + f"; start Redis there, or set {url_source} to a running one"
