"""Producer library: submit charges, wait for outcomes, or authorize synchronously."""

from producer.client import Producer, WaitTimeout

__all__ = ["Producer", "WaitTimeout"]
