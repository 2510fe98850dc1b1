"""A newcomer's first hour: the mistakes people make with `charging`, typed as they would
type them, against a private redis-server. Every wrong invocation, setting or URL must end
in exactly one line on stderr that names what to change, the documented exit code (2 usage
or bad input, 1 runtime), no traceback, no temp dir left behind, and it must end: each run
has 10 s (a hang check, not a benchmark)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from charging.tools.redis_server import free_port
from tests.conftest import CHARGING, cli, environment

SECRET = "hunter2-not-the-password"
HANG_CHECK_S = 10
REDACTED = "redis://user:***@127.0.0.1:"  # the start of {dead_with_password} as a message shows it
HIDE_NUMPY = [sys.executable, "-c", "import sys; sys.modules['numpy'] = None; "
              "sys.argv = ['charging', 'bench', '--quick']; from charging.cli import main; main()"]


@dataclass
class Row:
    """One invocation: args for `charging` (or a whole argv), extra environment, the exit
    code, and a piece of the one line it must print on stderr. {url}, {dead}, {host},
    {file}, {busy} are filled in per test."""
    args: list[str]
    code: int
    says: str
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] | None = None


WRONG = {
    # The issue's table, row by row.
    "http-scheme": Row(["--redis-url", "http://{host}", "status"], 2, "--redis-url='http://"),
    "no-scheme": Row(["--redis-url", "{host}", "status"], 2, "not a URL; write redis://HOST:PORT/DB"),
    "db-out-of-range": Row(["--redis-url", "redis://{host}/99", "status"], 1, "has no such database"),
    "tls-to-plain-server": Row(["status", "--json"], 1, "needs a server that speaks TLS",
                               env={"CHARGING_REDIS_URL": "rediss://{host}/0"}),
    "wrong-password-worker": Row(["--redis-url", f"redis://user:{SECRET}@{{host}}/0", "worker"], 1,
                                 "refused the login"),
    "wrong-password-workers": Row(["--redis-url", f"redis://user:{SECRET}@{{host}}/0", "worker", "--processes", "2"],
                                  1, "refused the login"),
    "wrong-password-status": Row(["status"], 1, "(check CHARGING_REDIS_URL)",
                                 env={"CHARGING_REDIS_URL": f"redis://user:{SECRET}@{{host}}/0"}),
    "redis-stopped-authorize": Row(["authorize", "--account", "account1", "--service", "sms", "--units", "1"], 1,
                                   "cannot reach Redis at redis://127.0.0.1:", env={"CHARGING_REDIS_URL": "{dead}"}),
    "bench-without-extra": Row([], 1, "pip install 'redis-charging[bench]'", argv=HIDE_NUMPY),
    "log-level-unknown": Row(["status"], 2, "CHARGING_LOG_LEVEL='verbose'", env={"CHARGING_LOG_LEVEL": "verbose"}),
    "tariff-file-missing": Row(["status"], 2, "CHARGING_TARIFF_FILE: cannot read [tariff] from missing.toml",
                               env={"CHARGING_TARIFF_FILE": "missing.toml"}),
    "file-with-single-request": Row(["produce", "--file", "{file}", "--account", "a", "--service", "sms",
                                     "--units", "1"], 2, "--file cannot be combined with --account, --service"),
    "top-up-unknown-account": Row(["accounts", "top-up", "ghost", "5", "--json"], 1, "unknown account 'ghost'"),
    "show-unknown-account": Row(["accounts", "show", "ghost"], 1, "unknown account 'ghost'"),
    "metrics-port-busy": Row(["worker", "--processes", "2", "--metrics-port", "{busy}"], 1,
                             "cannot serve metrics on port"),
    "metrics-port-busy-single": Row(["worker", "--metrics-port", "{busy}"], 1, "cannot serve metrics on port"),
    "serve-port-busy": Row(["serve", "--port", "{busy}"], 1, "address already in use; pick another with --port"),
    "serve-port-busy-workers": Row(["serve", "--port", "{busy}", "--workers", "2"], 1, "cannot listen on 127.0.0.1:"),
    "hosts-without-cluster": Row(["--redis-url", "redis://{host},127.0.0.1:7001/0", "status"], 2,
                                 "write redis+cluster://"),
    # More of the same kind.
    "unknown-command": Row(["frobnicate"], 2, "No such command 'frobnicate'"),
    "unknown-option": Row(["status", "--frob"], 2, "No such option: --frob"),
    "missing-argument": Row(["accounts", "show"], 2, "Missing argument"),
    "count-out-of-range": Row(["accounts", "reset", "--count", "0"], 2, "'--count'"),
    "negative-top-up": Row(["accounts", "top-up", "account1", "--", "-5"], 2, "invalid_amount"),
    "unknown-service": Row(["authorize", "--account", "account1", "--service", "fax", "--units", "1"], 2,
                           "unknown_service"),
    "fractional-units": Row(["produce", "--account", "account1", "--service", "sms", "--units", "1.5"], 2,
                            "invalid_units"),
    "file-missing": Row(["produce", "--file", "no-such.jsonl"], 2, "cannot read no-such.jsonl"),
    "skip-invalid-without-file": Row(["produce", "--skip-invalid", "--account", "account1", "--amount", "1"], 2,
                                     "--skip-invalid applies to --file only"),
    "timeout-without-wait": Row(["produce", "--timeout", "3", "--account", "account1", "--amount", "1"], 2,
                                "--timeout applies to --wait only"),
    "partition-that-does-not-exist": Row(["worker", "--partitions", "7"], 2, "--partitions"),
    "processes-zero": Row(["worker", "--processes", "0"], 2, "'--processes'"),
    "partitions-not-a-number": Row(["status"], 2, "CHARGING_PARTITIONS='abc'", env={"CHARGING_PARTITIONS": "abc"}),
    "tariff-not-json": Row(["status"], 2, "CHARGING_TARIFF: not valid JSON", env={"CHARGING_TARIFF": "sms=1"}),
    "partitions-changed": Row(["status"], 1, "CHARGING_PARTITIONS is 5", env={"CHARGING_PARTITIONS": "5"}),
    "block-longer-than-socket-timeout": Row(["status"], 2, "CHARGING_BLOCK_MS must be shorter",
                                            env={"CHARGING_BLOCK_MS": "20000"}),
    "tls-files-without-rediss": Row(["status"], 2, "CHARGING_TLS_", env={"CHARGING_TLS_CA_FILE": "ca.crt"}),
    "port-out-of-range": Row(["--redis-url", "redis://127.0.0.1:99999/0", "status"], 2, "from 1 to 65535"),
    "no-host": Row(["--redis-url", "redis:///0", "status"], 2, "no host"),
    "database-not-a-number": Row(["status", "--redis-url", "redis://{host}/zero"], 2, "must be a number"),
    "cluster-database": Row(["--redis-url", "redis+cluster://{host}/3", "status"], 2, "only database 0"),
    "unix-without-path": Row(["--redis-url", "unix://", "status"], 2, "socket's path"),
    "url-option-twice": Row(["--redis-url", "{url}", "status", "--redis-url", "{dead}"], 2, "given twice"),
    "secret-in-unreachable-url": Row(["status"], 1, REDACTED,
                                     env={"CHARGING_REDIS_URL": "{dead_with_password}"}),
    "burst-worker-redis-stopped": Row(["worker", "--burst"], 1, f"cannot reach Redis at {REDACTED}",
                                      env={"CHARGING_REDIS_URL": "{dead_with_password}"}),
    "burst-workers-redis-stopped": Row(["worker", "--burst", "--processes", "2"], 1,
                                       f"cannot reach Redis at {REDACTED}",
                                       env={"CHARGING_REDIS_URL": "{dead_with_password}"}),
    "maintain-once-redis-stopped": Row(["maintain", "--once"], 1, "start Redis there, or set CHARGING_REDIS_URL",
                                       env={"CHARGING_REDIS_URL": "{dead}"}),
    "demo-redis-stopped": Row(["demo", "--redis-url", "{dead}", "--charges", "10"], 1, "cannot reach Redis"),
    "demo-data-dir-with-url": Row(["demo", "--redis-url", "{url}", "--data-dir", "d"], 2, "--data-dir"),
    "chaos-with-url": Row(["--redis-url", "{url}", "chaos"], 2, "does not take --redis-url"),
    "bench-contradiction": Row(["bench", "tiny", "--quick"], 2, "contradict"),
}


@pytest.fixture
def busy_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture
def places(settings, tmp_path, busy_port) -> dict[str, str]:
    """What the rows' placeholders stand for; one account set up."""
    assert cli(settings, "accounts", "reset", "--count", "1").returncode == 0
    url = settings.redis_url.get_secret_value()
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"account": "account1", "service": "sms", "units": 1}\n')
    dead = free_port()  # nothing listens there: a stopped Redis
    return {"url": url, "host": urlsplit(url).netloc.rpartition("@")[2], "dead": f"redis://127.0.0.1:{dead}/0",
            "dead_with_password": f"redis://user:{SECRET}@127.0.0.1:{dead}/0", "file": str(requests),
            "busy": str(busy_port)}


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=HANG_CHECK_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv[1:]} did not finish within {HANG_CHECK_S} s")


