"""Composition root: builds every component from the configuration, mounts, serves, unmounts.

Owns the one trio nursery, pyfuse3 init/main/close, signals, the control socket and the
background services. The process side (checks in the CLI's process, daemonizing, logging)
is launch.py. Business logic lives below; this module wires.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from mifs import __version__
from mifs.audit.commands import AuditCommands
from mifs.audit.events import FsAudit
from mifs.audit.spool import SPOOL_DIR, Spool
from mifs.audit.trail import Actor, AuditError, AuditTrail, open_trail
from mifs.cache import ChunkCache
from mifs.chunks import DataPath
from mifs.commits import Committer
from mifs.compression import ChunkCompressor
from mifs.config import DEFAULT_PACK_SIZE, MountConfig
from mifs.control_protocol import socket_path
from mifs.control_server import ControlServer, Peer
from mifs.dicom_index.catalog import StudyCatalog
from mifs.dicom_index.commands import StudyCommands
from mifs.dicom_index.indexer import Indexer
from mifs.dicom_index.prefetch import Prefetcher
from mifs.errors import ArchiveCorrupt, LocalIOError, StorePermissionDenied, StoreUnavailable, UserError
from mifs.keyrotation import KeyRotation
from mifs.metadb import studies, tables
from mifs.metasync import MetadataReplicator
from mifs.mounttable import raise_readahead, run_fusermount
from mifs.exit_codes import EXIT_ARCHIVE, EXIT_MOUNTPOINT, EXIT_USAGE
from mifs.opening import (
    OpenedArchive,
    check_cache_not_behind_store,
    default_cache_dir,
    kek_of_db,
    key_source_of,
    open_archive,
    open_cache_db,
    prepare_cache_dir,
    restore_if_needed,
    store_options,
    translate,
)
from mifs.sdnotify import Notifier
from mifs.shred.commands import ShredCommands
from mifs.shred.service import Shredder
from mifs.store_sync import StoreSync
from mifs.sweep.commands import SweepCommands
from mifs.sweep.service import WRITER_SESSIONS_FILE, OrphanSweeper
from mifs.types import InodeId
from mifs.uploader import Uploader
from mifs.vfs.files import FileData
from mifs.vfs.filesystem import FileSystem
from mifs.vfs.namespace import Namespace
from mifs.vfs.retention import RetentionPolicy, days_to_ns

log = logging.getLogger(__name__)

Service = Callable[..., Awaitable[None]]
"""A background service's run(task_status=...)."""


# --- background services -------------------------------------------------------------------------


