"""Consumer-group workers: read charge requests, settle them with the Lua functions."""
