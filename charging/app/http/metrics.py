"""Prometheus metrics of the gateway, served at /metrics. With `charging serve --workers N`
the processes write them to files in one directory (prometheus-client multiprocess mode,
as the worker's supervisor does) and /metrics sums them."""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS = Counter("charging_http_requests", "HTTP requests answered, by route and status.",
                   ["method", "route", "status"])
SECONDS = Histogram("charging_http_request_seconds", "Time to answer an HTTP request (SSE streams: to open them).",
                    ["route"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
STREAMS = Gauge("charging_http_streams", "Open Server-Sent Events streams.", multiprocess_mode="livesum")


def exposition() -> tuple[bytes, str]:
    if path := os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class Measured:
    """ASGI middleware: counts every answer by its route template (not its path, which holds
    ids) and times it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began = time.perf_counter()
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = getattr(scope.get("route"), "path", "unmatched")
                SECONDS.labels(route).observe(time.perf_counter() - began)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], route, str(status)).inc()