async def run_guarded(
    name: str, run: Service, on_failure: Callable[[str], None], *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a background service. One that fails once running does not end the daemon, which
    would take the mount and the unsaved data of every open file with it: the failure is
    logged and on_failure(name) called (the daemon turns the mount failsafe read-only and
    unmounts without it). A failure while starting is raised: it fails the mount."""
    started = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            started = True
            task_status.started()
    except Exception:
        if not started:
            raise
        log.exception("the %s service failed; the mount is read-only from now on", name)
        on_failure(name)


# --- serving -----------------------------------------------------------------------------------

INDEX_CATCH_UP_SECONDS = 30.0
"""How long an unmount waits for the indexer's backlog (files just written are read from the
cache: ~1 ms each; --no-wait does not wait)."""

ADMIN_REQUESTS = {
    "umount": "umount", "pin": "cache pin", "unpin": "cache unpin", "prefetch": "cache prefetch",
    "reindex": "reindex", "audit-verify": "audit verify", "audit-query": "audit query",
    "key-rotate": "key rotate", "shred": "shred", "undelete": "undelete", "sweep": "sweep",
    "writers-rm": "writers rm",
}
"""Control requests recorded in the audit trail as admin actions (with the requester's uid)."""


def _mounting_actor() -> dict[str, Any]:
    """Who ran `mifs mount`: our uid, plus the login uid and sudo's caller where known."""
    details: dict[str, Any] = {}
    try:
        with open("/proc/self/loginuid") as fh:
            login = int(fh.read().strip())
        if login != 0xFFFFFFFF:
            details["loginuid"] = login
    except (OSError, ValueError):
        pass
    if os.environ.get("SUDO_UID", "").isdigit():
        details["sudo_uid"] = int(os.environ["SUDO_UID"])
    return details



class Daemon:
    """One mounted archive: every component, the pyfuse3 session and the shutdown sequence."""

    def __init__(
        self, cfg: MountConfig, archive: OpenedArchive, cache_dir: Path, trail: AuditTrail,
        audit_notes: list[tuple[str, dict[str, Any]]],
    ) -> None:
        import pyfuse3  # noqa: F401 - fail early if missing

        assert archive.kek is not None
        self.cfg = cfg
        self.archive = archive
        self.cache_dir = cache_dir
        self.db = open_cache_db(cache_dir, archive)
        desc = archive.descriptor
        self.trail = trail
        self.fs_audit = FsAudit(trail, self.db)
        trail.admin(
            "mount", Actor(os.getuid(), os.getgid(), os.getpid()), session=trail.session, mountpoint=str(cfg.mountpoint),
            options=sorted(cfg.fuse_options), read_only=cfg.read_only, allow_uids=cfg.allow_uids or None,
            allow_gids=cfg.allow_gids or None, version=__version__, **_mounting_actor(),
        )
        for event, fields in audit_notes:
            trail.record(event, **fields)
        # A local-directory store is as fast as the cache: keep no second copy of its chunks.
        store_is_local = archive.location.scheme == "file"
        self.cache = ChunkCache(cache_dir, cfg.cache_size, keep_uploaded=not store_is_local)
        self.cache.scan_sync(
            {key for key, _ in tables.pending_uploads(self.db)}, group_of=lambda key: studies.study_of_key(self.db, key)
        )
        self.cache.set_pinned(studies.pinned_ids(self.db))
        pack_size = cfg.pack_size if cfg.pack_size is not None else (0 if store_is_local else DEFAULT_PACK_SIZE)
        self.uploader = Uploader(
            archive.store, self.cache, self.db, cfg.upload_workers, delay=0.0 if cfg.sync_uploads else cfg.upload_delay,
            pack_size=pack_size,
        )
        self.committer = Committer(self.db, self.cache, self.uploader, sync_interval=cfg.sync_interval)
        assert archive.keyring is not None and archive.key_source is not None
        self.data = DataPath(
            keyring=archive.keyring, archive_id=desc.archive_id, db=self.db, cache=self.cache, store=archive.store,
            uploader=self.uploader, chunk_size=desc.chunk_size, plaintext_cache_bytes=cfg.plaintext_cache_bytes,
            fetch_timeout=cfg.fetch_timeout, staging_timeout=cfg.staging_timeout, store_is_local=store_is_local,
            pack_neighbours=cfg.prefetch,
            on_integrity_failure=self.fs_audit.integrity_failure,
            compressor=ChunkCompressor(cfg.compress_level) if cfg.compress_level is not None else None,
        )
        # vfs -> dicom_index: files closed after writing (to index) and opened for reading
        # (to prefetch their study). Hints only; the durable work list is in the database.
        changed_send, changed_receive = trio.open_memory_channel[InodeId](1024)
        opened_send, opened_receive = trio.open_memory_channel[InodeId](1024)
        self.files = FileData(
            self.db, self.data, self.committer, cfg.dirty_buffer_bytes,
            wait_uploaded=self.uploader.wait_uploaded if cfg.sync_uploads else None,
            sync_close=cfg.sync_close or cfg.sync_uploads,
            changed=changed_send if cfg.index else None,
            write_back_after=cfg.sync_interval,
        )
        policy = RetentionPolicy(retention_ns=days_to_ns(cfg.retention_days), worm_ns=days_to_ns(cfg.worm_days))
        self.ns = Namespace(self.db, self.files, self.data.new_file_key, policy)
        self.ns.ensure_root(os.getuid(), os.getgid())
        self.xattrs = cfg.xattrs if cfg.xattrs is not None else tables.xattrs_in_use(self.db)
        purged = self.ns.purge_orphans()
        if purged:
            log.info("removed %d unlinked inodes left by the previous run", purged)
        self.db.commit()
        self.uploader.load_pending()
        self.uploader.after_light_commit()
        self.uploader.after_commit(self.uploader.commit_point())

        self.fs = FileSystem(
            self.db, self.ns, self.files, cache_dir, cfg.read_only,
            opened_for_reading=opened_send if cfg.prefetch and not store_is_local else None,
        )
        self.indexer = Indexer(self.db, self.files, self.cache, changed_receive, changed_send)
        self.prefetcher = Prefetcher(
            self.db, self.data, self.cache, opened_receive,
            on_open=cfg.prefetch, priors=cfg.prefetch_priors, parallel=cfg.prefetch_parallel,
        )
        self.study_commands = StudyCommands(
            self.db, StudyCatalog(self.db, self.cache, store_is_local), self.prefetcher, self.indexer, cfg.index
        )
        self.audit_commands = AuditCommands(trail, self.db)
        self._dicom_scope = trio.CancelScope()
        waiting, deferred = studies.backlog(self.db)
        if waiting or deferred:
            log.info("%d files wait to be indexed, %d more wait for `mifs reindex`", waiting, deferred)
        # The replica is sealed under the KEK the database is under (they change together).
        self.replicator = MetadataReplicator(
            self.db, archive.store, kek_of_db(self.db, archive).derive(desc.archive_id, "metadata-replica"), self.cache.tmp,
            make_durable=self.committer.commit_now,
        )

        self.key_rotation = KeyRotation(
            db=self.db, store=archive.store, keyring=archive.keyring, descriptor=desc, own_source=archive.key_source,
            replicator=self.replicator, committer=self.committer, record=archive.rotation,
        )
        self._rotation_scope = trio.CancelScope()
        self.shredder = Shredder(
            self.db, self.ns, self.files, self.data, self.cache, self.committer, self.replicator,
            invalidate=self._invalidate_kernel, audit=self._audit_admin_action,
        )
        self.sweeper = OrphanSweeper(
            self.db, archive.store, interval=cfg.orphan_sweep_interval, grace=cfg.orphan_grace,
            read_only=self.refuses_store_deletes, sessions_file=cache_dir / WRITER_SESSIONS_FILE,
        )
        self.sweep_commands = SweepCommands(self.sweeper, self.refuses_store_deletes, cfg.orphan_grace)
        self.store_sync = StoreSync(self.committer, self.uploader, self.replicator, read_only=lambda: cfg.read_only)
        self.shred_commands = ShredCommands(self.shredder, policy.retention_ns, read_only=self.refuses_store_deletes)
        self.finished = trio.Event()
        self.started = time.time()
        self.real_mountpoint = os.path.realpath(cfg.mountpoint)  # before mounting: see raise_readahead
        self.notifier = Notifier()
        self._unmount_requested = False
        self._failed_services: set[str] = set()

    def refuses_store_deletes(self) -> bool:
        """Read-only or failsafe: the sweep, shred and writers rm must not touch the store."""
        return bool(self.cfg.read_only or self.fs.failsafe_reason)

    def status(self) -> dict[str, Any]:
        counts = tables.counts(self.db)
        up = self.uploader.statistics()
        cache = self.cache.statistics()
        return {
            "mounted": True,
            "version": __version__,
            "pid": os.getpid(),
            "archive_id": self.archive.descriptor.archive_id_hex,
            "store": str(self.archive.location),
            "mountpoint": str(self.cfg.mountpoint),
            "cache_dir": str(self.cache_dir),
            "files": counts.files,
            "directories": counts.directories,
            "symlinks": counts.symlinks,
            "bytes": counts.bytes,
            "objects": counts.objects,
            "chunks": counts.chunks,
            "stored_bytes": counts.stored_bytes,
            "packs": counts.packs,
            "pack_dead_bytes": counts.pack_dead_bytes,
            "pending_uploads": up.pending_uploads,
            "pending_bytes": up.pending_bytes,
            "oldest_pending_seconds": round(up.oldest_pending_age, 1),
            "uploaded_objects": up.uploaded_objects,
            "uploaded_packs": up.uploaded_packs,
            "deleted_objects": up.deleted_objects,
            "garbage": counts.garbage,
            "repacked_packs": self.uploader.repacked_packs,
            "store_reachable": up.store_reachable,
            "last_error": up.last_error,
            **self._store_retry_status(),
            "cache_bytes": cache.bytes_used,
            "cache_limit": cache.bytes_limit,
            "cache_limit_now": cache.bytes_limit_now,
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "read_only": self.cfg.read_only,
            "xattrs": self.xattrs,
            "sync_close": self.cfg.sync_close or self.cfg.sync_uploads,
            "failsafe": self.fs.failsafe_reason,
            "integrity_failures": self.data.integrity_failures,
            "fetched_chunks": self.data.fetched_chunks,
            "staging_waits": self.data.staging_waits,
            "open_file_write_backs": self.files.write_backs,
            **self._compression_status(),
            "metadata_shipped_seq": self.replicator.shipped_seq,
            "metadata_commit_seq": self.db.commit_seq,
            "metadata_durable_seq": self.db.durable_seq,
            "uptime_seconds": round(time.time() - self.started, 1),
            **self.files.statistics(),
            **self._audit_status(),
            **self.study_commands.status(),
            **self.key_rotation.status(),
            **self.shredder.statistics(),
            **self.sweeper.statistics(),
        }

    def _store_retry_status(self) -> dict[str, Any]:
        """Store operations failing now but still being retried (for up to a minute before the
        uploader reports the store unreachable): an admin sees the trouble at once."""
        statistics = getattr(self.archive.store, "statistics", None)
        if statistics is None:
            return {"store_retrying": 0, "store_last_error": ""}
        st = statistics()
        return {"store_retrying": st.retrying, "store_last_error": st.last_error}

    def _compression_status(self) -> dict[str, Any]:
        compressor = self.data.compressor
        if compressor is None:
            return {"compression": "off"}
        st = compressor.statistics()
        return {
            "compression": f"zstd:{compressor.level}", "compressed_chunks": st.compressed,
            "compress_skipped_dicom": st.skipped_dicom, "compress_skipped_sample": st.skipped_sample,
            "compress_not_smaller": st.not_smaller, "compressed_plain_bytes": st.plain_bytes,
            "compressed_stored_bytes": st.stored_bytes,
        }

    def _audit_status(self) -> dict[str, Any]:
        st = self.trail.statistics()
        return {
            "audit_segment": st.segment, "audit_records": st.records, "audit_pending": st.pending,
            "audit_unshipped_segments": st.unshipped_segments, "audit_shipped_segment": st.shipped_segment,
            "audit_last_error": st.last_error, **self.fs_audit.statistics(),
        }

    def _on_control(self, op: str, request: dict[str, Any], peer: Peer | None) -> None:
        """Record admin requests on the control socket with the requester's credentials."""
        action = ADMIN_REQUESTS.get(op)
        if action is None:
            return
        actor = Actor(peer[1], peer[2], peer[0]) if peer is not None else Actor(None)
        details = {
            k: v for k, v in request.items()
            if isinstance(v, (str, int, float, bool)) and k not in ("op", "action", "uid", "gid", "pid")
        }
        if isinstance(request.get("uid"), int):
            details["uid"] = request["uid"]
        # Nested, so that a query's filters (patient, study) never read as the record's own ids.
        self.trail.admin(action, actor, request=details or None)

    def _audit_admin_action(self, action: str, details: dict[str, Any]) -> None:
        """Shred and undelete: what was destroyed or restored (counts, inode numbers; the
        requester is recorded from the control request by _on_control)."""
        self.trail.admin(f"{action} done", None, result=details)

    async def _invalidate_kernel(self, inode: InodeId, names: list[tuple[InodeId, bytes]]) -> None:
        """Make the kernel forget names (and, for a destroyed inode, its attributes and cached
        pages, which hold plaintext). Called outside any request handler, from worker threads:
        the notifications may wait for kernel locks that a request in flight holds."""
        import pyfuse3

        for parent, name in names:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, name)
            except OSError:
                pass  # the kernel did not know the name
        if inode:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
            except OSError:
                pass  # the kernel did not know the inode

    async def request_unmount(self, wait_for_uploads: bool = True) -> str | None:
        self.cfg.wait_uploads_on_exit = wait_for_uploads
        problem = await trio.to_thread.run_sync(run_fusermount, self.cfg.mountpoint)
        if problem is None:
            self._unmount_requested = True
            log.info("unmount requested")
        return problem

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("received signal %d; unmounting", signum)
                self.trail.admin("umount", None, signal=int(signum))
                problem = await self.request_unmount()
                if problem is not None:
                    log.warning("clean unmount failed (%s); detaching lazily", problem)
                    await trio.to_thread.run_sync(run_fusermount, self.cfg.mountpoint, True)

    async def _probe_ready(self, ready: Callable[[], None]) -> None:
        await trio.to_thread.run_sync(os.statvfs, self.cfg.mountpoint)
        if not await trio.to_thread.run_sync(raise_readahead, self.real_mountpoint):
            log.info("could not raise the kernel read-ahead of the mount (not root?)")
        log.info("mounted archive %s at %s", self.archive.descriptor.archive_id_hex, self.cfg.mountpoint)
        ready()
        self.notifier.ready(f"mounted at {self.cfg.mountpoint}")
        while self.notifier.enabled:
            up = self.uploader.statistics()
            self.notifier.status(
                f"mounted at {self.cfg.mountpoint}; {up.pending_uploads} uploads pending"
                + ("" if up.store_reachable else "; store unreachable")
            )
            await trio.sleep(5)

    async def _run_dicom_services(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Indexer and prefetcher, in a scope of their own: they stop before the final flush."""
        with self._dicom_scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.indexer.run)
                await nursery.start(self.prefetcher.run)
                task_status.started()

    async def _run_key_rotation(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The key rotation service, in a scope of its own: it stops before the final flush
        (a rotation cut short there resumes at the next mount)."""
        with self._rotation_scope:
            await self.key_rotation.run(task_status=task_status)

    def _service_failed(self, name: str) -> None:
        self._failed_services.add(name)
        self.fs.enter_failsafe(f"the {name} service failed (see the daemon log)")

    async def _shutdown(self) -> dict[str, Any]:
        self._rotation_scope.cancel()
        if self.cfg.wait_uploads_on_exit and self.cfg.index and not self.cfg.read_only:
            await self.indexer.catch_up(INDEX_CATCH_UP_SECONDS)
        self._dicom_scope.cancel()
        unsaved = await self.fs.shutdown()
        await self.committer.commit_now()
        if self.cfg.wait_uploads_on_exit and "uploader" not in self._failed_services:
            await self.uploader.wait_idle()
            await self.committer.commit_now()
            await self.uploader.wait_idle()
            await self.committer.commit_now()
        # With --no-wait (or a store that refuses us) the final snapshot is best effort: the
        # journal segments already shipped and the next mount's snapshot cover it.
        with trio.move_on_after(math.inf if self.cfg.wait_uploads_on_exit else 5.0) as scope:
            try:
                await self.replicator.ship(snapshot=True)
            except (StoreUnavailable, StorePermissionDenied, LocalIOError, OSError) as exc:
                log.error("could not store the final metadata snapshot: %s", exc)
        if scope.cancelled_caught:
            log.warning("the final metadata snapshot did not reach the store in time; the next mount takes one")
        if not self.cfg.read_only:
            with trio.move_on_after(math.inf if self.cfg.wait_uploads_on_exit else 5.0):
                await self.sweeper.unregister()
        await trio.to_thread.run_sync(self.cache.stop_behind)
        self.trail.record("unmounted", session=self.trail.session, integrity_failures=self.data.integrity_failures)
        await self.trail.close(ship_timeout=60.0 if self.cfg.wait_uploads_on_exit else 5.0)
        up = self.uploader.statistics()
        return {
            "pending_uploads": up.pending_uploads, "pending_bytes": up.pending_bytes, "pid": os.getpid(),
            "unsaved_files": len(unsaved), "unsaved_reason": unsaved[0] if unsaved else "",
        }

    async def serve(self, ready: Callable[[], None]) -> None:
        import pyfuse3

        from mifs.fuse_ops import Operations

        ops = Operations(
            self.fs, self.cfg.attr_timeout, audit=self.fs_audit,
            allow_uids=frozenset(self.cfg.allow_uids), allow_gids=frozenset(self.cfg.allow_gids),
            xattrs=self.xattrs,
        )
        options = {"fsname=mifs", "subtype=mifs", "default_permissions"}
        options.update(o for o in self.cfg.fuse_options if o != "rw")
        if self.cfg.allow_uids or self.cfg.allow_gids:
            options.add("allow_other")  # the allow list is for other accounts (the PACS service)
        control = ControlServer(
            socket_path(self.cfg.mountpoint), self.status, self.request_unmount, self.finished,
            handlers={
                **self.study_commands.handlers(), **self.key_rotation.handlers(), **self.audit_commands.handlers(),
                **self.shred_commands.handlers(), **self.sweep_commands.handlers(),
                **self.store_sync.handlers(),
            },
            on_request=self._on_control,
        )
        try:
            pyfuse3.init(ops, str(self.cfg.mountpoint), options)
        except RuntimeError as exc:
            raise UserError(f"cannot mount at {self.cfg.mountpoint}: {exc}", EXIT_MOUNTPOINT) from None
        mounted = True
        try:
            async with trio.open_nursery() as nursery:
                services: list[tuple[str, Service]] = [
                    ("audit trail", self.trail.run), ("uploader", self.uploader.run),
                    ("committer", self.committer.run), ("data path", self.data.run), ("file data", self.files.run),
                    ("metadata replicator", self.replicator.run),
                ]
                if not self.cfg.read_only:
                    services += [("shredder", self.shredder.run), ("orphan sweep", self.sweeper.run)]
                services += [
                    ("study index", self._run_dicom_services), ("key rotation", self._run_key_rotation),
                    ("control server", control.run),
                ]
                for name, run in services:
                    await nursery.start(run_guarded, name, run, self._service_failed)
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(self._probe_ready, ready)
                await pyfuse3.main(min_tasks=4, max_tasks=64)
                mounted = False
                log.info("kernel session ended; flushing")
                self.notifier.stopping("unmounted; flushing and uploading")
                control.final_result = await self._shutdown()
                self.finished.set()
                with trio.move_on_after(10):
                    await control.wait_replied()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=mounted)
            self.db.close()
            log.info("archive %s closed", self.archive.descriptor.archive_id_hex)


