"""The OpenAPI 3.1 document, made from the endpoint table and the wire schema's own models
(charging/schema.py), so the document says what the gateway checks and nothing else."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from charging import codec
from charging.app.http.body import MAX_BODY_BYTES
from charging.app.http.endpoints import Endpoint
from charging.schema import LOT_PATTERN, ChargeRequest, Outcome
from charging.settings import LIBRARY_MAX_BALANCE, SERVICES, Settings

# The request fields each body may carry (op and reply_to are the gateway's).
BODIES = {
    "Charge": (("account", "service", "units", "amount", "request_id", "submitted_at"), ("account",)),
    "LegacyCharge": (("account", "service", "units", "amount", "request_id"), ()),
    "Reserve": (("account", "service", "units", "amount", "ttl", "request_id"), ("account",)),
    "Extend": (("units", "amount", "ttl", "request_id"), ()),
    "Commit": (("units", "amount", "request_id"), ()),
    "Release": (("request_id",), ()),
}
PROBLEM_STATUSES = {400: "Malformed request", 401: "No or unknown API key", 403: "Scope or account not allowed",
                    404: "Not found", 408: "Headers or body too slow", 409: "A balance the engine did not write, "
                    "a lot id granted with other content, or an account holding the most lots it may",
                    410: "Gone", 413: "Body too large", 422: "Invalid request (reason as on the "
                    "wire)", 429: "Rate limited (Retry-After)", 500: "Redis refused the gateway's user",
                    503: "Redis unreachable or backlog full (Retry-After)"}
_INTEGER = {"type": "integer"}
_STRING = {"type": "string"}
_MAYBE_INTEGER = {"type": ["integer", "null"]}
_MAYBE_SERVICE = {"enum": [*SERVICES, None]}
_LOT = {"type": "object", "properties": {
    "lot": _STRING, "kind": {"enum": ["money", "units"]}, "service": _MAYBE_SERVICE, "granted": _INTEGER,
    "left": _INTEGER, "held": _INTEGER, "expires_at": _MAYBE_INTEGER, "expired": {"type": "boolean"}}}
_BREAKAGE = {"type": "object", "description": "what expired lots left: money, and units per service",
             "additionalProperties": _INTEGER}
_PRICE = {"type": "integer", "minimum": 1, "maximum": LIBRARY_MAX_BALANCE}


def document(endpoints: list[Endpoint], settings: Settings) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.template, {})[endpoint.method.lower()] = _operation(endpoint)
    return {
        "openapi": "3.1.0",
        "info": {"title": "charging gateway", "version": "1",
                 "description": "Prepaid charging over HTTP: the original service's endpoints and REST v1. "
                                "Errors are RFC 9457 problem details whose `reason` is the wire format's "
                                f"reason code. Request bodies are JSON objects of at most {MAX_BODY_BYTES} bytes."},
        "paths": paths,
        "components": {"schemas": _schemas(settings),
                       "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}}},
    }


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": endpoint.summary, "tags": [endpoint.tag],
                                 "operationId": f"{endpoint.method.lower()}_{endpoint.handler.__name__}"}
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _path_names(endpoint.template)]
    if endpoint.body:
        operation["requestBody"] = {"required": endpoint.body != "LegacyCharge", "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{endpoint.body}"}}}}
    if endpoint.body in BODIES:  # a request: its id may come as a header
        parameters.append({"name": "Idempotency-Key", "in": "header", "required": False,
                           "description": "The request id (request_id in the body, if given, must equal it)",
                           "schema": {"type": "string", "pattern": r"^[\x21-\x7e]{1,128}$"}})
    if parameters:
        operation["parameters"] = parameters
    responses: dict[str, Any] = {}
    for status, schema in endpoint.answers:
        content = {"schema": {"$ref": f"#/components/schemas/{schema}"}} if schema else {}
        responses[str(status)] = {"description": "OK", "content": {endpoint.media_type: content}}
    common = (401, 429, 503) if endpoint.scope else ()
    for status in sorted({*endpoint.errors, *common}):
        responses[str(status)] = {"description": PROBLEM_STATUSES[status], "content": {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    operation["responses"] = responses
    operation["security"] = [{"apiKey": []}] if endpoint.scope else []
    if endpoint.scope:
        operation["description"] = f"Needs an API key with the `{endpoint.scope}` scope."
    return operation


def _path_names(template: str) -> list[str]:
    return [part[1:-1] for part in template.split("/") if part.startswith("{")]


def _schemas(settings: Settings) -> dict[str, Any]:
    fields = _request_fields(settings)
    schemas: dict[str, Any] = {
        name: {"type": "object", "additionalProperties": False, "required": list(required),
               "properties": {f: fields[f] for f in names}}
        for name, (names, required) in BODIES.items()
    }
    schemas["Outcome"] = _model(Outcome)
    schemas["Outcome"]["properties"]["available"] = {"type": "integer", "description": "balance - held "
                                                     "(reservation operations)"}
    schemas["Recorded"] = _model(codec.Recorded)
    schemas["Accepted"] = _object(request_id={"type": "string"}, status={"const": "accepted"},
                                  outcome={"type": "string", "description": "where GET finds the outcome"})
    schemas["LegacyAnswer"] = _object(remainingBalance=_INTEGER, charges=_INTEGER, isAuthorized={"type": "boolean"})
    schemas["ResetAnswer"] = _object(accounts=_INTEGER, balance=_INTEGER)
    schemas["Funds"] = _object(account={"type": "string"}, balance=_INTEGER, held=_INTEGER, available=_INTEGER,
                               plan=_STRING, lots={"type": "array", "items": _LOT}, breakage=_BREAKAGE)
    schemas.update(_plans_and_lots())
    schemas["Health"] = _object(status={"type": "string"})
    schemas["Problem"] = {"type": "object", "required": ["type", "title", "status", "reason"], "properties": {
        "type": {"type": "string", "format": "uri-reference"}, "title": {"type": "string"},
        "status": _INTEGER, "detail": {"type": "string"}, "instance": {"type": "string"},
        "reason": {"type": "string", "description": "the wire format's reason code, or the gateway's own"}}}
    return schemas


def _plans_and_lots() -> dict[str, Any]:
    prices = {service: _PRICE for service in SERVICES}
    return {
        "Grant": {"type": "object", "additionalProperties": False, "required": ["lot"], "properties": {
            "lot": {"type": "string", "pattern": f"^{LOT_PATTERN}$", "description": "the lot's id, not main"},
            "amount": {**_PRICE, "description": "money, minor units (or units)"},
            "units": {**_PRICE, "description": "units of the service"},
            "service": {"enum": list(SERVICES), "description": "what the units are of, or the one service the "
                                                              "money pays for"},
            "expires_in": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h|d)$", "examples": ["30d"]},
            "expires_at": {"type": "string", "format": "date-time"}}},
        "Granted": _object(account=_STRING, lot=_STRING, status={"enum": ["granted", "duplicate"]},
                           kind={"enum": ["money", "units"]}, service=_MAYBE_SERVICE, left=_INTEGER,
                           expires_at=_MAYBE_INTEGER),
        "Prices": {"type": "object", "additionalProperties": False, "required": list(SERVICES),
                   "properties": prices},
        "PlanSet": _object(plan=_STRING, **prices, created={"type": "boolean"}),
        "Plans": _object(plans={"type": "array", "items": _object(plan=_STRING, **prices,
                                                                   partial={"type": "boolean"})}),
        "PlanChoice": {**_object(plan=_STRING), "additionalProperties": False},
        "AccountPlan": _object(account=_STRING, plan=_STRING),
    }


def _request_fields(settings: Settings) -> dict[str, Any]:
    properties = ChargeRequest.model_json_schema()["properties"]
    fields = {name: _present(schema) for name, schema in properties.items()}
    limits = {"units": settings.max_units, "amount": settings.max_amount, "ttl": settings.max_reservation_ttl_s}
    for name, maximum in limits.items():
        fields[name] |= {"minimum": 1, "maximum": maximum}
    return fields


def _present(schema: dict[str, Any]) -> dict[str, Any]:
    """A field's schema when it is given (optional fields are simply left out)."""
    options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    return {k: v for k, v in options[0].items() if k not in ("default", "title")}


def _model(cls: type) -> dict[str, Any]:
    """An answer's schema (its optional fields may be null)."""
    return TypeAdapter(cls).json_schema()


def _object(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(properties), "properties": properties}
