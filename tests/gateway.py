"""The HTTP gateway for the tests: in this process on a free port (uvicorn in a thread, real
HTTP), or as `charging serve` the way a user starts it."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from charging.app.http.access import Keyring, new_key
from charging.app.http.app import create_app
from charging.settings import Settings
from charging.tools.redis_server import free_port
from tests.conftest import CHARGING, environment


class Gateway:
    """create_app(settings, keyring) served by uvicorn in a thread of this process."""

    def __init__(self, settings: Settings, keyring: Keyring | None = None):
        self.port = free_port()
        config = uvicorn.Config(create_app(settings, keyring or Keyring()), host="127.0.0.1", port=self.port,
                                log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Gateway:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the gateway did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


def keys_file(path: Path, *keys: tuple[str, list[str], dict]) -> dict[str, str]:
    """Write a keys file of (name, scopes, options) and return name -> token."""
    tokens, tables = {}, []
    for name, scopes, options in keys:
        tokens[name], table = new_key(name, scopes, options.get("accounts"), options.get("rate"))
        tables.append(table + "".join(f"{k} = {v}\n" for k, v in options.items() if k == "burst"))
    path.write_text("\n".join(tables))
    return tokens


class Served:
    """`charging serve` in a subprocess, configured through the environment only."""

    def __init__(self, settings: Settings, *args: str, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        env = {**os.environ, **environment(settings), **(extra_env or {})}
        self.process = subprocess.Popen([CHARGING, "serve", "--port", str(self.port), *args], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Served:
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.process.stderr.read()
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "charging serve did not become ready"
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(20)
