"""mifs benchmark harness: `python -m bench` (docs/PERFORMANCE.md).

Must not import mifs: it drives mifs through its CLI and mount, like the peers it compares with.
"""
