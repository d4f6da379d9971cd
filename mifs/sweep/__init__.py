"""The orphan sweep and the writer registry (service) and their control commands."""
