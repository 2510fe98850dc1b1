"""For the operator: liveness, readiness and metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from charging.app.http import metrics
from charging.app.http.access import Caller
from charging.app.http.endpoints import Endpoint
from charging.app.http.gateway import Gateway, check_every_account
from charging.app.http.problems import unavailable
from charging.plan import call


async def healthz(request: Request, caller: None, gateway: Gateway) -> JSONResponse:
    """The process answers; says nothing about Redis (that is /readyz)."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request, caller: None, gateway: Gateway) -> JSONResponse:
    """Redis answers and holds the function library: charges can be settled."""
    await gateway.run(call(lambda client: client.ping()))
    libraries = await gateway.run(call(lambda client: client.function_list(library="charging")))
    if not libraries:
        raise unavailable("not_ready", "Redis has no charging function library (the maintainer loads it: "
                                       "`charging maintain`)")
    if not gateway.prepared:
        raise unavailable("not_ready", "still checking the server (version, partition count)")
    return JSONResponse({"status": "ready", "redis": "ok", "library": "loaded"})


async def prometheus(request: Request, caller: Caller, gateway: Gateway) -> Response:
    check_every_account(caller)
    body, media_type = metrics.exposition()
    return Response(body, media_type=media_type)


ENDPOINTS = [
    Endpoint("GET", "/healthz", None, "Liveness: the process answers", healthz, "operations",
             answers=((200, "Health"),)),
    Endpoint("GET", "/readyz", None, "Readiness: Redis answers and holds the function library", readyz,
             "operations", answers=((200, "Health"),), errors=(503,)),
    Endpoint("GET", "/metrics", "read", "Prometheus metrics of the gateway (keys without account limits)",
             prometheus, "operations", media_type="text/plain", errors=(403,)),
]
