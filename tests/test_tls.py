"""rediss:// with a CA and a client certificate: a redis-server that speaks TLS (and asks
for client certificates) on a free port, certificates from a throwaway CA made here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydantic
import pytest
import redis

from charging import codec
from charging.connection import connect
from charging.keys import Keys
from charging.settings import Settings
from charging.tools.redis_server import RedisServer, free_port
from producer import Producer
from tests.conftest import cli


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def signed(ca: Path, name: str, extensions: str) -> tuple[Path, Path]:
    key, csr, cert, ext = (ca.parent / f"{name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    ext.write_text(extensions + "\n")
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key")),
            "-CAcreateserial", "-days", "1", "-out", str(cert), "-extfile", str(ext))
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    here = tmp_path_factory.mktemp("tls")
    ca = here / "ca.crt"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(here / "ca.key"), "-out", str(ca),
            "-days", "1", "-subj", "/CN=charging test CA")
    server_cert, server_key = signed(ca, "server", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    client_cert, client_key = signed(ca, "client", "extendedKeyUsage=clientAuth")
    return {"ca": ca, "server_cert": server_cert, "server_key": server_key, "client_cert": client_cert,
            "client_key": client_key}


@pytest.fixture(scope="module")
def tls_port(certificates, tmp_path_factory):
    port = free_port()
    args = ("--tls-port", str(port), "--tls-cert-file", str(certificates["server_cert"]),
            "--tls-key-file", str(certificates["server_key"]), "--tls-ca-cert-file", str(certificates["ca"]),
            "--tls-auth-clients", "yes")
    with RedisServer(tmp_path_factory.mktemp("tls-redis"), extra_args=args):
        yield port


def tls_settings(tls_port, certificates, **files) -> Settings:
    chosen = {"tls_ca_file": certificates["ca"], "tls_cert_file": certificates["client_cert"],
              "tls_key_file": certificates["client_key"], **files}
    return Settings(redis_url=f"rediss://127.0.0.1:{tls_port}/0", namespace=f"tls{os.getpid()}",
                    reclaim_idle_ms=500, maintenance_interval_s=0.2, block_ms=200, **chosen)


def test_a_charge_runs_through_tls_with_a_client_certificate(tls_port, certificates, monkeypatch):
    settings = tls_settings(tls_port, certificates)
    client = connect(settings)
    assert issubclass(client.connection_pool.connection_class, redis.SSLConnection)
    codec.set_balances(client, settings, [("account1", 100)])
    producer = Producer(client, settings)
    [request_id] = producer.submit([{"account": "account1", "service": "voice", "units": 3}], reply=True)

    # the worker as deployed: a process configured only through CHARGING_* variables
    for name, path in (("CA", "ca"), ("CERT", "client_cert"), ("KEY", "client_key")):
        monkeypatch.setenv(f"CHARGING_TLS_{name}_FILE", str(certificates[path]))
    worker = cli(settings, "worker", "--burst")

    assert worker.returncode == 0, worker.stderr
    outcome = producer.wait([request_id], timeout=10)[request_id]
    assert (outcome.status, outcome.charged, outcome.balance) == ("approved", 15, 85)
    assert producer.authorize({"account": "account1", "amount": 5}).balance == 80
    assert int(client.hget(Keys(settings.namespace, 0).balances, "account1")) == 80


def test_without_the_client_certificate_the_server_refuses(tls_port, certificates):
    settings = tls_settings(tls_port, certificates, tls_cert_file=None, tls_key_file=None)
    with pytest.raises(redis.ConnectionError):
        connect(settings.model_copy(update={"retry_attempts": 0}))


def test_without_the_ca_the_server_certificate_is_not_trusted(tls_port, certificates):
    settings = tls_settings(tls_port, certificates, tls_ca_file=None)
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        connect(settings.model_copy(update={"retry_attempts": 0}))


def test_certificate_settings_need_a_rediss_url(certificates):
    with pytest.raises(pydantic.ValidationError, match="rediss://"):
        Settings(redis_url="redis://127.0.0.1:6379/0", tls_ca_file=certificates["ca"])
    with pytest.raises(pydantic.ValidationError, match="go together"):
        Settings(redis_url="rediss://127.0.0.1:6379/0", tls_cert_file=certificates["client_cert"])
