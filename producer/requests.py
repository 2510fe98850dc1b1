"""What a producer does, written once for the sync and the asyncio client: validate and
rate requests, append them to the request streams, wait for their outcomes on its reply
streams, settle them synchronously. Each operation is a plan (charging/plan.py);
producer/client.py runs the plans with a redis.Redis (Producer) or a redis.asyncio client
(AsyncProducer): only the I/O differs."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar

from charging import codec
from charging.connection import replicated, with_functions
from charging.errors import ChargingError
from charging.keys import Keys, keys_of, partition_of
from charging.log import logger
from charging.plan import Pause, Plan, Step, call, pipelined
from charging.schema import ChargeRequest, Invalid, Outcome, account_of, parse_request
from charging.settings import Settings
from charging.streams import read_streams
from charging.tariff import price

log = logger("charging.producer")

PIPELINE_CHUNK = 1000
READ_BLOCK_MS = 1000  # a waiter looks at the clock at least this often
ARRIVAL_POLL_S = 0.01

Request = Mapping[str, Any] | ChargeRequest
C = TypeVar("C")  # the client: redis.Redis (or RedisCluster), or a redis.asyncio one
O = TypeVar("O")  # what an operation that settles one request returns: an Outcome, or a coroutine of one


class WaitTimeout(ChargingError, TimeoutError):
    """No outcome in time. The charge may still be settled later; resubmitting it with the
    same request id is safe and returns the stored outcome."""

    def __init__(self, missing: list[str]):
        super().__init__(f"no outcome within the timeout for {len(missing)} request(s): {missing[:5]}")
        self.missing = missing


class BacklogFull(ChargingError, RuntimeError):
    """A request stream is at CHARGING_MAX_BACKLOG entries: the workers are behind or
    stopped. Nothing of the batch was written; retry later with the same request ids."""

    def __init__(self, stream: str, length: int, adding: int, limit: int):
        super().__init__(f"backlog full: {stream} holds {length} entries; adding {adding} would pass the limit "
                         f"of {limit} (CHARGING_MAX_BACKLOG). Workers are behind or stopped; nothing was submitted.")
        self.stream = stream


class Requests(Generic[C, O]):
    """The state and the plans a Producer and an AsyncProducer share. The operations that
    settle one request (charge, authorize, reserve, extend, commit, release) are defined
    here once: O is Outcome for the sync producer, a coroutine of one for the asyncio one."""

    def __init__(self, client: C, settings: Settings, producer_id: str | None = None):
        self.client = client
        self.settings = settings
        # Its reply stream is <ns>:{pN}:reply:<id>; a producer ACL user may read only its own.
        self.id = producer_id or settings.producer_id or uuid.uuid4().hex
        self._last_reply_id: dict[str, str] = {}  # reply stream -> last id read
        self._outcomes: dict[str, Outcome] = {}  # read from a reply stream, not yet collected
        self._reply_stream: dict[str, str] = {}  # request id -> the reply stream its outcome goes to
        self._reading = False  # a waiter is reading the reply streams (asyncio: the others wait for it)

    def prepare(self, data: Request, reply: bool = False) -> ChargeRequest:
        """Validate and rate a request, filling in request_id, submitted_at and reply_to.
        Raises Invalid (with the same reason a worker would dead-letter it with)."""
        fields = data.to_fields() if isinstance(data, ChargeRequest) else {k: v for k, v in data.items() if v is not None}
        if "request_id" not in fields:  # not setdefault: a random id costs a system call, and most callers give one
            fields["request_id"] = uuid.uuid4().hex
        if "submitted_at" not in fields:
            fields["submitted_at"] = int(time.time() * 1000)
        if reply and "reply_to" not in fields and (account := account_of(fields)) is not None:
            fields["reply_to"] = self._keys(account).reply(self.id)
        request = parse_request(fields, self.settings)
        price(request, self.settings)
        return request

    # ---- operations that settle one request ----------------------------------------------

    def charge(self, data: Request, timeout: float = 5.0) -> O:
        """Submit one request through the stream and wait for a worker's outcome (a worker
        must be running). Raises WaitTimeout after timeout seconds."""
        return self._settle(self._charging(data, timeout))

    def authorize(self, data: Request) -> O:
        """Settle synchronously with the same function the workers use: no stream, the
        answer now. A charge unless data names another op. Replaying the request id
        returns the stored outcome."""
        return self._settle(self._authorizing(data))

    # Reservations, synchronously (docs/reservations.md). Through the stream
    # instead: submit or charge the same data with its "op" field.

    def reserve(self, data: Mapping[str, Any]) -> O:
        """Hold funds: account, service and units (or amount), optional ttl (seconds) and
        request_id. The reservation id, <account>/<request_id>, is outcome.reservation."""
        return self.authorize({**data, "op": "reserve"})

    def extend(self, data: Mapping[str, Any]) -> O:
        """Hold more: reservation, units (at the reservation's unit price) or amount, optional ttl."""
        return self.authorize({**data, "op": "extend"})

    def commit(self, data: Mapping[str, Any]) -> O:
        """Charge what was used (reservation, units or amount; at most what is held) and
        release the rest."""
        return self.authorize({**data, "op": "commit"})

    def release(self, data: Mapping[str, Any]) -> O:
        """Release everything the reservation holds, charging nothing."""
        return self.authorize({**data, "op": "release"})

    def _settle(self, plan: Plan[Outcome]) -> O:
        """Run plan with this producer's client."""
        raise NotImplementedError

    # ---- the plans -----------------------------------------------------------------------

    def _submitting(self, requests: Iterable[Request], reply: bool) -> Plan[list[str]]:
        """Append requests to their partitions' request streams, one round trip per chunk.
        Every request is validated first: one invalid request raises and nothing is written;
        a request stream at the backlog limit raises BacklogFull and nothing is written."""
        prepared = []
        for index, data in enumerate(requests):
            try:
                prepared.append(self.prepare(data, reply))
            except Invalid as exc:
                raise Invalid(exc.reason, f"request #{index}: {exc.detail}") from None
        yield from self._check_backlog(prepared)
        self._reply_stream.update((r.request_id, r.reply_to) for r in prepared if r.reply_to)
        for start in range(0, len(prepared), PIPELINE_CHUNK):
            chunk = prepared[start:start + PIPELINE_CHUNK]
            if not self.settings.wait_replicas:
                yield pipelined(lambda pipe: [pipe.xadd(self._keys(r.account).requests, r.to_fields()) for r in chunk])
                continue
            # One pipeline per partition, ending in WAIT: confirmed only once replicas hold it.
            by_stream: dict[str, list[ChargeRequest]] = {}
            for request in chunk:
                by_stream.setdefault(self._keys(request.account).requests, []).append(request)
            for stream, same in by_stream.items():
                yield from replicated(self.settings, stream, lambda pipe: [pipe.xadd(stream, r.to_fields())
                                                                           for r in same])
        return [r.request_id for r in prepared]

    def _check_backlog(self, prepared: list[ChargeRequest]) -> Plan[None]:
        """One pipelined XLEN per stream the batch goes to. A soft limit: producers racing
        each other can pass it by at most one batch each. The stream is never capped with
        MAXLEN, because trimming would drop charges no worker has settled."""
        adding = Counter(self._keys(r.account) for r in prepared)
        lengths = yield pipelined(lambda pipe: [pipe.xlen(keys.requests) for keys in adding])
        for (keys, n), length in zip(adding.items(), lengths):
            if length + n > self.settings.max_backlog:
                log.warning("backlog_full", partition=keys.partition, length=length, adding=n,
                            limit=self.settings.max_backlog)
                raise BacklogFull(keys.requests, length, n, self.settings.max_backlog)

    def _waiting(self, request_ids: Iterable[str], timeout: float) -> Plan[dict[str, Outcome]]:
        """Outcomes of requests this producer submitted with reply=True, read from its reply
        streams. Raises WaitTimeout naming the ones still missing after timeout seconds.
        Concurrent waiters (asyncio) share one reader: it reads every reply stream with an
        outcome still expected and stores what it finds for all of them."""
        wanted = list(request_ids)
        unknown = [rid for rid in wanted if rid not in self._reply_stream and rid not in self._outcomes]
        if unknown:
            raise ValueError(f"not submitted by this producer with reply=True: {unknown[:5]}")
        deadline = time.monotonic() + timeout
        while missing := [rid for rid in wanted if rid not in self._outcomes]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(missing)
            if self._reading:
                yield self._arrival(left)
                continue
            self._reading = True
            try:
                streams = {s: self._last_reply_id.get(s, "0-0") for s in set(self._reply_stream.values())}
                found = yield from read_streams(streams, count=1000, block_ms=min(int(left * 1000) or 1, READ_BLOCK_MS))
                self._store(found)
            finally:
                self._reading = False
                self._arrived()
        for rid in wanted:
            self._reply_stream.pop(rid, None)
        return {rid: self._outcomes.pop(rid) for rid in wanted}

    def _store(self, found: list[Any]) -> None:
        for stream, messages in found:
            for entry_id, fields in messages:
                outcome = Outcome.from_fields(fields)
                # Not one collected before (a re-read), nor another process's: processes
                # sharing a producer id share its reply stream.
                if outcome.request_id in self._reply_stream:
                    self._outcomes[outcome.request_id] = outcome
            self._last_reply_id[stream.decode()] = messages[-1][0].decode()

    def _arrival(self, timeout: float) -> Step:
        """A step that returns once the waiter reading the reply streams may have stored
        what it read (at the latest after timeout seconds). Here a short pause: a sync
        producer has a second waiter only when threads share it; AsyncProducer is woken."""
        return Pause(min(timeout, ARRIVAL_POLL_S))

    def _arrived(self) -> None:
        """Wake the waiters of _arrival."""

    def _charging(self, data: Request, timeout: float) -> Plan[Outcome]:
        [request_id] = yield from self._submitting([data], reply=True)
        waited = yield from self._waiting([request_id], timeout)
        return waited[request_id]

    def _authorizing(self, data: Request) -> Plan[Outcome]:
        request = self.prepare(data)
        if request.op == "grant":  # the function grant takes a lot, not a settling call's arguments
            raise Invalid("field_not_allowed", "a grant is settled through the stream (submit) or by codec.grant, "
                                               "not authorize")
        price(request, self.settings)  # the maximum charge, judged on the default plan as the workers judge it
        amount = request.amount  # units of a charge or reserve: priced by the account's plan in the library
        if self.settings.wait_replicas:
            [raw] = yield from with_functions(lambda: replicated(
                self.settings, self._keys(request.account).balances,
                lambda pipe: codec.settle(pipe, self.settings, request, amount)))
        else:
            raw = yield from with_functions(lambda: call(
                lambda client: codec.settle(client, self.settings, request, amount)))
        outcome = codec.outcome(request, codec.settled(raw))
        log.debug("authorized", request_id=outcome.request_id, account=outcome.account, op=request.op,
                  partition=partition_of(outcome.account, self.settings.partitions), status=outcome.status)
        return outcome

    def _keys(self, account: str) -> Keys:
        return keys_of(account, self.settings)
