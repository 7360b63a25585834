"""Archive formats, one registry keyed by suffix."""
