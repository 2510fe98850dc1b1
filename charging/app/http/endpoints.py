"""The gateway's endpoints in one table: the app routes them and the OpenAPI document
describes them from the same entries, so the two cannot drift apart."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from charging.app.http.access import Caller
from charging.app.http.gateway import Gateway

Handler = Callable[[Request, Caller | None, Gateway], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # Starlette's template: {name} or {name:path}
    scope: str | None  # the key scope it needs; None: open to anyone (health, the page)
    summary: str
    handler: Handler
    tag: str
    body: str | None = None  # the schema (openapi.py) of its JSON body
    answers: tuple[tuple[int, str | None], ...] = ((200, None),)  # status, the schema of the body
    media_type: str = "application/json"
    errors: tuple[int, ...] = ()  # the problem statuses it may answer besides the common ones

    @property
    def template(self) -> str:
        """The path as OpenAPI writes it."""
        return re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", self.path)

    async def respond(self, request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway
        if self.scope is None:
            return await self.handler(request, None, gateway)
        caller = gateway.caller(request.headers.get("authorization"), request.client and request.client.host)
        gateway.admit(caller, self.scope)
        return await self.handler(request, caller, gateway)
