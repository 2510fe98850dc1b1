"""`charging serve`: the gateway on uvicorn, one asyncio Redis pool per process.

Without a keys file it listens on loopback only and says so; asked to listen elsewhere
without keys, it refuses to start. It binds its socket itself, before the app starts: a
port in use is one sentence, and `gateway_listening` is logged only once the port is ours."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile

import uvicorn
from uvicorn.supervisors import Multiprocess

from charging.app.http import deadlines
from charging.app.http.access import Keyring, is_loopback
from charging.app.http.app import create_app
from charging.app.http.gateway import log
from charging.app.http.metrics import MULTIPROC_ENV
from charging.settings import Settings

APP = "charging.app.http.app:from_environment"


class Refused(RuntimeError):
    pass


class PortUnavailable(RuntimeError):
    pass


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    keyring = Keyring.load(settings.http_keys_file)  # a broken keys file stops the start, not the first request
    if keyring.empty and not is_loopback(host):
        raise Refused(f"refusing to listen on {host} without API keys: set CHARGING_HTTP_KEYS_FILE to a keys file "
                      "(`charging api-key partner-a --scope authorize > keys.toml` makes one; docs/http-api.md), "
                      "or listen on 127.0.0.1")
    access = (f"{len(keyring.by_digest)} API key(s) from {settings.http_keys_file}" if not keyring.empty else
              "no API keys: loopback callers may use every endpoint, anyone else is refused")
    listener = bound(host, port)
    log.warning("gateway_listening", url=f"http://{host}:{port}", access=access, workers=workers,
                redis=str(settings.redis_url))
    # proxy_headers off: the loopback rule judges the socket's peer, never a header a caller sets.
    options = {"host": host, "port": port, "proxy_headers": False, "server_header": False, "access_log": False,
               "log_config": None, "lifespan": "on", "timeout_graceful_shutdown": 5,
               "http": deadlines.protocol(settings)}
    with contextlib.suppress(KeyboardInterrupt), listener:  # Ctrl-C: uvicorn has shut down gracefully
        if workers == 1:
            uvicorn.Server(uvicorn.Config(create_app(settings, keyring), **options)).run(sockets=[listener])
            return
        # Worker processes read their settings from the environment (and --redis-url from here).
        os.environ["CHARGING_REDIS_URL"] = settings.redis_url.get_secret_value()
        if os.environ.get(MULTIPROC_ENV):  # the operator's own directory: kept
            _processes(options, workers, listener)
            return
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="charging-http-metrics-")
        try:
            _processes(options, workers, listener)
        finally:
            shutil.rmtree(os.environ.pop(MULTIPROC_ENV), ignore_errors=True)


def bound(host: str, port: int) -> socket.socket:
    """A socket bound to host:port as uvicorn binds one (SO_REUSEADDR, inherited by --workers
    processes); PortUnavailable when it cannot be, in one sentence."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        hint = "; pick another with --port" if exc.errno == errno.EADDRINUSE else ""
        raise PortUnavailable(f"cannot listen on {host}:{port}: {(exc.strerror or str(exc)).lower()}{hint}") from None
    listener.set_inheritable(True)
    return listener


def _processes(options: dict, workers: int, listener: socket.socket) -> None:
    Multiprocess(uvicorn.Config(APP, factory=True, workers=workers, **options), sockets=[listener]).run()
