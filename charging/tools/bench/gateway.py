"""http mode: the authorize path through the HTTP gateway (`charging serve`, one process) instead
of a Redis connection: the same load, clients and checker as the authorize mode, so the two
rows of one run show what HTTP adds. Closed loop, then paced at the profile's http_rate.
Each client keeps one HTTP/1.1 connection open (keep-alive), as a backend would."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time

from charging.tools.bench.authorize import client_mode
from charging.tools.bench.context import Context
from charging.tools.bench.profile import Profile
from charging.tools.bench.result import ModeResult
from charging.tools.redis_server import free_port

START_TIMEOUT_S = 30


class HttpClient:
    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def __call__(self, request: dict) -> str:
        self.connection.request("POST", "/v1/charges/authorize", body=json.dumps(request),
                                headers={"Content-Type": "application/json"})
        answer = self.connection.getresponse()
        body = json.loads(answer.read())
        if answer.status != 200:
            raise RuntimeError(f"{answer.status} {body.get('reason')}: {body.get('detail')}")
        return body["status"]


def run(ctx: Context, profile: Profile) -> list[ModeResult]:
    return [client_mode(ctx, profile, "http authorize", rate, seed, HttpClient, _gateway,
                        "clients over HTTP keep-alive, {label}, one `charging serve` process; latency measured "
                        "in the client", extra={"gateway_processes": 1})
            for rate, seed in ((None, 5), (profile.http_rate, 6))]


class _gateway:
    """`charging serve` on a free loopback port for this mode's namespace."""

    def __init__(self, settings):
        self.settings = settings
        self.port = free_port()

    def __enter__(self) -> tuple[int]:
        env = {**os.environ, "CHARGING_REDIS_URL": self.settings.redis_url.get_secret_value(),
               "CHARGING_NAMESPACE": self.settings.namespace, "CHARGING_PARTITIONS": str(self.settings.partitions),
               "CHARGING_REDIS_CLUSTER": "1" if self.settings.redis_cluster else "0", "CHARGING_LOG_LEVEL": "warning"}
        self.process = subprocess.Popen([sys.executable, "-m", "charging", "serve", "--port", str(self.port)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("charging serve did not become ready (is the [http] extra installed?)")
            time.sleep(0.1)
        return (self.port,)

    def _ready(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            connection.request("GET", "/readyz")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)
