"""File contents: the open-file table, per-inode dirty chunks, read, write, truncate, flush.

Must not touch directory entries (namespace.py) nor pyfuse3. Writes land in chunk-sized
buffers; a buffer is sealed as soon as it is fully written, and partial ones at flush, fsync,
release or under memory pressure. flush/fsync return only once every sealed chunk is staged
durably and the metadata is committed: that is mifs's durability promise.

Concurrency (all on the trio thread): with the kernel writeback cache, writes to one file
arrive concurrently and out of order. A chunk is either dirty (in `dirty`, accepting
writes), sealing (in `sealing`, read-only, being encrypted and staged), or clean (only in the
store/cache). Writes to a sealing chunk wait for the seal to finish, so a new buffer never
starts from a stale base. Code between checks of these maps and their use does not checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

from mifs.chunking import chunk_count, chunk_plain_len, spans
from mifs.chunks import DataPath, FileKey
from mifs.commits import Committer
from mifs.errors import BadFileHandle, FsError, LocalIOError, NotFound
from mifs.metadb import retention, studies, tables
from mifs.metadb.db import MetaDb
from mifs.types import InodeId, ObjectKey
from mifs.vfs.buffers import BufferPool, DirtyChunk

log = logging.getLogger(__name__)

HEADER_BYTES = 64 * 1024
"""How much of each written file's start is kept in memory for the indexer."""
HEADER_MEMORY = 32 * 1024 * 1024


@dataclass
class Sealing:
    done: trio.Event
    chunk: DirtyChunk


@dataclass
class OpenInode:
    """State of a file with open handles (or a truncate in progress)."""

    key: FileKey
    size: int
    handles: int = 0
    dirty: dict[int, DirtyChunk] = field(default_factory=dict)
    sealing: dict[int, Sealing] = field(default_factory=dict)
    error: FsError | None = None
    staged: set[ObjectKey] = field(default_factory=set)  # since the last flush (--sync-uploads)
    attrs_dirty: bool = False
    mtime_ns: int | None = None
    writers: int = 0  # handles open for writing
    changes: int = 0  # sealed chunks and saved attributes so far
    committed_changes: int = 0  # of those, made durable by a commit
    content_changed: bool = False  # since the last flush: the file must be indexed again


@dataclass(frozen=True)
class Handle:
    inode: InodeId
    writable: bool


