"""The one base of every error the library raises on purpose, so an application can catch
them all with ``except ChargingError``. Each error keeps the built-in base it had before
(Invalid is still a ValueError, WaitTimeout a TimeoutError, ...), so existing handlers go on
working. Errors of the Redis client itself (a lost connection, an ACL refusal) are redis-py's
own ``redis.RedisError``."""


class ChargingError(Exception):
    """Base of the charging library's errors."""
