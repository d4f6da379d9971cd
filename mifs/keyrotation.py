"""Online master-key rotation and key status: the `key-rotate` and `key-status` requests of the
control channel, and the rotation task the daemon runs while it serves FUSE requests.

Must not touch file contents or FUSE: a rotation re-wraps data keys (never data) and re-keys
what the old KEK protected. Runs on the trio thread; each batch of re-wrapped keys is one
short transaction, so readers and writers interleave with it.

Order of a rotation (docs/FORMAT.md, "Key rotation"); every step is idempotent, so a mount
or `mifs key rotate` after a crash anywhere finishes it:

1. `keys/rotation` is written (old and new kek id, where each key comes from); from then on
   the mount holds both KEKs and wraps every new data key under the new one.
2. The local metadata database is re-encrypted (SQLCipher rekey) and a snapshot sealed under
   the new KEK replaces every older snapshot and journal segment in the store.
3. The wrapped data keys of all files are re-wrapped, in batches, then every registered
   wrapped-key object (keystore.WRAPPED_KEY_OBJECTS).
4. The descriptor is rewritten naming the new KEK: from here nothing needs the old one.
5. Retirement: the old kek id joins `keys/retired`, its KMS/passphrase objects are deleted,
   `keys/rotation` is deleted and the mount forgets the old KEK.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio

from mifs.archive import Descriptor, rewrite_descriptor
from mifs.commits import Committer
from mifs.control_protocol import Handler, Send
from mifs.crypto import envelope
from mifs.crypto.keyring import KeyRing, MasterKey
from mifs.crypto.keysource import KeySource
from mifs.errors import (
    ArchiveCorrupt,
    IntegrityError,
    KeyFileError,
    KeyUnavailable,
    MifsError,
    ObjectNotFound,
    RotationError,
    StorePermissionDenied,
    StoreUnavailable,
    WrongKey,
)
from mifs.keystore import (
    ROTATION_KEY,
    WRAPPED_KEY_OBJECTS,
    RotationRecord,
    WrappedKeyObject,
    add_retired,
    forget_source_key,
    new_rotation_record,
    new_source_key,
    publish_source_key,
    read_retired,
    write_rotation,
)
from mifs.metadb.db import MetaDb
from mifs.metasync import MetadataReplicator
from mifs.store.base import ObjectStore
from mifs.types import FileId

log = logging.getLogger(__name__)


DEFAULT_BATCH = 256
MAX_BATCH = 10_000
PROGRESS_INTERVAL = 0.5
STORE_RETRY_DELAY = 5.0

KIND_USAGE = "usage"
KIND_KEY = "key"
KIND_FAILED = "failed"


class KeyRotation:
    def __init__(
        self, *, db: MetaDb, store: ObjectStore, keyring: KeyRing, descriptor: Descriptor, own_source: KeySource,
        replicator: MetadataReplicator, committer: Committer, record: RotationRecord | None,
        extras: tuple[WrappedKeyObject, ...] = WRAPPED_KEY_OBJECTS,
    ) -> None:
        """own_source: where this mount's key came from (recorded as the old key's source).
        record: a rotation found in progress at mount; resumed as soon as run() starts."""
        self._db = db
        self._store = store
        self._keyring = keyring
        self.descriptor = descriptor
        self._own_source = own_source
        self._replicator = replicator
        self._committer = committer
        self._record = record
        self._extras = extras
        self._archive_id = descriptor.archive_id
        self._nursery: trio.Nursery | None = None
        self._running = False
        self._finished = trio.Event()
        self.state = "idle"
        self.error = ""
        self.files_total = 0
        self.files_done = 0
        self.batch = DEFAULT_BATCH
        self.throttle = 0.0
        self.last_retired: tuple[str, str] | None = None

    # --- service ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Owns the rotation task; resumes a rotation found in progress. Cancelling it (at
        unmount) stops a rotation between two steps or batches: the next mount resumes it."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._record is not None:
                log.info("resuming the key rotation to master key %s", self._record.new_kek_id.hex())
                self._start()
            task_status.started()
            await trio.sleep_forever()

    def _start(self) -> None:
        assert self._nursery is not None and self._record is not None
        if not self._running:
            self._running = True
            self.error = ""
            self._finished = trio.Event()
            self._nursery.start_soon(self._rotate_task)

    def handlers(self) -> dict[str, Handler]:
        return {"key-rotate": self._handle_rotate, "key-status": self._handle_status}

    def status(self) -> dict[str, Any]:
        """The rotation part of `mifs status` (no store access)."""
        return {
            "kek_id": self._keyring.current.kek_id.hex(),
            "key_rotation": self.state if self._record is not None or self.error else "none",
        }

    # --- requests ---------------------------------------------------------------------------

    async def _handle_rotate(self, request: dict[str, Any], send: Send) -> None:
        try:
            batch = int(request.get("batch") or DEFAULT_BATCH)
            throttle = float(request.get("throttle") or 0.0)
            if not 1 <= batch <= MAX_BATCH or not 0 <= throttle <= 60 or math.isnan(throttle):
                raise ValueError
        except (TypeError, ValueError):
            await send({"ok": False, "error": f"batch must be 1..{MAX_BATCH} and throttle 0..60 seconds", "kind": KIND_USAGE})
            return
        self.batch, self.throttle = batch, throttle
        raw_source = request.get("source")
        try:
            if raw_source is not None:
                await self._begin(KeySource.from_record(raw_source))
            elif self._record is None and self.state == "complete":
                pass  # finished (resumed at mount) before this request came
            elif self._record is None:
                raise RotationError("no key rotation is in progress; give the new key (see mifs key rotate --help)")
            else:
                self._start()
        except ValueError:
            await send({"ok": False, "error": "malformed key source", "kind": KIND_USAGE})
            return
        except (RotationError, KeyFileError) as exc:
            await send({"ok": False, "error": str(exc), "kind": KIND_USAGE if isinstance(exc, RotationError) else KIND_KEY})
            return
        except (WrongKey, KeyUnavailable, StoreUnavailable, StorePermissionDenied, ArchiveCorrupt) as exc:
            await send({"ok": False, "error": str(exc), "kind": KIND_KEY})
            return
        new_id = self._record.new_kek_id.hex() if self._record else self._keyring.current.kek_id.hex()
        if not request.get("wait", True):
            await send({"ok": True, "new_kek_id": new_id, "state": self.state, "waited": False})
            return
        while self._running:
            with trio.move_on_after(PROGRESS_INTERVAL):
                await self._finished.wait()
            if self._running:
                await send({"progress": self._progress()})
        if self.error:
            await send({"ok": False, "error": f"key rotation stopped: {self.error}", "kind": KIND_FAILED})
            return
        retired = {"retired_kek_id": self.last_retired[0], "retired_source": self.last_retired[1]} if self.last_retired else {}
        await send({"ok": True, "new_kek_id": new_id, "state": self.state, "waited": True, **self._progress(), **retired})

    async def _handle_status(self, request: dict[str, Any], send: Send) -> None:
        try:
            await send({"ok": True, "keys": await self.key_status()})
        except (StoreUnavailable, StorePermissionDenied) as exc:
            await send({"ok": False, "error": str(exc), "kind": KIND_FAILED})

    def _progress(self) -> dict[str, Any]:
        return {"state": self.state, "files_done": self.files_done, "files_total": self.files_total}

    async def _begin(self, source: KeySource) -> None:
        """Start a rotation to the key `source` holds (or creates, for KMS and passphrases)."""
        if self._record is not None:
            raise RotationError(
                f"a key rotation to master key {self._record.new_kek_id.hex()} is already in progress; "
                "run mifs key rotate without a new key to wait for it"
            )
        new, params = await new_source_key(source)
        old = self._keyring.current
        if new.kek_id == old.kek_id:
            raise RotationError("the new key is the archive's current master key")
        if any(e.get("kek_id") == new.kek_id.hex() for e in await read_retired(self._store)):
            raise RotationError(f"master key {new.kek_id.hex()} was retired by an earlier rotation; use a fresh key")
        await publish_source_key(source, self._store, self._archive_id, new, params)
        record = new_rotation_record(old, self._own_source, new, source)
        await write_rotation(self._store, self._archive_id, record, old, new)
        self._keyring.add(new, make_current=True)  # from now on every new file key is under it
        self._record = record
        log.info("key rotation started: master key %s -> %s", old.kek_id.hex(), new.kek_id.hex())
        self._start()

    # --- the rotation -----------------------------------------------------------------------

    async def _rotate_task(self) -> None:
        try:
            while True:
                try:
                    await self._rotate()
                    break
                except (StoreUnavailable, StorePermissionDenied) as exc:
                    self.state = "waiting for the store"
                    log.warning("key rotation paused, the store failed (%s); retrying", exc)
                    await trio.sleep(STORE_RETRY_DELAY)
        except (MifsError, IntegrityError) as exc:
            self.error = str(exc)
            self.state = "stopped"
            log.error("key rotation stopped: %s", exc)
        finally:
            self._running = False
            self._finished.set()

    async def _rotate(self) -> None:
        record = self._record
        assert record is not None
        new = self._keyring.get(record.new_kek_id)
        if self.descriptor.kek_id == record.old_kek_id:
            old = self._keyring.get(record.old_kek_id)
            self.state = "re-keying the metadata"
            await self._replicator.rekey(
                new.derive(self._archive_id, "metadb"), new.derive(self._archive_id, "metadata-replica"),
                self._committer.commit_now,
            )
            self.state = "re-wrapping file keys"
            await self._rewrap_files(old, new)
            self.state = "re-wrapping key objects"
            await self._rewrap_extras(new)
            if self._count_under(old.kek_id):
                raise RotationError("file keys under the old master key remain after re-wrapping")  # cannot happen
            self.state = "switching the descriptor"
            self.descriptor = await rewrite_descriptor(self._store, self.descriptor, new)
        self.state = "retiring the old key"
        await add_retired(self._store, record.old_kek_id, record.new_kek_id)
        await forget_source_key(self._store, record.old_kek_id)
        await self._store.delete(ROTATION_KEY)
        if self._keyring.holds(record.old_kek_id):
            self._keyring.drop(record.old_kek_id)
        self._record = None
        self.state = "complete"
        self.last_retired = (record.old_kek_id.hex(), record.old_source.describe())
        log.info("key rotation complete: master key %s retired, %s current", record.old_kek_id.hex(), new.kek_id.hex())

    def _count_under(self, kek_id: bytes) -> int:
        return int(self._db.scalar(
            "SELECT count(*) FROM inodes WHERE wrapped_dek IS NOT NULL AND substr(wrapped_dek, 2, 16) = ?", (kek_id,)
        ) or 0)

    async def _rewrap_files(self, old: MasterKey, new: MasterKey) -> None:
        """Batches of `batch` keys, each one short transaction made durable before the next;
        new files meanwhile get keys under the new KEK, so one pass by inode id finds all."""
        self.files_total = self._count_under(old.kek_id) + self._count_under(new.kek_id)
        self.files_done = self._count_under(new.kek_id)
        last = 0
        while True:
            rows = self._db.all(
                "SELECT id, file_id, wrapped_dek FROM inodes WHERE id > ? AND wrapped_dek IS NOT NULL "
                "AND substr(wrapped_dek, 2, 16) = ? ORDER BY id LIMIT ?", (last, old.kek_id, self.batch),
            )
            if not rows:
                break
            # No checkpoint from the SELECT to the last UPDATE: the rows cannot change meanwhile.
            for inode, file_id, wrapped in rows:
                try:
                    dek = envelope.unwrap_data_key(old, self._archive_id, FileId(file_id), wrapped)
                except IntegrityError:
                    raise IntegrityError(f"the wrapped key of inode {inode} failed authentication") from None
                self._db.write(
                    "UPDATE inodes SET wrapped_dek = ? WHERE id = ? AND wrapped_dek = ?",
                    (envelope.wrap_data_key(new, self._archive_id, FileId(file_id), dek), inode, wrapped),
                    inode=inode,
                )
                last = inode
            await self._committer.commit_now()
            self.files_done += len(rows)
            await trio.sleep(self.throttle)
        self.files_total = self.files_done = self._count_under(new.kek_id)

    async def _rewrap_extras(self, new: MasterKey) -> None:
        for obj in self._extras:
            try:
                blob = await self._store.get(obj.key)
            except ObjectNotFound:
                continue
            kek_id = envelope.wrapped_key_kek_id(blob)
            if kek_id == new.kek_id:
                continue
            dek = envelope.unwrap_data_key(self._keyring.get(kek_id), self._archive_id, obj.file_id, blob)
            await self._store.put(obj.key, envelope.wrap_data_key(new, self._archive_id, obj.file_id, dek))

    # --- key status -------------------------------------------------------------------------

    async def key_status(self) -> dict[str, Any]:
        rotation = None
        if self._record is not None or self.error:
            rotation = {**self._progress(), "running": self._running, "error": self.error or None}
        return await key_status(
            self._db, self._store, self._keyring.current.kek_id, self.descriptor, self._record, self._extras, rotation
        )


async def key_status(
    db: MetaDb | None, store: ObjectStore, current: bytes | None, descriptor: Descriptor, record: RotationRecord | None,
    extras: tuple[WrappedKeyObject, ...] = WRAPPED_KEY_OBJECTS, rotation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every KEK id the archive knows, how many wrapped keys each wraps, and its role.
    db None (no local metadata): file counts are unknown (None)."""
    counts: dict[str, dict[str, int]] = {}
    if db is not None:
        for kek_id, n in db.all(
            "SELECT substr(wrapped_dek, 2, 16), count(*) FROM inodes WHERE wrapped_dek IS NOT NULL GROUP BY 1"
        ):
            counts.setdefault(bytes(kek_id).hex(), {"files": 0, "objects": 0})["files"] = int(n)
    for obj in extras:
        try:
            blob = await store.get(obj.key)
            kek_hex = envelope.wrapped_key_kek_id(blob).hex()
        except (ObjectNotFound, IntegrityError):
            continue
        counts.setdefault(kek_hex, {"files": 0, "objects": 0})["objects"] += 1
    retired = {e["kek_id"]: e for e in await read_retired(store) if "kek_id" in e}
    current_hex = (current or descriptor.kek_id).hex()
    old_hex = record.old_kek_id.hex() if record is not None else None
    ids = [current_hex] + ([old_hex] if old_hex and old_hex != current_hex else [])
    ids += [k for k in counts if k not in ids]
    ids += [k for k in retired if k not in ids]
    keys = []
    for kek_hex in ids:
        c = counts.get(kek_hex, {"files": 0, "objects": 0})
        if kek_hex == current_hex:
            role = "current"
        elif kek_hex == old_hex:
            role = "old (rotation in progress)"
        elif kek_hex in retired:
            role = "retired"
        else:
            role = "unknown"
        files = c["files"] if db is not None else None
        entry: dict[str, Any] = {
            "kek_id": kek_hex, "role": role, "files": files, "objects": c["objects"],
            "wrapped_keys": (files or 0) + c["objects"] if db is not None else None,
        }
        if kek_hex in retired:
            entry.update(retired=retired[kek_hex].get("retired"), replaced_by=retired[kek_hex].get("replaced_by"))
        keys.append(entry)
    if record is not None:
        rotation = {
            **(rotation or {}), "old_kek_id": record.old_kek_id.hex(), "new_kek_id": record.new_kek_id.hex(),
            "started": record.started,
        }
    return {
        "current_kek_id": current_hex, "descriptor_kek_id": descriptor.kek_id.hex(), "keys": keys, "rotation": rotation,
    }
