"""Process supervision for `charging worker --processes N`: N consumers, each its own
process with its own connection pool; a consumer that dies is replaced; SIGTERM and
SIGINT are passed on so every consumer finishes the batch in hand. With a metrics port,
the supervisor serves the consumers' metrics summed (worker/metrics.py)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import time
from contextlib import nullcontext

from redis.exceptions import RedisClusterException

from charging import log as logging_setup
from charging.connection import FATAL_ERRORS, TRANSIENT_ERRORS, Backoff, connect
from charging.log import logger
from charging.settings import Settings
from worker import metrics
from worker.loop import Worker
from worker.maintainer import Maintainer

log = logger("charging.supervisor")

# A consumer's exit code for an error no restart can fix (a refused login, say): the
# supervisor stops the others and exits 1 instead of restarting it forever.
REFUSED_EXIT = 3
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def consumer_names(base: str | None, processes: int) -> list[str]:
    """Stable names (not hostname-pid): a restarted worker finds its own pending entries,
    and consumers do not pile up in the group with every restart."""
    base = base or socket.gethostname()
    return [base] if processes == 1 else [f"{base}-{i}" for i in range(processes)]


def run_one(settings: Settings, consumer: str, burst: bool, partitions: list[int] | None = None,
            metrics_port: int | None = None, record_metrics: bool = False) -> int:
    logging_setup.configure(settings.log_level)
    if metrics_port is not None:
        metrics.serve(metrics_port)
    elif record_metrics:
        metrics.enable()  # a consumer of --processes N: the supervisor serves the port
    for sig in (signal.SIGTERM, signal.SIGINT):  # nothing in hand yet: stopping is just exiting
        signal.signal(sig, lambda *_: sys.exit(0))
    worker = Worker(connect_when_up(settings, wait=not burst), settings, consumer, partitions, burst)
    signal.signal(signal.SIGTERM, worker.stop)  # finish the batch in hand, then exit 0
    signal.signal(signal.SIGINT, worker.stop)
    try:
        return worker.run()
    except Exception:  # logged as one JSON line like every other; the supervisor restarts it
        log.exception("worker_crashed", consumer=consumer)
        return 1


def run_maintainer(settings: Settings, partitions: list[int] | None = None, once: bool = False) -> int:
    """`charging maintain`: one process; SIGTERM / SIGINT end it after the round in hand."""
    logging_setup.configure(settings.log_level)
    maintainer = Maintainer(connect_when_up(settings, wait=not once), settings, partitions, once)
    signal.signal(signal.SIGTERM, maintainer.stop)
    signal.signal(signal.SIGINT, maintainer.stop)
    return maintainer.run()


def connect_when_up(settings: Settings, wait: bool = True):
    """A worker started while Redis is down or a cluster is failing over waits for it
    instead of exiting; an orchestrator restart loop is not needed for that. It says so
    at every try (at most 2 s apart), naming the server. A refused login or a missing
    database is no outage: connect raises them (connection.FATAL_ERRORS) and the worker
    exits. A one-shot run (--burst, --once) does not wait either: someone is waiting for
    its answer, so Redis down is its error (one line from the CLI, exit 1)."""
    backoff = Backoff(cap=2.0)
    unavailable = log.bind(redis=str(settings.redis_url))  # str() hides the password
    while True:
        try:
            return connect(settings)
        except (*TRANSIENT_ERRORS, RedisClusterException) as exc:
            if not wait:
                raise
            backoff.wait(unavailable, exc)


def _die_with(supervisor: int) -> None:
    """SIGTERM this consumer when its supervisor dies, however it dies (SIGKILL too): it then
    finishes the call in hand, as at any stop. Left running it would go on alone, and the
    next supervisor would start a second consumer of the same name. Linux only (prctl)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes  # here: a Python built without it still runs every other command

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) refused")
    except (ImportError, OSError, AttributeError) as exc:  # no dlopen (a static build), no prctl
        log.warning("supervisor_death_unwatched", error=str(exc))
        return
    if os.getppid() != supervisor:  # it died before that took hold
        os.kill(os.getpid(), signal.SIGTERM)


def _child(settings_dump: dict, consumer: str, burst: bool, partitions: list[int] | None,
           record_metrics: bool, supervisor: int) -> None:
    settings = Settings(**settings_dump)
    logging_setup.configure(settings.log_level)
    _die_with(supervisor)
    try:
        code = run_one(settings, consumer, burst, partitions, record_metrics=record_metrics)
    except FATAL_ERRORS as exc:
        log.error("consumer_refused", consumer=consumer, error=str(exc))
        code = REFUSED_EXIT
    raise SystemExit(code)


def run(settings: Settings, processes: int = 1, consumer: str | None = None, burst: bool = False,
        partitions: list[int] | None = None, metrics_port: int | None = None) -> int:
    names = consumer_names(consumer, processes)
    if processes == 1:
        return run_one(settings, names[0], burst, partitions, metrics_port)
    logging_setup.configure(settings.log_level)
    # The metrics directory is made before the consumers start (they inherit it) and
    # removed however the supervisor ends, a busy port included.
    served = nullcontext() if metrics_port is None else metrics.multiprocess_served(metrics_port)
    with served as metrics_dir:
        # One connection first: a refused login or a wrong database ends here, with one
        # error, instead of in every consumer; the library is loaded once.
        connect_when_up(settings, wait=not burst).close()
        return _supervise(settings, names, burst, partitions, metrics_dir is not None)


def _supervise(settings: Settings, names: list[str], burst: bool, partitions: list[int] | None,
               record_metrics: bool) -> int:
    ctx = multiprocessing.get_context("spawn")  # no inherited sockets or locks
    dump = settings.model_dump()
    stopping = False

    def start(name: str):
        proc = ctx.Process(target=_child, args=(dump, name, burst, partitions, record_metrics, os.getpid()),
                           name=name)
        proc.start()
        return proc

    def stop(*_):
        nonlocal stopping
        stopping = True
        for proc in children.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: finish the batch in hand, then exit 0

    children = {name: start(name) for name in names}
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes: dict[str, int] = {}
    while len(codes) < len(children):
        for name, proc in children.items():
            if name in codes or proc.is_alive():
                continue
            metrics.process_dead(proc.pid)
            if proc.exitcode == REFUSED_EXIT:
                codes[name] = 1
                stop()
                continue
            if not stopping and not burst and proc.exitcode != 0:
                log.warning("consumer_died", consumer=name, exitcode=proc.exitcode)
                children[name] = start(name)
                time.sleep(0.5)  # do not spin if it dies at once every time
                continue
            # A consumer stopped before it had set its own handler dies of the SIGTERM itself:
            # it held nothing, so that is a clean stop.
            codes[name] = 0 if stopping and proc.exitcode == -signal.SIGTERM else proc.exitcode
        time.sleep(0.1)
    return max(codes.values(), default=0)
