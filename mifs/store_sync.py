"""`mifs sync`: wait until every file closed so far is in the store, data and metadata.

For an admin or a script that must know a study is archived (before the modality deletes its
copy, before the gateway's disk is replaced) without unmounting. Must not change what is
written: it makes the metadata durable (one durable commit), lets the chunks queued at that
moment skip the upload delay (uploads normally yield to writers for a few seconds), waits for
them and ships the metadata journal. Chunks written meanwhile are not waited for: a PACS that
keeps writing would keep the command waiting for ever.
"""

from __future__ import annotations

from typing import Any, Callable

import trio

from mifs.commits import Committer
from mifs.control_protocol import Handler, Send
from mifs.errors import MifsError, StorePermissionDenied, StoreUnavailable
from mifs.metasync import MetadataReplicator
from mifs.uploader import Uploader


PROGRESS_SECONDS = 1.0


class StoreSync:
    def __init__(
        self, committer: Committer, uploader: Uploader, replicator: MetadataReplicator, read_only: Callable[[], bool],
    ) -> None:
        self._committer = committer
        self._uploader = uploader
        self._replicator = replicator
        self._read_only = read_only

    def handlers(self) -> dict[str, Handler]:
        return {"sync": self._sync}

    async def _sync(self, request: dict[str, Any], send: Send) -> None:
        started = trio.current_time()
        if self._read_only():
            # Nothing is written here; what an earlier writable mount left staged is uploaded
            # by the next writable mount of this cache dir.
            await send({"ok": True, "objects": 0, "bytes": 0, "metadata_seq": self._replicator.shipped_seq, "seconds": 0.0})
            return
        try:
            await self._committer.commit_now()
        except (MifsError, OSError) as exc:  # the cache disk failed: the mount is failsafe by now
            await send({"ok": False, "error": f"cannot make the metadata durable: {exc}"})
            return
        keys = self._uploader.pending_keys()
        _, size = self._uploader.still_pending(keys)
        self._uploader.expedite(keys)
        while True:
            with trio.move_on_after(PROGRESS_SECONDS):
                await self._uploader.wait_uploaded(keys)
            left, _ = self._uploader.still_pending(keys)
            if not left:
                break
            stats = self._uploader.statistics()
            await send({"progress": {"left": left, "objects": len(keys), "error": stats.last_error or None}})
        try:
            # Not only a journal segment of what the commit above covered: it lets the commit
            # that marked those chunks stored (made by the uploads) reach the store too.
            await self._committer.commit_now()
            await self._replicator.ship()
        except (StoreUnavailable, StorePermissionDenied) as exc:
            await send({"ok": False, "error": f"the data is in the store, but not yet the metadata naming it: {exc}", "kind": "store"})
            return
        except (MifsError, OSError) as exc:
            await send({"ok": False, "error": f"the data is in the store, but the metadata could not be shipped: {exc}"})
            return
        await send({
            "ok": True, "objects": len(keys), "bytes": size, "metadata_seq": self._replicator.shipped_seq,
            "seconds": round(trio.current_time() - started, 3),
        })
