"""The library as an application uses it: it prints nothing unless the application
configures logging, and its types hold for mypy --strict."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from charging import codec
from tests.conftest import environment, worker_running

APPLICATION = textwrap.dedent("""
    import asyncio, logging, sys
    from charging.connection import connect, connect_async
    from charging.settings import Settings
    from producer import AsyncProducer, BacklogFull, Producer

    if sys.argv[1:] == ["--log"]:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s %(message)s")
    settings = Settings()
    producer = Producer(connect(settings), settings)
    assert producer.authorize({"account": "account1", "amount": 1}).approved
    assert producer.charge({"account": "account1", "amount": 1}, timeout=30).approved
    try:
        producer.submit([{"account": "account1", "amount": 1}] * 3)  # over CHARGING_MAX_BACKLOG: a warning
    except BacklogFull:
        pass
    else:
        raise AssertionError("expected BacklogFull")

    async def main():
        client = await connect_async(settings)
        try:
            return await AsyncProducer(client, settings).authorize({"account": "account1", "amount": 1})
        finally:
            await client.aclose()

    assert asyncio.run(main()).approved
""")


def test_an_application_that_charges_prints_nothing_unless_it_configures_logging(client, settings):
    codec.set_balances(client, settings, [("account1", 100)])
    env = {**os.environ, **environment(settings), "CHARGING_LOG_LEVEL": "debug", "CHARGING_MAX_BACKLOG": "2"}

    with worker_running(settings):
        quiet = subprocess.run([sys.executable, "-c", APPLICATION], env=env, capture_output=True, text=True,
                               timeout=120)
        logged = subprocess.run([sys.executable, "-c", APPLICATION, "--log"], env=env, capture_output=True,
                                text=True, timeout=120)

    assert quiet.returncode == 0, quiet.stderr
    assert (quiet.stdout, quiet.stderr) == ("", "")
    assert logged.returncode == 0, logged.stderr
    events = logged.stderr.splitlines()
    for expected in ("charging.connection redis_connected", "charging.producer authorized",
                     "charging.producer backlog_full"):
        assert expected in events, f"{expected!r} not in {events}"


TYPING = Path(__file__).resolve().parent / "typing"


def mypy_strict(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """mypy --strict on a script outside the source tree, so the package is found where it
    is installed (and must say it is typed: py.typed)."""
    shutil.copy(TYPING / script, tmp_path / script)
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), script],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_a_user_script_of_producer_async_producer_and_subscriber_passes_mypy_strict(tmp_path):
    checked = mypy_strict(tmp_path, "user_script.py")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith("Success")


def test_mypy_sees_the_real_types_not_any(tmp_path):
    checked = mypy_strict(tmp_path, "wrong_types.py")
    assert checked.returncode == 1
    assert 'Incompatible return value type (got "int", expected "str")' in checked.stdout
    assert 'Incompatible types in assignment (expression has type "list[str]", variable has type "int")' \
        in checked.stdout
