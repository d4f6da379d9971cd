"""The `mifs` command (see main.py); study and cache commands live in studies.py."""

from mifs.cli.main import main

__all__ = ["main"]
