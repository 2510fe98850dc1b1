"""One voice call or data session as a network element runs it: reserve quota, extend it
as it runs, commit what was used. For load generators (bench, chaos) and examples."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from charging.schema import Outcome
from producer.client import Producer


def run_session(producer: Producer, account: str, service: str, units: int, extends: Sequence[int] = (),
                used: int | None = None, *, ttl: int | None = None, session_id: str | None = None,
                via_stream: bool = False, timeout: float = 5.0) -> list[Outcome]:
    """Reserve units of service, ask for each of extends more units, then commit used units
    (default: all granted; never more than was granted, so a refused extend lowers it;
    0 releases instead).
    Returns the outcomes in order. Stops after a refused reserve (nothing is held) and
    after an extend that found the reservation gone (expired: nothing to commit).

    Request ids are session_id (the reserve, so the reservation is <account>/<session_id>),
    session_id.x1, .x2, ... and session_id.c: running the same session_id again replays
    it and charges nothing more. via_stream sends each step through the request stream
    and waits for a worker's outcome (timeout seconds each); else they are synchronous."""
    session_id = session_id or uuid.uuid4().hex
    settle = (lambda data: producer.charge(data, timeout)) if via_stream else producer.authorize
    reserve = settle({"op": "reserve", "request_id": session_id, "account": account, "service": service,
                      "units": units, "ttl": ttl})
    outcomes = [reserve]
    if not reserve.approved:
        return outcomes
    granted = units
    for number, more in enumerate(extends, start=1):
        extend = settle({"op": "extend", "request_id": f"{session_id}.x{number}", "reservation": reserve.reservation,
                         "units": more, "ttl": ttl})
        outcomes.append(extend)
        if extend.approved:
            granted += more
        elif extend.reason != "insufficient_funds":
            return outcomes
    used = granted if used is None else min(used, granted)
    end = {"request_id": f"{session_id}.c", "reservation": reserve.reservation}
    # A session that used nothing is released: a commit counts at least one unit.
    outcomes.append(settle({**end, "op": "commit", "units": used} if used else {**end, "op": "release"}))
    return outcomes
