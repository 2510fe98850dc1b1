"""What docs/http-api.md and docs/command-line.md promise about the gateway, tried the way a
user meets it: a real `charging serve`, curl and raw sockets, clients that die or trickle."""

from __future__ import annotations

import itertools
import json
import selectors
import socket
import subprocess
import threading
import time

import httpx
import pytest

from charging.codec import set_balances
from charging.keys import all_partitions
from tests.conftest import CHARGING, environment
from tests.gateway import Served
from tests.test_http import assert_problem

pytestmark = pytest.mark.slow


class Listener:
    """curl -N reading a Server-Sent Events stream in a subprocess; a thread collects its
    events as (event, data)."""

    def __init__(self, url: str, *headers: str):
        arguments = [item for header in headers for item in ("-H", header)]
        self.process = subprocess.Popen(["curl", "-sN", *arguments, url], stdout=subprocess.PIPE, text=True)
        self.events: list[tuple[str, dict]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        kind, data = "message", None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif not line and data is not None:
                self.events.append((kind, data))
                kind, data = "message", None

    def wait_for(self, count: int, timeout_s: float = 15) -> list[tuple[str, dict]]:
        deadline = time.monotonic() + timeout_s
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.events

    def request_ids(self) -> set[str]:
        return {data["request_id"] for kind, data in self.events if kind == "outcome"}

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


def authorize(http: httpx.Client, *request_ids: str) -> None:
    for request_id in request_ids:
        answer = http.post("/v1/charges/authorize", json={"account": "account1", "amount": 1, "request_id": request_id})
        assert answer.status_code == 200, answer.text


def pending(client, settings, group: str) -> int:
    return sum(client.xpending(keys.results, group)["pending"]
               for keys in all_partitions(settings.namespace, settings.partitions))


def test_sse_group_mode_acks_every_outcome_and_survives_a_killed_client(settings, client):
    set_balances(client, settings, [("account1", 1000)])
    url = "/v1/outcomes?group=billing&from=start&consumer="
    wanted = {f"k-{i}" for i in range(12)}
    with Served(settings) as served, httpx.Client(base_url=served.url, timeout=30) as http:
        authorize(http, "k-0", "k-1", "k-2", "k-3", "k-4")
        first = Listener(served.url + url + "m1")
        assert len(first.wait_for(5)) == 5
        time.sleep(0.5)  # a poll or two: the stream must stay open, not end after its first batch
        assert first.process.poll() is None, "the stream ended"
        first.kill()  # SIGKILL mid-stream
        authorize(http, "k-5", "k-6", "k-7")  # while no member listens
        again, second = Listener(served.url + url + "m1"), Listener(served.url + url + "m2")
        authorize(http, "k-8", "k-9", "k-10", "k-11")
        deadline = time.monotonic() + 15
        while (first.request_ids() | again.request_ids() | second.request_ids()) != wanted:
            assert time.monotonic() < deadline, "an outcome was never delivered"
            time.sleep(0.05)
        assert again.process.poll() is None and second.process.poll() is None, "a stream ended"
        while pending(client, settings, "billing") and time.monotonic() < deadline + 5:
            time.sleep(0.05)  # the last write is acked right after it
        again.kill()
        second.kill()
    assert pending(client, settings, "billing") == 0
    assert not [data for listener in (first, again, second) for kind, data in listener.events if kind == "problem"]


def test_a_last_event_id_beyond_64_bits_is_400_and_a_failure_mid_stream_ends_it_with_a_problem_event(settings,
                                                                                                      client):
    set_balances(client, settings, [("account1", 1000)])
    results = all_partitions(settings.namespace, settings.partitions)[0].results
    with Served(settings) as served, httpx.Client(base_url=served.url, timeout=30) as http:
        for beyond in ("99999999999999999999-0", "18446744073709551616-0", "0-18446744073709551616"):
            assert_problem(http.get("/v1/outcomes", headers={"Last-Event-ID": beyond}), 400, "invalid_last_event_id")
        largest = Listener(served.url + "/v1/outcomes", "Last-Event-ID: 18446744073709551615-18446744073709551615")
        listener = Listener(served.url + "/v1/outcomes")  # from now
        time.sleep(0.5)
        authorize(http, "p-0")
        assert [data["request_id"] for kind, data in listener.wait_for(1)] == ["p-0"]
        client.delete(results)
        client.set(results, "not a stream")  # every read of the stream fails from now on
        assert listener.process.wait(15) == 0, "the stream did not end"
        assert largest.process.wait(15) == 0, "the stream did not end"
    for ended in (listener, largest):
        kind, problem = ended.events[-1]
        assert (kind, problem["status"], problem["reason"]) == ("problem", 500, "internal_error")
    assert largest.events == [largest.events[-1]]  # nothing is past the last id there is


def test_serve_on_a_busy_port_says_so_in_one_line_and_exits_1(settings):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = subprocess.run([CHARGING, "serve", "--port", str(port)], env=environment(settings),
                                 capture_output=True, text=True, timeout=60)
    assert refused.stderr == (f"error: cannot listen on 127.0.0.1:{port}: address already in use; "
                              "pick another with --port\n")
    assert (refused.returncode, refused.stdout) == (1, "")


def test_slow_bodies_and_headers_get_408_and_are_closed_while_other_clients_are_served_quickly(settings, client):
    set_balances(client, settings, [("account1", 1000)])
    timeouts = {"CHARGING_HTTP_HEADER_TIMEOUT_S": "1.5", "CHARGING_HTTP_BODY_TIMEOUT_S": "2"}
    with Served(settings, extra_env=timeouts) as served, httpx.Client(base_url=served.url, timeout=30) as http:
        heads = [b"POST /v1/charges/authorize HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"] * 60
        heads += [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "] * 20  # headers that never end
        began = time.monotonic()
        slow = [socket.create_connection(("127.0.0.1", served.port)) for _ in heads]
        for connection, head in zip(slow, heads):
            connection.sendall(head)
        served_in: list[float] = []
        fast = threading.Thread(target=lambda: served_in.extend(timed_requests(http, until=began + 3)))
        fast.start()
        answers = trickle(slow, until=began + 8)
        fast.join()
    assert len(answers) == len(slow), f"{len(slow) - len(answers)} slow connections still open"
    assert len(served_in) >= 10 and max(served_in) < 0.5, served_in
    for connection, (answer, closed_at) in answers.items():
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in answer and b'"reason":"request_timeout"' in answer
        assert 1.5 <= closed_at - began < 4, closed_at - began  # closed (EOF) soon after the deadline
        connection.close()


def timed_requests(http: httpx.Client, until: float) -> list[float]:
    """How long each of a series of ordinary requests took, until then."""
    took = []
    for i in itertools.count():
        if time.monotonic() >= until:
            return took
        sent = time.monotonic()
        answer = http.post("/v1/charges/authorize", json={"account": "account1", "amount": 1, "request_id": f"f-{i}"})
        assert answer.status_code == 200, answer.text
        took.append(time.monotonic() - sent)
        time.sleep(0.05)


def trickle(connections: list[socket.socket], until: float) -> dict[socket.socket, tuple[bytes, float]]:
    """Send each connection a byte every 0.2 s until the gateway answers, and read until it
    closes it: what each got, and when it was closed (time.monotonic()); the ones still open
    are left out."""
    answers = {connection: b"" for connection in connections}
    closed: dict[socket.socket, tuple[bytes, float]] = {}
    with selectors.DefaultSelector() as selector:
        for connection in connections:
            connection.setblocking(False)
            selector.register(connection, selectors.EVENT_READ)
        while len(closed) < len(connections) and time.monotonic() < until:
            for key, _ in selector.select(timeout=0.2):
                data = key.fileobj.recv(65536)
                answers[key.fileobj] += data
                if not data:
                    closed[key.fileobj] = (answers[key.fileobj], time.monotonic())
                    selector.unregister(key.fileobj)
            for connection in connections:
                if not answers[connection]:  # once answered, no more: a send to a closed socket resets it
                    connection.send(b" ")
    return closed
