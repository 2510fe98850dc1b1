"""Producer library: submit charges, wait for outcomes, or authorize synchronously."""

from producer.client import BacklogFull, Producer, WaitTimeout

__all__ = ["BacklogFull", "Producer", "WaitTimeout"]