class FileData:
    def __init__(
        self, db: MetaDb, data: DataPath, committer: Committer, max_dirty_bytes: int,
        wait_uploaded: Callable[[set[ObjectKey]], Awaitable[None]] | None = None,
        changed: trio.MemorySendChannel[InodeId] | None = None, *, sync_close: bool = False,
        write_back_after: float = 0.0,
    ) -> None:
        """sync_close: close(2) makes the file safe from power loss before it returns, as
        fsync does (--sync-close); otherwise close commits it lightly (safe from a crash of the
        daemon at once, from power loss within the committer's interval; see commits.py).
        wait_uploaded: when given, flush and fsync also wait until the file's chunks are in
        the store (--sync-uploads). changed: when given, a file whose content changed is queued
        for indexing in the metadata (in the same commit as the change) and its inode is sent
        here once its last writer closed it; without it nothing is queued (--no-index).
        write_back_after: data written to a file that stays open is sealed and committed
        (lightly) once its oldest unsaved chunk is this many seconds old (0: only at close,
        fsync or memory pressure); see _write_back_aged."""
        self._write_back_after = write_back_after
        self.write_backs = 0
        self._changed = changed
        self._headers: dict[InodeId, bytes] = {}  # see take_header
        self._headers_bytes = 0
        self._wait_uploaded = wait_uploaded
        self._sync_close = sync_close
        self.last_written_close = -math.inf
        """trio clock of the last close of a file after writing (the indexer yields to writers)."""
        self._db = db
        self._data = data
        self._committer = committer
        self.chunk_size = data.chunk_size
        self.pool = BufferPool(self.chunk_size, max_dirty_bytes // self.chunk_size, self._relieve_pressure)
        self.open: dict[InodeId, OpenInode] = {}
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._nursery: trio.Nursery | None = None
        self._pressure = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Owns background seals and the memory-pressure sealer."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._pressure_sealer)
            if self._write_back_after > 0:
                nursery.start_soon(self._write_back_aged)
            task_status.started()
            await trio.sleep_forever()

    # --- handles ------------------------------------------------------------------------------

    def attach(self, row: tables.InodeRow, writable: bool) -> int:
        """Open a handle on a regular file; returns the handle number."""
        oi = self.open.get(row.id)
        if oi is None:
            assert row.file_id is not None and row.wrapped_dek is not None
            oi = OpenInode(self._data.file_key(row.id, row.file_id, row.wrapped_dek), row.size)
            self.open[row.id] = oi
        oi.handles += 1
        if writable:
            oi.writers += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(row.id, writable)
        return fh

    def handle(self, fh: int) -> tuple[Handle, OpenInode]:
        h = self._handles.get(fh)
        if h is None:
            raise BadFileHandle(f"unknown file handle {fh}")
        return h, self.open[h.inode]

    async def release(self, fh: int) -> InodeId:
        """Close a handle; the last one flushes what is left and drops the inode's state."""
        h, oi = self.handle(fh)
        del self._handles[fh]
        oi.handles -= 1
        sealed_now = False
        if h.writable:
            oi.writers -= 1
            if oi.writers == 0 and oi.size > 0:
                # The WORM age starts at the first close after writing (vfs/retention.py).
                # Usually the close's flush sealed the file already (see flush); otherwise
                # this is committed with the flush below, or by the next commit if readers remain.
                sealed_now = retention.mark_sealed(self._db, h.inode, time.time_ns())
        if oi.handles == 0:
            try:
                # The close(2) before this release already made the file's data and metadata
                # durable (flush): commit again only for what changed since.
                await self._flush_inode(h.inode, oi, commit_anyway=sealed_now, durable=self._sync_close)
            finally:
                # Two releases can flush the same state concurrently, and a new open may have
                # attached a fresh state after the first dropped it: drop only our own.
                if oi.handles == 0 and not oi.dirty and not oi.sealing and self.open.get(h.inode) is oi:
                    del self.open[h.inode]
                    self._data.forget_file(h.inode)
        if h.writable and oi.writers == 0:
            self._notify_changed(h.inode)
        return h.inode

    def _keep_header(self, inode: InodeId, buf: bytearray, plain_len: int) -> None:
        """Keep the first HEADER_BYTES of a file's chunk 0 as sealed, for the indexer: it then
        parses the header from memory instead of reading and decrypting the chunk again."""
        if self._changed is None:
            return
        self.forget_header(inode)
        if self._headers_bytes + HEADER_BYTES > HEADER_MEMORY:
            return  # the indexer is far behind: it reads the header itself
        header = bytes(buf[: min(plain_len, HEADER_BYTES)])
        self._headers[inode] = header
        self._headers_bytes += len(header)

    def take_header(self, inode: InodeId) -> bytes | None:
        """The start of the file as last sealed (up to HEADER_BYTES), if it was kept; the
        caller checks its length against the file size."""
        header = self._headers.pop(inode, None)
        if header is not None:
            self._headers_bytes -= len(header)
        return header

    def forget_header(self, inode: InodeId) -> None:
        self.take_header(inode)

    def is_being_written(self, inode: InodeId) -> bool:
        oi = self.open.get(inode)
        return oi is not None and oi.writers > 0

    def _notify_changed(self, inode: InodeId) -> None:
        self.last_written_close = trio.current_time()
        if self._changed is None:
            return
        try:
            self._changed.send_nowait(inode)
        except trio.WouldBlock:
            pass  # the indexer is busy; it drains the queue in the database anyway
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # shutting down; the queue in the database survives

    def size_of(self, inode: InodeId) -> int | None:
        oi = self.open.get(inode)
        return oi.size if oi is not None else None

    # --- reading ------------------------------------------------------------------------------

    async def read(self, fh: int, offset: int, length: int) -> bytes:
        _, oi = self.handle(fh)
        end = min(offset + length, oi.size)
        if offset >= end:
            return b""
        parts: list[bytes] = []
        for span in spans(offset, end - offset, self.chunk_size):
            parts.append(await self._read_span(oi, span.index, span.start, span.end))
        return b"".join(parts)

    async def _read_span(self, oi: OpenInode, idx: int, start: int, end: int) -> bytes:
        while True:
            dc = oi.dirty.get(idx)
            if dc is not None:
                if dc.covers(start, end):
                    return bytes(dc.buf[start:end])
                await self._fill(oi, idx, dc, end)
                continue
            sealing = oi.sealing.get(idx)
            if sealing is not None:
                return bytes(sealing.chunk.buf[start:end])
            plain = await self._data.read_chunk(oi.key, idx)
            piece = plain[start:end] if plain is not None else b""
            if len(piece) < end - start:
                piece += bytes(end - start - len(piece))
            return piece

    async def _fill(self, oi: OpenInode, idx: int, dc: DirtyChunk, upto: int) -> None:
        """Merge the stored bytes of chunk idx into the parts of dc below `upto` not written yet."""
        base = await self._data.read_chunk(oi.key, idx, readahead=False)
        if oi.dirty.get(idx) is dc:
            dc.fill_uncovered(base, self.pool.zeros, upto)

    # --- writing ------------------------------------------------------------------------------

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        h, oi = self.handle(fh)
        if oi.error is not None:
            err, oi.error = oi.error, None
            raise err
        view = memoryview(data)
        for span in spans(offset, len(data), self.chunk_size):
            dc = await self._dirty_chunk(oi, span.index)
            dc.write(span.start, view[span.buf_offset : span.buf_offset + span.length])
            if dc.is_full(self.chunk_size):
                self._seal_soon(h.inode, oi, span.index)
        oi.size = max(oi.size, offset + len(data))
        oi.mtime_ns = time.time_ns()
        oi.attrs_dirty = oi.content_changed = True
        return len(data)

    async def _dirty_chunk(self, oi: OpenInode, idx: int) -> DirtyChunk:
        buf: bytearray | None = None
        while True:
            sealing = oi.sealing.get(idx)
            if sealing is not None:
                await sealing.done.wait()
                continue
            dc = oi.dirty.get(idx)
            if dc is not None:
                break
            if buf is None:
                buf = await self.pool.acquire()
                continue
            dc = oi.dirty[idx] = DirtyChunk(buf)
            buf = None
            break
        if buf is not None:
            self.pool.release(buf)
        return dc

    def _seal_soon(self, inode: InodeId, oi: OpenInode, idx: int) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._seal_background, inode, oi, idx)

    async def _seal_background(self, inode: InodeId, oi: OpenInode, idx: int) -> None:
        """A seal nobody waits for: its failure is reported by the file's next write or flush."""
        try:
            await self._seal(oi, idx)
        except FsError as exc:
            log.error("sealing chunk %d of inode %d failed: %s", idx, inode, exc)
            oi.error = exc
        except Exception:
            log.exception("sealing chunk %d of inode %d failed unexpectedly", idx, inode)
            oi.error = LocalIOError("sealing a chunk failed")

    async def _seal(self, oi: OpenInode, idx: int) -> None:
        """Encrypt and stage dirty chunk idx. On failure the chunk stays dirty and the error is raised."""
        while True:
            dc = oi.dirty.get(idx)
            if dc is None:
                return  # sealed or truncated away meanwhile
            plain_len = chunk_plain_len(oi.size, idx, self.chunk_size)
            if dc.is_full(plain_len):
                break
            await self._fill(oi, idx, dc, plain_len)  # then check again: the file may have grown
        # No checkpoint since the check above: dc holds every byte of the chunk below EOF.
        del oi.dirty[idx]
        sealing = oi.sealing[idx] = Sealing(trio.Event(), dc)
        keep_buffer = False
        try:
            if plain_len > 0:
                key = await self._data.write_chunk(oi.key, idx, memoryview(dc.buf)[:plain_len])
                oi.changes += 1
                if idx == 0:
                    self._keep_header(oi.key.inode, dc.buf, plain_len)
                if self._wait_uploaded is not None:
                    oi.staged.add(key)
        except BaseException:
            oi.dirty[idx] = dc  # keep the data; a later flush retries
            keep_buffer = True
            raise
        finally:
            del oi.sealing[idx]
            sealing.done.set()
            if not keep_buffer:
                self.pool.release(dc.buf)

    def _relieve_pressure(self) -> None:
        self._pressure.set()

    async def _pressure_sealer(self) -> None:
        """When the buffer pool runs dry, seal the least recently written dirty chunks."""
        while True:
            await self._pressure.wait()
            self._pressure = trio.Event()
            victims = sorted(
                ((dc.touched, inode, idx) for inode, oi in self.open.items() for idx, dc in oi.dirty.items()),
            )[: max(1, self.pool.max_buffers // 4)]
            for _, inode, idx in victims:
                oi = self.open.get(inode)
                if oi is not None and idx in oi.dirty:
                    self._seal_soon(inode, oi, idx)
            await trio.sleep(0)

    async def _write_back_aged(self) -> None:
        """Seal and commit (lightly) every open file whose oldest unsaved chunk is older than
        write_back_after, as the kernel writes back a local file's dirty pages: a file kept
        open for long without fsync (a database, a log) then loses at most that much to a
        crash of the daemon (plus what the kernel still holds), not everything since it was
        opened. A failure is kept for the file's next fsync or close to report."""
        period = max(self._write_back_after / 2, 0.5)
        while True:
            await trio.sleep(period)
            cutoff = time.monotonic() - self._write_back_after
            aged = [(i, oi) for i, oi in self.open.items() if any(dc.dirtied <= cutoff for dc in oi.dirty.values())]
            for inode, oi in aged:
                try:
                    await self._flush_inode(inode, oi, durable=False, wait_uploads=False)
                    self.write_backs += 1
                except FsError as exc:
                    if oi.error is None:
                        log.warning("inode %d: writing back data of an open file failed: %s", inode, exc)
                        oi.error = exc
                except Exception:  # noqa: BLE001 - e.g. the metadata disk full: the file's next flush says so
                    if oi.error is None:
                        log.exception("inode %d: writing back data of an open file failed unexpectedly", inode)
                        oi.error = LocalIOError("writing back the file's data failed")

    # --- flushing -----------------------------------------------------------------------------

    async def _seal_all(self, oi: OpenInode) -> None:
        while oi.dirty or oi.sealing:
            async with trio.open_nursery() as nursery:
                for idx in list(oi.dirty):
                    nursery.start_soon(self._seal, oi, idx)
                for sealing in list(oi.sealing.values()):
                    nursery.start_soon(sealing.done.wait)

    async def _seal_all_or_raise(self, oi: OpenInode) -> None:
        try:
            await self._seal_all(oi)
        except BaseExceptionGroup as group:  # noqa: F821 - builtin in 3.11
            fs_errors = [e for e in group.exceptions if isinstance(e, FsError)]
            if fs_errors and len(fs_errors) == len(group.exceptions):
                raise fs_errors[0] from None
            raise

    def _save_attrs(self, inode: InodeId, oi: OpenInode) -> None:
        if not oi.attrs_dirty:
            return
        row = tables.get_inode(self._db, inode)
        if row is not None:
            row.size = oi.size
            if oi.mtime_ns is not None:
                row.mtime_ns = row.ctime_ns = max(oi.mtime_ns, row.mtime_ns)
            tables.save_inode_attrs(self._db, row)
            oi.changes += 1
        oi.attrs_dirty = False

    async def _flush_inode(
        self, inode: InodeId, oi: OpenInode, *, commit_anyway: bool = False, durable: bool = True,
        seal_worm: bool = False, wait_uploads: bool = True,
    ) -> None:
        """Seal, stage and commit what this file has written. A reader's close with nothing
        of the file's own to commit costs no commit; commit_anyway (a writer's close, fsync)
        always commits, so metadata changed elsewhere is committed too. durable: the commit
        also makes it safe from power loss (commits.py). seal_worm: once
        the data is staged, mark the file sealed for WORM in the same commit (the close of
        its only writer)."""
        await self._seal_all_or_raise(oi)
        if oi.error is not None:
            err, oi.error = oi.error, None
            raise err
        if seal_worm and oi.size > 0:
            retention.mark_sealed(self._db, inode, time.time_ns())
        self._save_attrs(inode, oi)
        if oi.content_changed:
            if self._changed is not None:
                studies.queue_change(self._db, inode)
            oi.content_changed = False
        target = oi.changes
        if target != oi.committed_changes or commit_anyway:
            await self._committer.commit_now(durable=durable)
            oi.committed_changes = max(oi.committed_changes, target)
        if self._wait_uploaded is not None and oi.staged and wait_uploads:
            staged, oi.staged = oi.staged, set()
            await self._wait_uploaded(staged)

    async def flush(self, fh: int, *, durable_anyway: bool = False, closing: bool = False) -> None:
        """fsync (durable_anyway) or close(2) (closing) of a handle. The close of the file's
        only writer seals it for WORM in the same commit as its data, so the release that
        follows needs no commit of its own."""
        h, oi = self.handle(fh)
        # A writer's close always commits (a file created and closed empty is kept too).
        await self._flush_inode(
            h.inode, oi, commit_anyway=durable_anyway or h.writable,
            durable=durable_anyway or self._sync_close,
            seal_worm=closing and h.writable and oi.writers == 1,
        )

    async def commit(self, *, durable: bool = True) -> None:
        """Commit every metadata change so far; durable: also safe from power loss (fsyncdir,
        sync), otherwise from a crash of the daemon (a rename that publishes a file)."""
        await self._committer.commit_now(durable=durable)


    async def flush_all(self) -> list[tuple[InodeId, FsError]]:
        """Seal and commit every open file (unmount, shutdown). A file that cannot be saved
        (the cache disk full or gone) is passed over and returned with its error, so that the
        rest of the shutdown (final commit, uploads, metadata snapshot) still happens for
        everything that was saved."""
        failed: list[tuple[InodeId, FsError]] = []
        for inode, oi in list(self.open.items()):
            try:
                await self._flush_inode(inode, oi)
            except FsError as exc:
                failed.append((inode, exc))
        return failed

    # --- size changes -------------------------------------------------------------------------

    async def truncate(self, row: tables.InodeRow, new_size: int) -> None:
        """Set a file's size; shrinking zeroes and re-seals the last partial chunk. Durable on return."""
        inode = row.id
        oi = self.open.get(inode)
        temporary = oi is None
        if oi is None:
            if row.file_id is None or row.wrapped_dek is None:
                raise NotFound("inode has no content")
            oi = OpenInode(self._data.file_key(inode, row.file_id, row.wrapped_dek), row.size)
            self.open[inode] = oi
        oi.handles += 1  # keep the state alive while we await
        try:
            while oi.sealing:
                await next(iter(oi.sealing.values())).done.wait()
            self.forget_header(inode)  # chunk 0 may change; a reseal keeps it again
            if new_size < oi.size:
                first_gone = chunk_count(new_size, self.chunk_size)
                for idx in [i for i in oi.dirty if i >= first_gone]:
                    self.pool.release(oi.dirty.pop(idx).buf)
                tables.drop_chunks_from(self._db, inode, first_gone)
                tail = new_size % self.chunk_size
                last = new_size // self.chunk_size
                if tail and (last in oi.dirty or tables.get_chunk(self._db, inode, last) is not None):
                    dc = await self._dirty_chunk(oi, last)
                    dc.write(tail, self.pool.zeros[: self.chunk_size - tail])
            oi.size = new_size
            oi.mtime_ns = time.time_ns()
            oi.attrs_dirty = oi.content_changed = True
            await self._flush_inode(inode, oi)
        finally:
            oi.handles -= 1
            if temporary and oi.handles == 0 and not oi.dirty and not oi.sealing and self.open.get(inode) is oi:
                del self.open[inode]
        if temporary:
            self._notify_changed(inode)

    # --- headers for the indexer ----------------------------------------------------------------

    async def read_prefix(self, row: tables.InodeRow, length: int, *, local_only: bool) -> bytes:
        """The first `length` bytes of a closed file (fewer if it is shorter). local_only: raise
        NotCached rather than fetch from a remote store. The caller checks is_being_written."""
        if row.file_id is None or row.wrapped_dek is None:
            raise NotFound("inode has no content")
        oi = self.open.get(row.id)
        key = oi.key if oi is not None else self._data.file_key(row.id, row.file_id, row.wrapped_dek)
        size = oi.size if oi is not None else row.size
        parts: list[bytes] = []
        for span in spans(0, min(length, size), self.chunk_size):
            plain = await self._data.read_chunk(key, span.index, readahead=False, local_only=local_only)
            piece = plain[span.start : span.end] if plain is not None else b""
            parts.append(piece + bytes(span.end - span.start - len(piece)))
        return b"".join(parts)

    def statistics(self) -> dict[str, int]:
        return {
            "open_files": len(self.open),
            "open_handles": len(self._handles),
            "dirty_chunks": sum(len(oi.dirty) for oi in self.open.values()),
            "dirty_buffers_in_use": self.pool.in_use,
        }
