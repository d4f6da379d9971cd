"""The orphan sweep: deletes chunk objects in the store that no metadata row names.

Must not see plaintext or keys. Every chunk object mifs writes is named by a chunk row before
its upload starts (chunks.DataPath.write_chunk), and a row that goes away hands its object to
the `garbage` table, which the uploader empties. Objects can still end up named by nothing:

- the daemon dies (kill -9, a crash) after uploading a chunk whose row was in a transaction
  that never committed;
- a power loss undoes light commits (commits.py) whose chunks were already uploaded;
- a chunk's garbage was purged while another copy of the same upload was retried by the store.

They are encrypted under keys nothing holds any more, so they leak nothing, but they cost
storage for ever. The sweep lists the store's chunk objects one fan-out prefix (`data/xx/`) at
a time, keeps those that neither a chunk row nor a garbage row names, and deletes (with every
stored version) only those found unnamed again by a later pass at least `grace` seconds after
the first: keys are random and never reused, so a key unnamed twice stays unnamed.

It refuses to run when another database may name chunks this one does not know:

- when the store's metadata (snapshots, journal) is newer than the local database (a database
  restored from an old copy of the cache disk, or another host wrote since);
- when another writable mount is registered in the store (`writers/<session>`,
  docs/FORMAT.md section 2): every writable mount registers a random session id when it
  starts and removes it at a clean unmount; a mount removes the registrations its own cache
  dir left behind (a crash of this gateway: it holds the cache dir's lock, so they are dead).
  What remains belongs to another host, alive or crashed: two hosts writing one archive is
  not supported, but a returning primary next to its failover host must not delete the
  chunks the other's database names. Once the other host is gone for good, deleting its
  registration from the store lets the sweep run again (`mifs writers rm`).

Admins see the registry with `mifs writers ls`, remove a dead host's registration with
`mifs writers rm`, and start a pass at once with `mifs sweep` (commands.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import trio

from mifs.errors import ObjectNotFound, StorePermissionDenied, StoreUnavailable
from mifs.localfs import fdatasync_path
from mifs.metadb import tables
from mifs.metadb.db import MetaDb
from mifs.metasync import newest_store_seq
from mifs.store.base import ObjectStore
from mifs.types import ObjectKey

log = logging.getLogger(__name__)

DATA_PREFIX = "data/"
FAN_OUT = [f"{DATA_PREFIX}{i:02x}/" for i in range(256)]
"""The prefixes chunk objects are spread over (store.base.new_object_key)."""
MAX_CANDIDATES = 100_000
"""At most this many unnamed keys are remembered between passes (the rest wait for the next)."""
FIRST_PASS_DELAY = 600.0
"""Seconds after mounting before the first pass: the mount settles (uploads resume) first."""
CHECK_BATCH = 500
"""Keys looked up in the database per query."""
WRITERS_PREFIX = "writers/"
"""One object per registered writable mount, named by its random session id (docs/FORMAT.md
section 2)."""
REGISTRATION_FORMAT = 1
"""`{"mifs_writer": 1, "registered": "<UTC time>"}`: no host name, nothing about the archive."""
REGISTER_RETRY = 30.0
REGISTER_AT_START = 10.0
WRITER_SESSIONS_FILE = "writer-sessions"
"""In the cache dir: the sessions it registered (docs/FORMAT.md section 8)."""
_SESSION_RE = re.compile(r"[0-9a-f]{32}")


def is_session_id(text: str) -> bool:
    return _SESSION_RE.fullmatch(text) is not None


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Registration:
    """One writable mount registered in the store."""

    session: str
    registered: str | None
    """UTC time it registered (None: unreadable, or written by an older mifs)."""
    this_mount: bool


class RegistrationRefused(Exception):
    """A registration cannot be removed (this mount's own, or not a session id)."""


@dataclass(frozen=True)
class SweepOutcome:
    """What one pass did: `skipped` says why it did not look at the store's objects."""

    purged: int
    candidates: int
    skipped: str | None


@dataclass
class SweepStatistics:
    orphan_sweeps: int = 0
    orphans_purged: int = 0
    orphan_candidates: int = 0
    last_orphan_sweep: str | None = None
    """UTC time the last pass finished, or why it was skipped."""


class OrphanSweeper:
    def __init__(
        self, db: MetaDb, store: ObjectStore, *, interval: float, grace: float,
        read_only: Callable[[], bool], sessions_file: Path, first_delay: float = FIRST_PASS_DELAY,
    ) -> None:
        """interval: seconds between passes (0: never). grace: an unnamed object is deleted
        only when a pass at least this many seconds after the one that first found it finds
        it unnamed too. read_only: passes are skipped while it returns True (ro mount,
        failsafe). sessions_file: where the cache dir records the writer sessions it
        registered in the store."""
        self._db = db
        self._store = store
        self._interval = interval
        self._grace = grace
        self._read_only = read_only
        self._first_delay = first_delay
        self._candidates: dict[ObjectKey, float] = {}  # unnamed key -> time.monotonic() first found
        self.stats = SweepStatistics()
        self.session = secrets.token_hex(16)
        self._sessions_file = sessions_file
        self._registered = False
        self._pass_lock = trio.Lock()  # a pass asked for by the admin never runs beside the scheduled one
        self._next_pass = math.inf  # trio clock: when the scheduled loop runs its next pass
        self._waiting: trio.CancelScope | None = None
        self._skipped: str | None = None  # why the last pass did not look at the objects

    # --- the writer registry --------------------------------------------------------------------

    def _own_sessions(self) -> list[str]:
        """Sessions this cache dir registered and did not remove (crashed mounts), and ours."""
        try:
            text = self._sessions_file.read_text()
        except FileNotFoundError:
            return []
        return [line for line in text.split() if _SESSION_RE.fullmatch(line)]

    def _save_own_sessions(self, sessions: list[str]) -> None:
        tmp = self._sessions_file.with_name(self._sessions_file.name + ".tmp")
        tmp.write_text("".join(f"{s}\n" for s in sessions))
        fdatasync_path(tmp)
        os.replace(tmp, self._sessions_file)

    async def register(self) -> None:
        """Register this mount as a writer; remove what this cache dir's crashed mounts left."""
        stale = [old for old in self._own_sessions() if old != self.session]  # ours: an interrupted try
        # Recorded before the object exists: a crash in between leaves nothing unaccounted for.
        self._save_own_sessions([*stale, self.session])
        mark = {"mifs_writer": REGISTRATION_FORMAT, "registered": _utc_now()}
        await self._store.put(ObjectKey(f"{WRITERS_PREFIX}{self.session}"), json.dumps(mark).encode())
        for old in stale:
            await self._store.purge(ObjectKey(f"{WRITERS_PREFIX}{old}"))
        if stale:
            self._save_own_sessions([self.session])
        self._registered = True

    async def unregister(self) -> None:
        """At a clean unmount. If the store cannot be reached, the next mount of this cache dir
        removes the registration (it is in the sessions file)."""
        if not self._registered:
            return
        try:
            # Every version: a versioned bucket keeps no trail of mounts.
            await self._store.purge(ObjectKey(f"{WRITERS_PREFIX}{self.session}"))
        except (StoreUnavailable, StorePermissionDenied) as exc:
            log.info("could not remove this mount's writer registration from the store: %s", exc)
            return
        self._registered = False
        try:
            self._save_own_sessions([])
        except OSError as exc:  # benign: the next mount purges an already purged registration
            log.info("could not update %s: %s", self._sessions_file.name, exc.strerror)

    async def _try_register(self) -> None:
        try:
            await self.register()
        except (StoreUnavailable, StorePermissionDenied) as exc:
            # Not a warning of its own: the outage is reported by whatever else needs the store.
            log.info("cannot register this mount as a writer in the store yet: %s", exc)
        except OSError as exc:
            log.warning("cannot record this mount's writer session in the cache dir, trying again later: %s", exc.strerror)

    async def other_writers(self) -> list[str]:
        """Registered writable mounts other than this one."""
        keys = await self._store.list(WRITERS_PREFIX)
        return sorted(k for k in keys if k != f"{WRITERS_PREFIX}{self.session}")

    async def registrations(self) -> list[Registration]:
        """Every registered writable mount, this one included."""
        found = []
        for key in await self._store.list(WRITERS_PREFIX):
            session = key[len(WRITERS_PREFIX):]
            found.append(Registration(session, await self._registered_at(key), session == self.session))
        return sorted(found, key=lambda r: (r.registered or "", r.session))

    async def _registered_at(self, key: ObjectKey) -> str | None:
        try:
            doc = json.loads(await self._store.get(key))
        except (ObjectNotFound, ValueError, UnicodeDecodeError):
            return None  # gone meanwhile, or not ours to read
        when = doc.get("registered") if isinstance(doc, dict) else None
        return when if isinstance(when, str) else None

    async def remove_registration(self, session: str) -> bool:
        """Delete another mount's registration (every version); False if there was none.
        For a host that will never write this archive again: while it still does, the sweep
        here could delete the chunks only its database names."""
        if not is_session_id(session):
            raise RegistrationRefused(f"{session!r} is not a writer session id (32 hex digits, see `mifs writers ls`)")
        if session == self.session:
            raise RegistrationRefused("that is this mount's own registration; it goes at unmount")
        key = ObjectKey(f"{WRITERS_PREFIX}{session}")
        if not await self._store.exists(key):
            return False
        await self._store.purge(key)
        log.info("removed the writer registration %s from the store, as asked", session)
        return True

    def statistics(self) -> dict[str, object]:
        self.stats.orphan_candidates = len(self._candidates)
        return dict(vars(self.stats))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Registered before the mount counts as started when the store answers at once (it just
        # served the descriptor), so no upload of this mount precedes its registration.
        with trio.move_on_after(REGISTER_AT_START):
            await self._try_register()
        task_status.started()
        while not self._registered:  # even with the sweep off: other mounts' sweeps look for it
            await trio.sleep(REGISTER_RETRY)
            await self._try_register()
        if self._interval <= 0:
            return
        self._schedule(min(self._first_delay, self._interval))
        while True:
            await self._sleep_until_next_pass()
            try:
                await self.sweep_once()
            except (StoreUnavailable, StorePermissionDenied) as exc:
                self.stats.last_orphan_sweep = f"failed: {exc}"
                log.warning("orphan sweep failed, trying again later: %s", exc)
            self._next_pass = math.inf
            self._schedule(self._interval)

    def _schedule(self, delay: float) -> None:
        """Move the scheduled pass to at most `delay` seconds from now (candidates found by a
        pass are confirmed by the first pass after their grace period, not a day later)."""
        if self._interval <= 0:
            return
        if self._candidates:
            delay = min(delay, max(1.0, self._grace))
        self._next_pass = min(self._next_pass, trio.current_time() + delay)
        if self._waiting is not None:
            self._waiting.deadline = self._next_pass

    async def _sleep_until_next_pass(self) -> None:
        while trio.current_time() < self._next_pass:
            with trio.CancelScope(deadline=self._next_pass) as self._waiting:
                await trio.sleep_forever()
            self._waiting = None

    async def sweep_now(self) -> SweepOutcome:
        """One pass at once (the admin asked); the scheduled passes go on as before."""
        async with self._pass_lock:
            purged = await self._sweep_once()
            outcome = SweepOutcome(purged, len(self._candidates), self._skipped)
        self._schedule(self._interval)
        return outcome

    async def sweep_once(self) -> int:
        """One pass over the store; the number of objects deleted."""
        async with self._pass_lock:
            return await self._sweep_once()

    def _skip(self, reason: str) -> int:
        self._skipped = reason
        self.stats.last_orphan_sweep = f"skipped: {reason}"
        return 0

    async def _sweep_once(self) -> int:
        self._skipped = None
        if self._read_only():
            return self._skip("the mount is read-only")
        if not self._registered:
            return self._skip("this mount is not registered as a writer yet")
        others = await self.other_writers()
        if others:
            sessions = ", ".join(k[len(WRITERS_PREFIX):] for k in others)
            self._skip(
                f"other writable mounts are registered ({sessions}); if such a host is gone for good: mifs writers rm SESSION"
            )
            log.warning(
                "orphan sweep skipped: the store registers other writable mounts of this archive (%s): another host "
                "has it mounted, or crashed and never mounted it again. Mount each archive from one host at a time; "
                "once that host is gone for good, remove its registration (mifs writers rm)", ", ".join(others),
            )
            self._candidates.clear()
            return 0
        newest = await newest_store_seq(self._store)
        if newest > self._db.commit_seq:
            self._skip("the store's metadata is newer than the local database")
            log.warning(
                "orphan sweep skipped: the store holds metadata up to commit %d, the local database only %d "
                "(a cache disk restored from an old copy?)", newest, self._db.commit_seq,
            )
            self._candidates.clear()
            return 0
        now = time.monotonic()
        seen: set[ObjectKey] = set()
        purged = 0
        for prefix in FAN_OUT:
            keys = await self._store.list(prefix)
            for start in range(0, len(keys), CHECK_BATCH):
                batch = keys[start:start + CHECK_BATCH]
                named = tables.named_object_keys(self._db, batch)
                for key in batch:
                    if key in named:
                        continue
                    seen.add(key)
                    first = self._candidates.get(key)
                    if first is None:
                        if len(self._candidates) < MAX_CANDIDATES:
                            self._candidates[key] = now
                    elif now - first >= self._grace:
                        # No row named it when its batch was checked, and keys are random and
                        # never reused: no row can name it since (purges of this batch await).
                        await self._store.purge(key)
                        del self._candidates[key]
                        purged += 1
                        self.stats.orphans_purged += 1
            await trio.sleep(0)  # let FUSE requests in between prefixes
        # Forget candidates that are gone from the store or were named meanwhile.
        for key in [k for k in self._candidates if k not in seen]:
            del self._candidates[key]
        self.stats.orphan_sweeps += 1
        self.stats.last_orphan_sweep = _utc_now()
        if purged or self._candidates:
            log.info(
                "orphan sweep: deleted %d unnamed objects from the store; %d more wait for their grace period",
                purged, len(self._candidates),
            )
        return purged
