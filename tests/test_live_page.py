"""The live page, as a person sees it: headless Chromium loads / while charges flow; the
numbers on the page change, and once the flow stops they are those of `charging status`.
A screenshot goes to the test's temp dir (live.png)."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time

import pytest

from charging.app.http.app import ENDPOINTS
from charging.codec import set_balances
from charging.keys import keys_of
from producer import Producer
from tests import chromium
from tests.conftest import CHARGING, cli, environment
from tests.gateway import Served

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    chromium.binary() is None,
    reason="chromium is not installed: scripts/install-system-deps (run by make install and .ci/run) installs the "
           "Debian package; on other systems install Chromium to run this test")]

ACCOUNTS = [f"live{i}" for i in range(20)]
# What the page shows, read from its DOM as a person reads it (numbers without their commas).
READ_PAGE = """(() => {
  if (!document.getElementById("results")) return null;  // not loaded yet
  const n = (id) => { const t = document.getElementById(id).textContent.replace(/,/g, "");
                      return t === "unknown" ? null : t === "–" ? "–" : Number(t); };
  return {
    connection: document.getElementById("connection").textContent,
    settled_per_s: n("settled-rate"), latency_p50: n("latency-p50"),
    results: n("results"), length: n("length"), pending: n("pending"), lag: n("lag"),
    deadletters: n("deadletters"), open_reservations: n("open-reservations"), held: n("held"),
    reasons: Object.fromEntries([...document.querySelectorAll("#deadletter-reasons li")].map(
      (li) => [li.dataset.reason, Number(li.textContent.split(": ")[1].replace(/,/g, ""))])),
    partitions: [...document.querySelectorAll("#partitions tr")].map(
      (tr) => [...tr.children].map((td) => td.textContent === "–" ? null : Number(td.textContent.replace(/,/g, "")))),
  };
})()"""


def wait_for(condition, timeout: float = 30.0, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "the page never showed it"
        time.sleep(every)


def as_status_shows(status: dict) -> dict:
    """The numbers of `charging status --json` that the page shows, in the page's shape."""
    return {
        "results": status["results"], "length": status["length"], "pending": status["pending"], "lag": status["lag"],
        "deadletters": status["deadletters"], "open_reservations": status["open_reservations"],
        "held": status["held"], "reasons": status["deadletter_reasons"],
        "partitions": [[p["partition"], p["length"], p["pending"], p["lag"], p["oldest_pending_age_ms"], p["results"],
                        p["deadletters"], p["open_reservations"], p["held"]] for p in status["partitions"]],
    }


def test_the_live_page_follows_the_flow_and_matches_charging_status(settings, client, tmp_path):
    set_balances(client, settings, [(a, 10**9) for a in ACCOUNTS])
    producer = Producer(client, settings)
    held = producer.reserve({"account": ACCOUNTS[0], "amount": 700, "request_id": "live-call"})
    assert held.approved
    requests = keys_of(ACCOUNTS[1], settings).requests
    client.xadd(requests, {"request_id": "bad-1", "account": ACCOUNTS[1], "service": "fax", "units": "1"})
    client.xadd(requests, {"request_id": "bad-2", "account": ACCOUNTS[1], "service": "sms", "units": "1.5"})

    flowing = threading.Event()
    flowing.set()

    def flow() -> None:  # about 150 charges a second until told to stop
        while flowing.is_set():
            producer.submit([{"account": random.choice(ACCOUNTS), "service": "sms", "units": 1} for _ in range(15)])
            time.sleep(0.1)

    env = environment(settings)
    worker = subprocess.Popen([CHARGING, "worker", "--consumer", "live-w"], env=env, stderr=subprocess.DEVNULL)
    load = threading.Thread(target=flow)
    try:
        with Served(settings) as served, chromium.Chromium(served.url + "/", tmp_path / "profile") as page:
            load.start()
            before = wait_for(lambda: _shown(page, lambda s: s["settled_per_s"] not in ("–", 0)))
            later = wait_for(lambda: _shown(page, lambda s: s["results"] > before["results"]))
            assert later["latency_p50"] != "–" and later["connection"] == "live"
            page.screenshot(tmp_path / "live.png")

            flowing.clear()
            load.join()
            quiet = wait_for(lambda: _quiet(settings), timeout=60)
            shown = wait_for(lambda: _shown(page, lambda s: _page_numbers(s) == as_status_shows(quiet)), timeout=30)
            assert shown["reasons"] == {"invalid_units": 1, "unknown_service": 1}
            assert (shown["open_reservations"], shown["held"]) == (1, 700)

            page.evaluate(f"document.getElementById('account').value = '{ACCOUNTS[0]}'; "
                          "document.getElementById('lookup').requestSubmit()")
            funds = json.loads(cli(settings, "accounts", "show", ACCOUNTS[0], "--json").stdout)
            wait_for(lambda: page.evaluate("document.getElementById('balance').textContent") ==
                     f"{ACCOUNTS[0]}: balance {funds['balance']:,}, held 700, available {funds['available']:,}")
            page.screenshot(tmp_path / "live-settled.png")

            page.send("Page.navigate", url=served.url + "/docs")  # the API reference lists every endpoint
            listed = wait_for(lambda: page.evaluate("[...document.querySelectorAll('.op')].map((op) => op.id)"))
            assert sorted(listed) == sorted(f"{e.method} {e.template}" for e in ENDPOINTS)
    finally:
        flowing.clear()
        if load.is_alive():
            load.join()
        worker.terminate()
        worker.wait(20)
    assert (tmp_path / "live.png").stat().st_size > 10_000


def _shown(page: chromium.Chromium, condition) -> dict | None:
    shown = page.evaluate(READ_PAGE)
    return shown if shown and shown["results"] not in ("–", None) and condition(shown) else None


def _page_numbers(shown: dict) -> dict:
    return {k: shown[k] for k in ("results", "length", "pending", "lag", "deadletters", "open_reservations", "held",
                                  "reasons", "partitions")}


def _quiet(settings) -> dict | None:
    """The status once the workers are done: nothing pending or undelivered, and the request
    streams trimmed (the same twice over a maintenance interval)."""
    first = _status(settings)
    time.sleep(2 * settings.maintenance_interval_s)
    stable = as_status_shows(first) == as_status_shows(_status(settings))
    return first if first["pending"] == 0 and first["lag"] == 0 and stable else None


def _status(settings) -> dict:
    return json.loads(cli(settings, "status", "--json").stdout)
