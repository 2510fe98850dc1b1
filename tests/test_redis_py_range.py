"""pyproject.toml allows a range of redis-py, and charging/connection.py overrides a few of
its internals (each says why). This runs a smoke test on the lowest and the highest release
the range allows, each installed from the registry into a directory of its own that shadows
the one of this environment: connect and load the library, a charge settled by a worker, an
authorize; on a single server, over TLS with a client certificate, and on a cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import environment
from tests.documents import ROOT
from tests.test_tls import certificates, tls_port, tls_settings  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

SMOKE = """
import sys

import redis

from charging import codec
from charging.connection import connect
from charging.settings import Settings
from producer import Producer
from worker.loop import Worker

assert redis.__version__ == sys.argv[1], redis.__file__
settings = Settings()
client = connect(settings)
codec.set_balances(client, settings, [("account1", 100)])
producer = Producer(client, settings)
producer.submit([{"account": "account1", "service": "sms", "units": 2, "request_id": "smoke-1"}])
Worker(connect(settings), settings, "smoke", burst=True).run()
outcome = producer.authorize({"account": "account1", "amount": 1, "request_id": "smoke-2"})
print(outcome.status, outcome.balance)
"""


def allowed() -> tuple[str, str]:
    """The lower bound and the exclusive upper bound of redis-py in pyproject.toml."""
    [spec] = [r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
              if r.startswith("redis")]
    return re.search(r">=([\d.]+)", spec)[1], re.search(r"<([\d.]+)", spec)[1]


def install(requirement: str, target: Path) -> str:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), requirement],
                   check=True, capture_output=True, timeout=120)
    [dist] = target.glob("redis-*.dist-info")
    return dist.name.removeprefix("redis-").removesuffix(".dist-info")


@pytest.fixture(scope="module", params=["lowest", "highest"])
def redis_py(request, tmp_path_factory) -> tuple[str, Path]:
    """(version, the directory that holds it)."""
    low, below = allowed()
    target = tmp_path_factory.mktemp(f"redis-py-{request.param}")
    version = install(f"redis=={low}" if request.param == "lowest" else f"redis>={low},<{below}", target)
    return version, target


def smoke(redis_py: tuple[str, Path], settings, tmp_path, **extra: str) -> str:
    version, target = redis_py
    env = {**os.environ, **environment(settings), **extra, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", SMOKE, version], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"redis-py {version}:\n{done.stderr}"
    return done.stdout


def test_the_lower_bound_has_what_the_engine_uses():
    """5.x lacks Retry.update_retries and (before 5.3) ExponentialWithJitterBackoff, which
    charging/connection.py calls: a lower bound below 6.0 is a promise the smoke tests above
    would break."""
    low, _ = allowed()
    assert tuple(int(part) for part in low.split(".")) >= (6, 0)


def test_a_charge_on_a_single_server(redis_py, settings, tmp_path):
    assert smoke(redis_py, settings, tmp_path) == "approved 97\n"


@pytest.mark.parametrize("backend", ["cluster"], indirect=True)
def test_a_charge_on_a_cluster(redis_py, settings, tmp_path):
    assert smoke(redis_py, settings, tmp_path) == "approved 97\n"


def test_a_charge_over_tls(redis_py, tls_port, certificates, tmp_path):  # noqa: F811 (fixtures)
    settings = tls_settings(tls_port, certificates)
    files = {"CHARGING_TLS_CA_FILE": str(certificates["ca"]), "CHARGING_TLS_CERT_FILE": str(certificates["client_cert"]),
             "CHARGING_TLS_KEY_FILE": str(certificates["client_key"])}
    settings = settings.model_copy(update={"namespace": f"{settings.namespace}v{redis_py[0]}"})
    assert smoke(redis_py, settings, tmp_path, **files) == "approved 97\n"
