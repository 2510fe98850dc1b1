"""Shared contract of the charging engine: settings, key names, wire schema, tariff,
the one Redis connection and the Python signatures of the Lua functions."""
