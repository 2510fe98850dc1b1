"""Request bodies: JSON objects within the wire format's limits, and the fields a caller
over HTTP may not set."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from charging.app.http.problems import Problem
from charging.schema import MAX_FIELD_BYTES, MAX_FIELDS

# Every field of an entry at its longest, JSON-quoted and escaped, with room to spare: a
# larger body cannot be a valid request, so it is refused before it is read.
MAX_BODY_BYTES = 2 * MAX_FIELDS * (2 * MAX_FIELD_BYTES + 8)
# Set by the gateway, never by a caller: the operation is the endpoint's, the reply stream
# the gateway's own.
GATEWAY_FIELDS = ("op", "reply_to")


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object; {} for an empty body."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    if not body.strip():
        return {}
    try:
        data = json.loads(body, object_pairs_hook=_no_repeats)
    except (ValueError, RecursionError) as exc:
        raise Problem(400, "invalid_json", f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Problem(400, "invalid_json", "the body must be a JSON object")
    return data


def request_fields(data: dict[str, Any], request: Request, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The request as the producer library takes it: the body, the Idempotency-Key header as
    its request_id, and what the endpoint fixes (a reservation from the path)."""
    for name in (*GATEWAY_FIELDS, *(fixed or {})):
        if name in data:
            raise Problem(422, "field_not_allowed", f"field '{name}' is set by the gateway, not by the caller")
    key = request.headers.get("idempotency-key")
    if key is not None:
        if data.get("request_id", key) != key:
            raise Problem(422, "invalid_request_id", "the Idempotency-Key header and request_id differ")
        data = {**data, "request_id": key}
    return {**data, **(fixed or {})}


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("a field is given twice")
    return data


def _too_large() -> Problem:
    return Problem(413, "body_too_large", f"a request body is at most {MAX_BODY_BYTES} bytes")
