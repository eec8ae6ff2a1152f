"""Moving from other servers (chasquid)."""