def run_daemon(cfg: MountConfig, ready: Callable[[], None]) -> None:
    """Open everything and serve until unmounted (runs in the daemon process, logging set up
    by launch.py; ready() once the mount is live)."""

    async def main() -> None:
        archive = await open_archive(cfg.store_url, key_source_of(cfg), options=store_options(cfg))
        cache_dir = cfg.cache_dir or default_cache_dir(archive.descriptor.archive_id_hex)
        lock_fd = prepare_cache_dir(cache_dir)
        try:
            try:
                await restore_if_needed(archive, cache_dir)
            except ArchiveCorrupt as exc:
                raise translate(exc) from None
            store_newest = await check_cache_not_behind_store(archive, cache_dir, read_only=cfg.read_only)
            assert archive.keyring is not None
            try:
                trail, notes = await open_trail(
                    archive.store, archive.keyring, archive.descriptor.archive_id, Spool(cache_dir / SPOOL_DIR),
                    segment_seconds=cfg.audit_segment_seconds,
                )
            except (StoreUnavailable, StorePermissionDenied, AuditError) as exc:
                raise UserError(f"cannot open the audit trail: {exc}", EXIT_ARCHIVE) from None
            except OSError as exc:
                raise UserError(f"cannot open the audit spool in {cache_dir}: {exc.strerror}", EXIT_USAGE) from None
            daemon = Daemon(cfg, archive, cache_dir, trail, notes)
            if store_newest is not None:
                daemon.replicator.store_listed(store_newest)
            await daemon.serve(ready)
        finally:
            os.close(lock_fd)

    trio.run(main)
