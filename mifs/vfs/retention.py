"""Retention and WORM policy: which files may not change yet, and what an unlink keeps.

Must not touch the store, keys or pyfuse3; the destruction of expired files is shred's job.
Rules (docs/CONFIG.md, "Retention and WORM"):

- WORM (`--worm DAYS`): a regular file is *sealed* when the last handle open for writing is
  closed while the file has content (`inodes.sealed_ns`, set once). For DAYS after that it is
  protected: opening it for writing, O_TRUNC, truncate, unlinking any of its names, and
  renaming another file over it fail with EPERM (`Protected`); so does `mifs shred` unless
  `--override-worm`. Reading, renaming it elsewhere, links, chmod and xattrs stay allowed, and
  a file never closed after writing (a PACS still writing it) is not protected.
- Retention (`--retention-days DAYS`): when an unlink or a rename over a file drops its last
  name, the file is kept (inode, key, chunks) in the `retained` table with where it was and
  when; `mifs undelete` gives it its name back. Past DAYS the purge destroys it like a shred.
  With 0 the file is deleted at once (its key goes with its inode row).
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass

from mifs.errors import Protected
from mifs.metadb import retention
from mifs.metadb.db import MetaDb
from mifs.metadb.tables import InodeRow

NS_PER_DAY = 86_400 * 10**9


def days_to_ns(days: float) -> int:
    return int(days * NS_PER_DAY)


@dataclass(frozen=True)
class RetentionPolicy:
    retention_ns: int = 0
    """How long an unlinked file stays recoverable; 0: deleted at once."""
    worm_ns: int = 0
    """How long a sealed file is protected from change and deletion; 0: never."""

    def is_protected(self, db: MetaDb, row: InodeRow, now_ns: int | None = None) -> bool:
        if self.worm_ns <= 0 or not stat.S_ISREG(row.mode):
            return False
        sealed = retention.sealed_at(db, row.id)
        if sealed is None:
            return False
        return (time.time_ns() if now_ns is None else now_ns) - sealed < self.worm_ns

    def check_changeable(self, db: MetaDb, row: InodeRow, what: str) -> None:
        """Raise Protected if the WORM window forbids `what` on this file."""
        if self.is_protected(db, row):
            raise Protected(f"inode {row.id} is WORM-protected: {what} refused")
