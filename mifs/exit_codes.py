"""The CLI's exit codes (README.md, "Exit codes"): one table for every command.

Its own module, with nothing to import: commands that only talk to a running daemon need the
codes without loading what opening an archive needs (boto3, pydicom, the crypto stack), which
would cost every such command most of a second.
"""

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_STORE = 3
EXIT_KEY = 4
EXIT_ARCHIVE = 5
EXIT_MOUNTPOINT = 6
EXIT_FUSE = 7
EXIT_DAEMON = 8
EXIT_NOT_FOUND = 9
EXIT_KEY_UNAVAILABLE = 10
EXIT_KEY_RETIRED = 11
EXIT_ROTATION = 12
EXIT_AUDIT = 13
EXIT_REFUSED = 14
