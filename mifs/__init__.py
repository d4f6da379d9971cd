"""mifs: the medical image filesystem gateway.

A FUSE daemon that encrypts every file with its own key and stores it as opaque chunks.
"""

__version__ = "0.1.0"
