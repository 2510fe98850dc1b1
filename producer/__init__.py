"""Producer library: submit charges and reservation operations, wait for outcomes, or
settle them synchronously; run_session plays one reserve -> extend -> commit session."""

from producer.client import BacklogFull, Producer, WaitTimeout
from producer.session import run_session

__all__ = ["BacklogFull", "Producer", "WaitTimeout", "run_session"]
