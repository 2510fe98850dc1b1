"""The `charging` command, run as a user types it."""

from __future__ import annotations

import json

from tests.conftest import cli


def test_accounts_reset_show_top_up_and_list(settings):
    assert cli(settings, "accounts", "reset").returncode == 0  # 100 accounts of 100 by default
    shown = cli(settings, "accounts", "show", "account100", "--json")
    assert json.loads(shown.stdout) == {"account": "account100", "balance": 100, "held": 0, "available": 100, "plan": "default", "lots": [], "breakage": {}}
    assert cli(settings, "accounts", "top-up", "account100", "50").returncode == 0
    assert json.loads(cli(settings, "accounts", "show", "account100", "--json").stdout)["balance"] == 150
    assert cli(settings, "reserve", "--account", "account2", "--amount", "30").returncode == 0
    listed = json.loads(cli(settings, "accounts", "list", "--json").stdout)
    assert len(listed) == 100 and {"account": "account1", "balance": 100, "held": 0, "available": 100} in listed
    assert {"account": "account2", "balance": 100, "held": 30, "available": 70} in listed


def test_unknown_account_and_bad_amounts_fail_with_a_message(settings):
    cli(settings, "accounts", "reset", "--count", "1")
    for command in (("accounts", "show", "ghost"), ("accounts", "top-up", "ghost", "5")):
        unknown = cli(settings, *command)
        assert (unknown.returncode, unknown.stderr) == (1, "error: unknown account 'ghost'\n"), command
    for bad in ("-5", "0", "1.5", "NaN", "1e9999", "99999999999999999999"):
        result = cli(settings, "accounts", "top-up", "account1", "--", bad)
        assert result.returncode == 2 and "invalid_amount" in result.stderr, (bad, result.stderr)
    assert json.loads(cli(settings, "accounts", "show", "account1", "--json").stdout)["balance"] == 100


def test_authorize_prints_outcome_and_exits_1_when_rejected(settings):
    cli(settings, "accounts", "reset", "--count", "1", "--balance", "12")
    ok = cli(settings, "authorize", "--account", "account1", "--service", "voice", "--units", "2",
             "--request-id", "cli-1", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) | {"processed_at": 0, "submitted_at": 0} == {
        "request_id": "cli-1", "account": "account1", "status": "approved", "reason": "", "charged": 10,
        "balance": 2, "duplicate": False, "submitted_at": 0, "processed_at": 0}
    poor = cli(settings, "authorize", "--account", "account1", "--service", "sms", "--units", "3", "--json")
    assert poor.returncode == 1 and json.loads(poor.stdout)["reason"] == "insufficient_funds"


def test_invalid_cli_input_writes_nothing_and_exits_2(settings):
    cli(settings, "accounts", "reset", "--count", "1")
    cases = [
        (["--account", "account1", "--service", "voice", "--units", "1.5"], "invalid_units"),
        (["--account", "account1", "--service", "voice", "--units", "-2"], "invalid_units"),
        (["--account", "account1", "--service", "fax", "--units", "2"], "unknown_service"),
        (["--account", "account1", "--service", "voice"], "missing_field"),
        (["--service", "voice", "--units", "2"], "missing_field"),
        (["--account", "account1", "--amount", "NaN"], "invalid_amount"),
    ]
    for args, reason in cases:
        for command in ("produce", "authorize"):
            result = cli(settings, command, *args)
            assert result.returncode == 2 and reason in result.stderr, (command, args, result.stderr)
    status = json.loads(cli(settings, "status", "--json").stdout)
    assert status["length"] == 0 and status["results"] == 0


def test_produce_wait_gets_the_outcome_from_a_running_worker(settings):
    import subprocess

    from tests.conftest import CHARGING

    cli(settings, "accounts", "reset", "--count", "1")
    env_worker = subprocess.Popen([CHARGING, "worker", "--consumer", "cli-w"],
                                  env=_env(settings), stderr=subprocess.DEVNULL)
    try:
        done = cli(settings, "produce", "--account", "account1", "--service", "data", "--units", "3",
                   "--request-id", "p-1", "--wait", "--timeout", "20", "--json")
    finally:
        env_worker.terminate()
        assert env_worker.wait(20) == 0  # SIGTERM: finish the batch in hand, exit 0
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["balance"] == 70


def test_produce_file_validates_every_line_first(settings, tmp_path):
    cli(settings, "accounts", "reset", "--count", "2")
    lines = [
        {"account": "account1", "service": "sms", "units": 2},
        {"account": "account2", "service": "sms", "units": 2.0},
        "not json",
        {"account": "account2", "amount": 7, "request_id": "f-4"},
        {"account": "account1", "service": "sms", "units": True},
    ]
    path = tmp_path / "charges.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")

    refused = cli(settings, "produce", "--file", str(path))
    assert refused.returncode == 2
    for expected in ("line 2: invalid_units", "line 3: invalid_json", "line 5: invalid_units"):
        assert expected in refused.stderr
    assert json.loads(cli(settings, "status", "--json").stdout)["length"] == 0

    partial = cli(settings, "produce", "--file", "-", "--skip-invalid", "--json", input=path.read_text())
    assert partial.returncode == 0, partial.stderr
    assert json.loads(partial.stdout)["submitted"] == 2
    burst = cli(settings, "worker", "--burst")
    assert burst.returncode == 0, burst.stderr
    outcomes = [json.loads(line) for line in cli(settings, "results", "--json").stdout.splitlines()]
    assert sorted((o["account"], o["charged"]) for o in outcomes) == [("account1", 2), ("account2", 7)]


def test_status_reports_streams_pending_lag_and_consumers(settings):
    cli(settings, "accounts", "reset", "--count", "1")
    for i in range(3):
        cli(settings, "produce", "--account", "account1", "--service", "sms", "--units", "1")
    before = json.loads(cli(settings, "status", "--json").stdout)
    assert before["length"] == 3 and before["lag"] is None and before["consumers"] == []
    assert before["requests_stream"] == f"{settings.namespace}:{{p0}}:requests"
    cli(settings, "worker", "--burst", "--consumer", "s-1")
    after = json.loads(cli(settings, "status", "--json").stdout)
    assert (after["pending"], after["lag"], after["results"], after["deadletters"]) == (0, 0, 3, 0)
    assert after["consumers"] == ["s-1"]
    assert (after["open_reservations"], after["held"]) == (0, 0)
    cli(settings, "reserve", "--account", "account1", "--amount", "40")
    held = json.loads(cli(settings, "status", "--json").stdout)
    assert (held["open_reservations"], held["held"]) == (1, 40)
    assert "open reservations: 1, holding 40" in cli(settings, "status").stdout
    assert "results_stream" in after and "deadletter_stream" in after


def test_unreachable_redis_is_a_clear_error(settings):
    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    result = cli(down, "accounts", "show", "account1")
    assert result.returncode == 1 and "cannot reach Redis" in result.stderr


def _env(settings):
    import os

    return {**os.environ, "CHARGING_REDIS_URL": settings.redis_url.get_secret_value(),
            "CHARGING_NAMESPACE": settings.namespace, "CHARGING_BLOCK_MS": "200", "CHARGING_RETRY_ATTEMPTS": "0"}
