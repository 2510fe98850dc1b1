"""The producer library for upstream systems: submit charges and reservation operations to
the request streams (fire-and-forget or wait for the outcome), or settle them synchronously."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import redis
import structlog

from charging import codec
from charging.connection import replicated_pipeline, with_functions
from charging.keys import Keys, keys_of, partition_of
from charging.schema import ChargeRequest, Invalid, Outcome, account_of, parse_request
from charging.settings import Settings
from charging.streams import read_streams
from charging.tariff import price

log = structlog.get_logger("charging.producer")

PIPELINE_CHUNK = 1000


class WaitTimeout(TimeoutError):
    """No outcome in time. The charge may still be settled later; resubmitting it with the
    same request id is safe and returns the stored outcome."""

    def __init__(self, missing: list[str]):
        super().__init__(f"no outcome within the timeout for {len(missing)} request(s): {missing[:5]}")
        self.missing = missing


class BacklogFull(RuntimeError):
    """A request stream is at CHARGING_MAX_BACKLOG entries: the workers are behind or
    stopped. Nothing of the batch was written; retry later with the same request ids."""

    def __init__(self, stream: str, length: int, adding: int, limit: int):
        super().__init__(f"backlog full: {stream} holds {length} entries; adding {adding} would pass the limit "
                         f"of {limit} (CHARGING_MAX_BACKLOG). Workers are behind or stopped; nothing was submitted.")
        self.stream = stream


class Producer:
    def __init__(self, client: redis.Redis, settings: Settings, producer_id: str | None = None):
        self.client = client
        self.settings = settings
        # Its reply stream is <ns>:{pN}:reply:<id>; a producer ACL user may read only its own.
        self.id = producer_id or settings.producer_id or uuid.uuid4().hex
        self._last_reply_id: dict[str, str] = {}  # reply stream -> last id read
        self._outcomes: dict[str, Outcome] = {}  # read from a reply stream, not yet collected
        self._reply_stream: dict[str, str] = {}  # request id -> the reply stream its outcome goes to

    def prepare(self, data: Mapping[str, Any] | ChargeRequest, reply: bool = False) -> ChargeRequest:
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

    def submit(self, requests: Iterable[Mapping[str, Any] | ChargeRequest], reply: bool = False) -> list[str]:
        """Append requests to their partitions' request streams, one round trip per chunk.
        Every request is validated first: one invalid request raises and nothing is written;
        a request stream at the backlog limit raises BacklogFull and nothing is written."""
        prepared = []
        for index, data in enumerate(requests):
            try:
                prepared.append(self.prepare(data, reply))
            except Invalid as exc:
                raise Invalid(exc.reason, f"request #{index}: {exc.detail}") from None
        self._check_backlog(prepared)
        self._reply_stream.update((r.request_id, r.reply_to) for r in prepared if r.reply_to)
        for start in range(0, len(prepared), PIPELINE_CHUNK):
            chunk = prepared[start:start + PIPELINE_CHUNK]
            if self.settings.wait_replicas:
                self._append_replicated(chunk)
                continue
            pipe = self.client.pipeline(transaction=False)
            for request in chunk:
                pipe.xadd(self._keys(request.account).requests, request.to_fields())
            pipe.execute()
        return [r.request_id for r in prepared]

    def _append_replicated(self, chunk: list[ChargeRequest]) -> None:
        """One pipeline per partition, ending in WAIT: confirmed only once replicas hold it."""
        by_stream: dict[str, list[ChargeRequest]] = {}
        for request in chunk:
            by_stream.setdefault(self._keys(request.account).requests, []).append(request)
        for stream, requests in by_stream.items():
            replicated_pipeline(self.client, self.settings, stream,
                                lambda pipe: [pipe.xadd(stream, r.to_fields()) for r in requests])

    def _check_backlog(self, prepared: list[ChargeRequest]) -> None:
        """One pipelined XLEN per stream the batch goes to. A soft limit: producers racing
        each other can pass it by at most one batch each. The stream is never capped with
        MAXLEN, because trimming would drop charges no worker has settled."""
        adding = Counter(self._keys(r.account) for r in prepared)
        pipe = self.client.pipeline(transaction=False)
        for keys in adding:
            pipe.xlen(keys.requests)
        for (keys, n), length in zip(adding.items(), pipe.execute()):
            if length + n > self.settings.max_backlog:
                log.warning("backlog_full", partition=keys.partition, length=length, adding=n,
                            limit=self.settings.max_backlog)
                raise BacklogFull(keys.requests, length, n, self.settings.max_backlog)

    def charge(self, data: Mapping[str, Any] | ChargeRequest, timeout: float = 5.0) -> Outcome:
        """Submit one request through the stream and wait for its outcome."""
        [request_id] = self.submit([data], reply=True)
        return self.wait([request_id], timeout)[request_id]

    def wait(self, request_ids: Iterable[str], timeout: float = 5.0) -> dict[str, Outcome]:
        """Outcomes of requests this producer submitted with reply=True, read from its reply
        streams. Raises WaitTimeout naming the ones still missing after timeout seconds."""
        wanted = list(request_ids)
        unknown = [rid for rid in wanted if rid not in self._reply_stream and rid not in self._outcomes]
        if unknown:
            raise ValueError(f"not submitted by this producer with reply=True: {unknown[:5]}")
        deadline = time.monotonic() + timeout
        while missing := [rid for rid in wanted if rid not in self._outcomes]:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise WaitTimeout(missing)
            streams = {self._reply_stream[rid] for rid in missing if rid in self._reply_stream}
            reply = read_streams(self.client, {s: self._last_reply_id.get(s, "0-0") for s in streams},
                                 count=1000, block_ms=min(left_ms, 1000))
            for stream, messages in reply:
                for entry_id, fields in messages:
                    outcome = Outcome.from_fields(fields)
                    # Processes sharing a producer id share its reply stream: keep only our own.
                    if outcome.request_id in self._reply_stream:
                        self._outcomes[outcome.request_id] = outcome
                    self._last_reply_id[stream.decode()] = entry_id.decode()
        for rid in wanted:
            self._reply_stream.pop(rid, None)
        return {rid: self._outcomes.pop(rid) for rid in wanted}

    def authorize(self, data: Mapping[str, Any] | ChargeRequest) -> Outcome:
        """Settle synchronously with the same function the workers use: no stream, the
        answer now. A charge unless data names another op. Replaying the request id
        returns the stored outcome."""
        request = self.prepare(data)
        amount = price(request, self.settings)
        if self.settings.wait_replicas:
            [raw] = with_functions(self.client, lambda: replicated_pipeline(
                self.client, self.settings, self._keys(request.account).balances,
                lambda pipe: codec.settle(pipe, self.settings, request, amount)))
        else:
            raw = with_functions(self.client, lambda: codec.settle(self.client, self.settings, request, amount))
        outcome = codec.outcome(request, codec.settled(raw))
        log.debug("authorized", request_id=outcome.request_id, account=outcome.account, op=request.op,
                  partition=partition_of(outcome.account, self.settings.partitions), status=outcome.status)
        return outcome

    # Reservations, synchronously (README "Sessions and reservations"). Through the stream
    # instead: submit or charge the same data with its "op" field.

    def reserve(self, data: Mapping[str, Any]) -> Outcome:
        """Hold funds: account, service and units (or amount), optional ttl (seconds) and
        request_id. The reservation id, <account>/<request_id>, is outcome.reservation."""
        return self.authorize({**data, "op": "reserve"})

    def extend(self, data: Mapping[str, Any]) -> Outcome:
        """Hold more: reservation, units (at the reservation's unit price) or amount, optional ttl."""
        return self.authorize({**data, "op": "extend"})

    def commit(self, data: Mapping[str, Any]) -> Outcome:
        """Charge what was used (reservation, units or amount; at most what is held) and
        release the rest."""
        return self.authorize({**data, "op": "commit"})

    def release(self, data: Mapping[str, Any]) -> Outcome:
        """Release everything the reservation holds, charging nothing."""
        return self.authorize({**data, "op": "release"})

    def _keys(self, account: str) -> Keys:
        return keys_of(account, self.settings)
