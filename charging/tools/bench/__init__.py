"""`charging bench`: the engine measured against the Redis ceiling, with the money checked
after every mode (see docs/benchmark.md)."""
