"""Producer library: submit charges and reservation operations, wait for outcomes, or
settle them synchronously (Producer, AsyncProducer); subscribe to the outcomes as a
consumer group (Subscriber, AsyncSubscriber); run_session plays one reserve -> extend ->
commit session. Every error the library raises on purpose is a ChargingError."""

from charging.connection import NotReplicated
from charging.errors import ChargingError
from charging.schema import Invalid, Outcome
from producer.client import AsyncProducer, Producer
from producer.requests import BacklogFull, WaitTimeout
from producer.session import run_session
from producer.subscriber import AsyncSubscriber, Subscriber

__all__ = ["AsyncProducer", "AsyncSubscriber", "BacklogFull", "ChargingError", "Invalid", "NotReplicated", "Outcome",
           "Producer", "Subscriber", "WaitTimeout", "run_session"]
