"""`charging serve`: the gateway on uvicorn, one asyncio Redis pool per process.

Without a keys file it listens on loopback only and says so; asked to listen elsewhere
without keys, it refuses to start."""

from __future__ import annotations

import os
import shutil
import tempfile

import uvicorn

from charging.app.http.access import Keyring, is_loopback
from charging.app.http.app import create_app
from charging.app.http.gateway import log
from charging.app.http.metrics import MULTIPROC_ENV
from charging.settings import Settings

APP = "charging.app.http.app:from_environment"


class Refused(RuntimeError):
    pass


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    keyring = Keyring.load(settings.http_keys_file)  # a broken keys file stops the start, not the first request
    if keyring.empty and not is_loopback(host):
        raise Refused(f"refusing to listen on {host} without API keys: set CHARGING_HTTP_KEYS_FILE to a keys file "
                      "(`charging api-key partner-a --scope authorize > keys.toml` makes one; docs/http-api.md), "
                      "or listen on 127.0.0.1")
    access = (f"{len(keyring.by_digest)} API key(s) from {settings.http_keys_file}" if not keyring.empty else
              "no API keys: loopback callers may use every endpoint, anyone else is refused")
    log.warning("gateway_listening", url=f"http://{host}:{port}", access=access, workers=workers,
                redis=str(settings.redis_url))
    # proxy_headers off: the loopback rule judges the socket's peer, never a header a caller sets.
    options = {"host": host, "port": port, "proxy_headers": False, "server_header": False, "access_log": False,
               "log_config": None, "lifespan": "on", "timeout_graceful_shutdown": 5}
    if workers == 1:
        uvicorn.run(create_app(settings, keyring), **options)
        return
    # Worker processes read their settings from the environment (and --redis-url from here).
    os.environ["CHARGING_REDIS_URL"] = settings.redis_url.get_secret_value()
    if os.environ.get(MULTIPROC_ENV):  # the operator's own directory: kept
        uvicorn.run(APP, factory=True, workers=workers, **options)
        return
    os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="charging-http-metrics-")
    try:
        uvicorn.run(APP, factory=True, workers=workers, **options)
    finally:
        shutil.rmtree(os.environ.pop(MULTIPROC_ENV), ignore_errors=True)
