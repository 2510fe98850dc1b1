"""Deadlines on reading a request, which uvicorn lacks: its one timer is the keep-alive one,
which any byte received cancels, so a client that sends its headers or its body a byte at a
time holds a connection (a file descriptor, a task) for as long as it likes, and a few
hundred such clients hold the gateway. Here a request's headers must arrive within
CHARGING_HTTP_HEADER_TIMEOUT_S of the connection (or of the previous answer on it), its body
within CHARGING_HTTP_BODY_TIMEOUT_S of its headers; past either the answer is 408
`request_timeout` and the connection is closed.

It extends uvicorn's httptools protocol, which is not a public API: tested on the uvicorn of
constraints.txt, and tests/test_http_outside.py fails if a release changes what it uses."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from charging.app.http.gateway import log
from charging.app.http.problems import Problem
from charging.settings import Settings

# After a 408 the connection is half-closed (the FIN follows the answer) and what the client
# still sends is read and dropped this long before it is closed: closing a socket with
# unread data resets the connection, and the client would lose the 408.
LINGER_S = 1.0


def protocol(settings: Settings) -> Any:
    """uvicorn's `http` option for these settings: a partial, which pickles into the
    processes of --workers."""
    return functools.partial(Deadlines, header_timeout_s=settings.http_header_timeout_s,
                             body_timeout_s=settings.http_body_timeout_s)


class Deadlines(HttpToolsProtocol):
    """uvicorn's httptools protocol (uvicorn[standard], its default) with one timer per
    connection: for the headers while none are in, for the body while it is read."""

    def __init__(self, *args: Any, header_timeout_s: float, body_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.timeouts_s = {"headers": header_timeout_s, "body": body_timeout_s}
        self.deadline: asyncio.TimerHandle | None = None
        self.reading_body = False
        self.timed_out = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.timed_out:
            super().data_received(data)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.reading_body = True
        self._expect("body")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.reading_body = False
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.reading_body:  # else it was answered before its body was in (a 413): that deadline runs on
            self._expect("headers")

    def _expect(self, awaited: str) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.deadline = self.loop.call_later(self.timeouts_s[awaited], self._expired, awaited)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self, awaited: str) -> None:
        self.deadline = None
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete
        if awaited == "headers" and busy:
            return  # a pipelined request is being answered; its answer sets the next deadline
        log.info("request_timed_out", awaited=awaited, timeout_s=self.timeouts_s[awaited],
                 client=":".join(map(str, self.client or ())))
        self.timed_out = True
        if busy:  # the app's next receive() is a disconnect, its answer goes nowhere
            cycle.disconnected = True
            cycle.message_event.set()
        if awaited == "headers" or not cycle.response_started:
            self.transport.write(self._timed_out(awaited))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _timed_out(self, awaited: str) -> bytes:
        detail = f"the request's {awaited} did not arrive within {self.timeouts_s[awaited]:g} s"
        response = Problem(408, "request_timeout", detail, {"Connection": "close"}).response()
        head = [*self.server_state.default_headers, *response.raw_headers]
        return b"".join([STATUS_LINE[408], *(name + b": " + value + b"\r\n" for name, value in head), b"\r\n",
                         response.body])
