"""Pure feature logic: the event contract and rolling per-user aggregates over plain state (no I/O)."""
