"""The ASGI app: the endpoint tables of legacy, rest, plans, outcomes, live and ops, the pages
(live page, API docs, OpenAPI), and every error answered as a problem."""

from __future__ import annotations

import contextlib
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from charging import log as logging_setup
from charging.app.http import legacy, live, ops, outcomes, plans, rest
from charging.app.http.access import Keyring
from charging.app.http.gateway import Gateway, log
from charging.app.http.metrics import Measured
from charging.app.http.openapi import document
from charging.app.http.problems import Problem
from charging.settings import Settings

STATIC = Path(__file__).resolve().parent / "static"
ENDPOINTS = [*legacy.ENDPOINTS, *rest.ENDPOINTS, *plans.ENDPOINTS, *outcomes.ENDPOINTS, *live.ENDPOINTS, *ops.ENDPOINTS]


def create_app(settings: Settings, keyring: Keyring | None = None) -> Starlette:
    keyring = keyring if keyring is not None else Keyring.load(settings.http_keys_file)
    openapi = document(ENDPOINTS, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        gateway = Gateway(settings, keyring)
        app.state.gateway = gateway
        app.state.live = live.LiveFeed(gateway)
        await gateway.start()
        try:
            yield
        finally:
            await app.state.live.stop()
            await gateway.stop()

    async def openapi_json(request: Request) -> JSONResponse:
        return JSONResponse(openapi)

    routes = [Route(e.path, e.respond, methods=[e.method], name=f"{e.method} {e.path}") for e in ENDPOINTS]
    routes += [
        Route("/", _page("live.html"), methods=["GET"]),
        Route("/docs", _page("docs.html"), methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(Measured)], exception_handlers={
        Problem: _problem, HTTPException: _http_error, ClientDisconnect: _gone, Exception: _unexpected})


def from_environment() -> Starlette:
    """The app as `charging serve --workers N` runs it in each process: settings from CHARGING_*."""
    settings = Settings()
    logging_setup.configure(settings.log_level)
    return create_app(settings)


def _page(name: str):
    async def page(request: Request) -> Response:
        return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})
    return page


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response(request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) as problems too."""
    assert isinstance(exc, HTTPException)
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return Problem(exc.status_code, reason, str(exc.detail), dict(exc.headers or {})).response(request.url.path)


async def _gone(request: Request, exc: Exception) -> Response:
    """The client left before its body was in (or the body's deadline passed): no one to answer."""
    return Response(status_code=400)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("request_failed", path=request.url.path, exception=repr(exc), exc_info=exc)
    return Problem(500, "internal_error", "the gateway failed on this request; see its log").response(request.url.path)
