"""Process supervision for `charging worker --processes N`: N consumers, each its own
process with its own connection pool; a consumer that dies is replaced; SIGTERM and
SIGINT are passed on so every consumer finishes the batch in hand. With a metrics port,
the supervisor serves the consumers' metrics summed (worker/metrics.py)."""

from __future__ import annotations

import multiprocessing
import signal
import socket
import sys
import time

from redis.exceptions import RedisClusterException

from charging import log as logging_setup
from charging.connection import TRANSIENT_ERRORS, Backoff, connect
from charging.log import logger
from charging.settings import Settings
from worker import metrics
from worker.loop import Worker

log = logger("charging.supervisor")


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
    worker = Worker(connect_when_up(settings), settings, consumer, partitions, burst)
    signal.signal(signal.SIGTERM, worker.stop)  # finish the batch in hand, then exit 0
    signal.signal(signal.SIGINT, worker.stop)
    try:
        return worker.run()
    except Exception:  # logged as one JSON line like every other; the supervisor restarts it
        log.exception("worker_crashed", consumer=consumer)
        return 1


def connect_when_up(settings: Settings):
    """A worker started while Redis is down or a cluster is failing over waits for it
    instead of exiting; an orchestrator restart loop is not needed for that."""
    backoff = Backoff()
    while True:
        try:
            return connect(settings)
        except (*TRANSIENT_ERRORS, RedisClusterException) as exc:
            backoff.wait(log, exc)


def _child(settings_dump: dict, consumer: str, burst: bool, partitions: list[int] | None,
           record_metrics: bool) -> None:
    raise SystemExit(run_one(Settings(**settings_dump), consumer, burst, partitions, record_metrics=record_metrics))


def run(settings: Settings, processes: int = 1, consumer: str | None = None, burst: bool = False,
        partitions: list[int] | None = None, metrics_port: int | None = None) -> int:
    names = consumer_names(consumer, processes)
    if processes == 1:
        return run_one(settings, names[0], burst, partitions, metrics_port)
    logging_setup.configure(settings.log_level)
    metrics_dir = None
    if metrics_port is not None:
        metrics_dir = metrics.prepare_multiprocess()  # before the consumers start: they inherit it
        metrics.serve_multiprocess(metrics_port, metrics_dir)
    try:
        return _supervise(settings, names, burst, partitions, metrics_dir is not None)
    finally:
        if metrics_dir:
            metrics.remove_multiprocess(metrics_dir)


def _supervise(settings: Settings, names: list[str], burst: bool, partitions: list[int] | None,
               record_metrics: bool) -> int:
    ctx = multiprocessing.get_context("spawn")  # no inherited sockets or locks
    dump = settings.model_dump()
    stopping = False

    def start(name: str):
        proc = ctx.Process(target=_child, args=(dump, name, burst, partitions, record_metrics), name=name)
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
