"""Errors as RFC 9457 problem details (application/problem+json).

Every problem carries ``reason``: for a request that cannot be charged, the same reason code
a worker would dead-letter the entry with (docs/wire-format.md); for the gateway's own
refusals one of the codes below. ``type`` is ``/problems/<reason>``, a reference relative to
the gateway."""

from __future__ import annotations

from http import HTTPStatus

from starlette.responses import JSONResponse

MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    def __init__(self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None, **extra):
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def response(self, instance: str | None = None) -> JSONResponse:
        body = {"type": f"/problems/{self.reason}", "title": HTTPStatus(self.status).phrase, "status": self.status,
                "detail": self.detail, "reason": self.reason, **self.extra}
        if instance:
            body["instance"] = instance
        return JSONResponse(body, status_code=self.status, headers=self.headers, media_type=MEDIA_TYPE)


def unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, {"WWW-Authenticate": 'Bearer realm="charging"'})


def forbidden(reason: str, detail: str) -> Problem:
    return Problem(403, reason, detail)


def unavailable(reason: str, detail: str, retry_after_s: int = 1) -> Problem:
    return Problem(503, reason, detail, {"Retry-After": str(retry_after_s)})