def invocation(row: Row, places: dict[str, str], settings, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a row; temp dirs go to a dir of its own, to be checked."""
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, **environment(settings), "TMPDIR": str(tmp_path / "tmp"),
           **{k: v.format(**places) for k, v in row.env.items()}}
    return row.argv or [CHARGING, *(a.format(**places) for a in row.args)], env


@pytest.mark.parametrize("name", sorted(WRONG))
def test_a_wrong_invocation_gets_one_line_and_its_exit_code(name, places, settings, tmp_path):
    row = WRONG[name]
    argv, env = invocation(row, places, settings, tmp_path)
    done = run(argv, env, tmp_path)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, f"{name}: stderr was {done.stderr!r}"
    assert done.returncode == row.code, f"{name}: exit {done.returncode}, {lines[0]}"
    assert lines[0].startswith("error: ") and row.says in lines[0], f"{name}: {lines[0]}"
    assert "Traceback" not in done.stderr + done.stdout
    assert SECRET not in done.stderr + done.stdout, "a password shown"
    assert not list((tmp_path / "tmp").iterdir()), "a temp dir left behind"


def test_the_table_holds_every_row_of_the_issue_and_more():
    assert len(WRONG) >= 30


# The invocations of the issue that were refused and now work.

def test_version_is_printed_by_both_spellings(tmp_path):
    from charging import __version__

    for flag in ("--version", "-V"):
        done = run([CHARGING, flag], dict(os.environ), tmp_path)
        assert (done.returncode, done.stdout, done.stderr) == (0, f"charging {__version__}\n", "")


def test_redis_url_after_the_command_wins_over_the_environment(places, settings, tmp_path):
    env = {**os.environ, **environment(settings), "CHARGING_REDIS_URL": places["dead"]}
    done = run([CHARGING, "status", "--json", "--redis-url", places["url"]], env, tmp_path)
    assert done.returncode == 0 and done.stderr == ""
    assert json.loads(done.stdout)["partitions"][0]["partition"] == 0


def test_every_command_that_talks_to_redis_names_the_variable_in_its_help(tmp_path):
    commands = [["status"], ["produce"], ["authorize"], ["reserve"], ["extend"], ["commit"], ["release"],
                ["worker"], ["results"], ["demo"], ["accounts", "reset"], ["accounts", "show"],
                ["accounts", "top-up"], ["accounts", "list"]]
    for command in commands:
        done = run([CHARGING, *command, "--help"], {**os.environ, "COLUMNS": "200"}, tmp_path)
        assert done.returncode == 0 and "--redis-url" in done.stdout and "CHARGING_REDIS_URL" in done.stdout, command


def test_settings_accept_any_case_and_never_show_the_password(settings, tmp_path):
    env = {**os.environ, **environment(settings), "CHARGING_LOG_LEVEL": "INFO"}
    assert run([CHARGING, "status"], env, tmp_path).returncode == 0
    shown = run([sys.executable, "-c", "from charging.settings import Settings; "
                 f"s = Settings(redis_url='redis://u:{SECRET}@h/0'); print(repr(s)); print(s.redis_url)"],
                dict(os.environ), tmp_path)
    assert shown.returncode == 0 and SECRET not in shown.stdout
    assert "RedisUrl('redis://u:***@h/0')" in shown.stdout and "\nredis://u:***@h/0\n" in shown.stdout


def test_piped_output_is_never_wrapped_or_cut(settings, tmp_path):
    request_id = "a-request-id-long-enough-to-pass-eighty-columns-" + "x" * 40
    env = {**os.environ, **environment(settings), "COLUMNS": "80"}
    cli(settings, "accounts", "reset", "--count", "1")
    done = run([CHARGING, "authorize", "--account", "account1", "--service", "sms", "--units", "1",
                "--request-id", request_id], env, tmp_path)
    assert done.stdout == f"{request_id}: approved charged=1 balance=99\n"
    listed = run([CHARGING, "results"], env, tmp_path).stdout.splitlines()
    assert listed == [f"{request_id} account1 approved  charged=1 balance=99"]
    header = run([CHARGING, "status"], env, tmp_path).stdout.splitlines()[1]
    assert "partition" in header and "consumers" in header and "…" not in header


def test_accounts_reset_and_top_up_print_json(settings):
    reset = cli(settings, "accounts", "reset", "--count", "2", "--json")
    assert json.loads(reset.stdout) == {"accounts": 2, "balance": 100}
    topped = cli(settings, "accounts", "top-up", "account1", "5", "--json")
    assert json.loads(topped.stdout) == {"account": "account1", "balance": 105}


def test_produce_file_wait_shows_charged_and_balance_of_each(settings, tmp_path):
    cli(settings, "accounts", "reset", "--count", "2")
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"account": "account1", "service": "sms", "units": 2, "request_id": "f-1"}\n'
                        '{"account": "account2", "amount": 300, "request_id": "f-2"}\n')
    worker = subprocess.Popen([CHARGING, "worker", "--consumer", "first-hour"], env={**os.environ,
                              **environment(settings)}, stderr=subprocess.DEVNULL)
    try:
        done = cli(settings, "produce", "--file", str(requests), "--wait", "--timeout", "20")
    finally:
        worker.terminate()
        worker.wait(20)
    assert done.returncode == 1, done.stderr  # one of the two is rejected
    assert done.stdout.splitlines() == ["f-1: approved charged=2 balance=98",
                                        "f-2: rejected (insufficient_funds) charged=0 balance=100"]


def test_a_worker_waiting_for_redis_says_so_every_few_seconds_naming_the_server_without_its_password(tmp_path):
    """Redis stopped, not --burst: the worker waits for it and warns at every try, not once in
    ~7 s, and each warning says which server it waits for."""
    env = {**os.environ, "CHARGING_REDIS_URL": f"redis://user:{SECRET}@127.0.0.1:{free_port()}/0"}
    worker = subprocess.Popen([CHARGING, "worker"], env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(6)
    worker.send_signal(signal.SIGINT)
    _, stderr = worker.communicate(timeout=20)
    warnings = [json.loads(line) for line in stderr.splitlines()]
    assert worker.returncode == 0 and SECRET not in stderr
    assert len(warnings) >= 3 and {w["event"] for w in warnings} == {"redis_unavailable"}
    assert all(w["retry_in_s"] <= 2 for w in warnings)
    assert {w["redis"][:len(REDACTED)] for w in warnings} == {REDACTED}


def test_every_setting_with_a_bad_value_is_named_in_one_line(tmp_path):
    """Every variable the settings load field by field, all wrong at once: one line naming
    each, exit 2 (those checked together, the files, have rows of their own)."""
    from charging.settings import PREFIX, Settings

    names = [PREFIX + name.upper() for name, field in Settings.model_fields.items()
             if name != "tariff" and "Path" not in str(field.annotation)]
    done = run([CHARGING, "status"], {**os.environ, **dict.fromkeys(names, "not-a-value!")}, tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert [name for name in names if f"{name}='not-a-value!'" not in done.stderr] == []


# Help, read as a newcomer reads it.

def help_of(tmp_path: Path, *command: str) -> str:
    done = run([CHARGING, *command, "--help"], {**os.environ, "COLUMNS": "200"}, tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_no_flag_shows_a_value_in_help(tmp_path):
    """A flag takes no value: no `<bool>` after --burst, --json or --help, in any command."""
    from charging.cli import app
    from typer.main import get_command

    root = get_command(app)
    commands = [[]] + [[name] for name in root.commands] + [["accounts", name] for name in
                                                            root.commands["accounts"].commands]
    for command in commands:
        shown = help_of(tmp_path, *command)
        assert "--help" in shown and "<bool>" not in shown, (command, shown)
    assert "--burst" in help_of(tmp_path, "worker") and "<int range>" in help_of(tmp_path, "worker")


def test_serve_help_names_the_http_extra(tmp_path):
    assert "needs the [http] extra" in help_of(tmp_path, "serve")


def test_the_api_key_hint_of_serve_works_as_typed(tmp_path):
    """serve refuses to listen beyond loopback without keys and says how to make a keys
    file: that command, typed as shown, makes one."""
    refused = run([CHARGING, "serve", "--host", "0.0.0.0"], dict(os.environ), tmp_path)
    assert refused.returncode == 2, refused.stderr
    [hint] = re.findall(r"`(charging api-key [^`]*)`", refused.stderr)
    env = {**os.environ, "PATH": f"{Path(CHARGING).parent}{os.pathsep}{os.environ['PATH']}"}
    typed = subprocess.run(hint, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert typed.returncode == 0, typed.stderr
    assert "[keys.partner-a]" in (tmp_path / "keys.toml").read_text()


# Temp dirs: the demo removes its own on every way out, and keeps it only when asked.

def demo(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("CHARGING_REDIS_URL", None)
    return subprocess.Popen([CHARGING, "demo", "--charges", "300", "--accounts", "5", "--workers", "1", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_the_demo_removes_its_temp_dir_unless_kept(tmp_path):
    done = demo(tmp_path)
    stdout, stderr = done.communicate(timeout=120)
    assert done.returncode == 0, stderr
    assert not list(tmp_path.iterdir())
    kept = demo(tmp_path, "--keep")
    stdout, stderr = kept.communicate(timeout=120)
    assert kept.returncode == 0, stderr
    [data_dir] = tmp_path.iterdir()
    assert f"kept {data_dir} " in stdout
    assert {"redis.log", "worker.log"} <= {p.name for p in data_dir.iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_demo_stopped_half_way_removes_its_temp_dir(tmp_path, stop):
    running = demo(tmp_path, "--charges", "500000")  # still publishing when stopped
    for line in running.stdout:
        if "accounts reset" in line:  # its server and dir exist
            break
    assert list(tmp_path.iterdir())
    running.send_signal(stop)
    running.communicate(timeout=60)
    assert running.returncode != 0
    assert not list(tmp_path.iterdir())
    assert left_running(tmp_path) == [], "the demo left its workers or its server running"


def left_running(tmp_path: Path) -> list[str]:
    """The command lines of processes still running with the demo's environment (the test
    gives it a TMPDIR of its own, which its server and workers inherit)."""
    mark = f"TMPDIR={tmp_path}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if mark in proc.joinpath("environ").read_bytes().split(b"\0"):
                found.append(proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found
