"""The contract every part of the charging engine shares: settings, key names, the wire
schema, the tariff, the one Redis connection and the codec of the Lua functions. The app
(charging.app) and the tools (charging.tools) sit above it, beside producer/ and worker/."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("redis-charging")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
