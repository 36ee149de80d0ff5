"""The session index: summaries, file stamps and each place's current session, folded from an append-only log.

index.jsonl is a cache of the session files, never the truth: open() checks it against the files (by stamp,
reading only files that changed) and repairs it, and a rebuild makes it from the files alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Collection, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiofiles

from bot.errors import StorageError
from bot.history.files import FileStamp, SessionFiles, append_durably, atomic_write, dumps
from bot.sessions import SessionSummary

log = logging.getLogger(__name__)

# Compaction is due when the log holds this many lines beyond a multiple of the live records. At run time the
# slack is large, so a rewrite (O(sessions)) comes only after O(sessions) appends: O(1) per turn, amortised.
_OPEN_SLACK = 32
_RUNTIME_SLACK = 4096


def recency(summary: SessionSummary) -> tuple[datetime, datetime, str]:
    """Sort key, newest last: updated_at, then created_at, then id (parsed, so any ISO 8601 form sorts)."""
    return (
        datetime.fromisoformat(summary.updated_at),
        datetime.fromisoformat(summary.created_at),
        summary.id,
    )


class SessionIndex:
    """The session index folded into memory: summaries, file stamps, and place key -> current session id.

    Changes arrive as plain-dict records (put / bind / drop) so a log on disk and this fold share one format;
    `records()` gives the shortest list of records that rebuilds the same state.
    """

    def __init__(self) -> None:
        self.summaries: dict[str, SessionSummary] = {}
        self.stamps: dict[str, FileStamp] = {}
        self.current: dict[str, str] = {}  # place key -> session id
        # Places whose current session's file turned out broken when the index was checked at start-up: their
        # next turn starts afresh, and should say so. Memory only.
        self.lost_places: set[str] = set()

    @staticmethod
    def put(summary: SessionSummary, stamp: FileStamp) -> dict[str, Any]:
        return {"op": "put", "session": summary.to_json(), "file": list(stamp)}

    @staticmethod
    def bind(place_key: str, session_id: str) -> dict[str, Any]:
        return {"op": "bind", "place": place_key, "id": session_id}

    @staticmethod
    def drop(session_id: str) -> dict[str, Any]:
        return {"op": "drop", "id": session_id}

    def apply(self, record: object) -> None:
        """Fold one record in; junk raises ValueError/TypeError/KeyError and changes nothing."""
        if not isinstance(record, dict):
            raise TypeError("index record must be an object")
        op = record["op"]
        if op == "put":
            summary = SessionSummary.from_json(record["session"])
            stamp = record["file"]
            if not (isinstance(stamp, list) and len(stamp) == 3 and all(type(x) is int for x in stamp)):
                raise ValueError("bad file stamp")
            self.summaries[summary.id] = summary
            self.stamps[summary.id] = (stamp[0], stamp[1], stamp[2])
        elif op == "bind":
            key, sid = record["place"], record["id"]
            bound = self.summaries.get(sid) if isinstance(sid, str) else None
            if bound is None or bound.place.key != key:
                raise ValueError(f"binding of {key!r} to an unknown session {sid!r}")
            self.current[key] = sid
        elif op == "drop":
            self.forget(record["id"])
        else:
            raise ValueError(f"unknown index op {op!r}")

    def forget(self, session_id: str) -> None:
        self.summaries.pop(session_id, None)
        self.stamps.pop(session_id, None)
        for key in [k for k, v in self.current.items() if v == session_id]:
            del self.current[key]

    def live_records(self) -> int:
        return len(self.summaries) + len(self.current)

    def records(self) -> list[dict[str, Any]]:
        out = [self.put(s, self.stamps[sid]) for sid, s in self.summaries.items()]
        out += [self.bind(key, sid) for key, sid in self.current.items()]
        return out

    def select(
        self,
        *,
        guild_id: int | None = None,
        place_keys: Collection[str] | None = None,
        user_id: int | None = None,
        kinds: Collection[str] | None = None,
    ) -> list[SessionSummary]:
        """Summaries newest first; the filters AND together, and `user_id` matches the owner."""
        keys = set(place_keys) if place_keys is not None else None
        kind_set = set(kinds) if kinds is not None else None
        found = [
            s
            for s in self.summaries.values()
            if (guild_id is None or s.place.guild_id == guild_id)
            and (keys is None or s.place.key in keys)
            and (user_id is None or s.owner_id == user_id)
            and (kind_set is None or s.place.kind in kind_set)
        ]
        found.sort(key=recency, reverse=True)
        return found


class IndexLog:
    """index.jsonl and the SessionIndex folded from it. Every change goes through `record` (under one lock)."""

    def __init__(self, path: Path, files: SessionFiles) -> None:
        self.path = path
        self._files = files
        self.index = SessionIndex()
        self._lines = 0
        # Set when an index write failed part-way: the log may end in a torn line, so rewrite it whole next time.
        self._dirty = False
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        """Load the log, repair it from the session files, and compact it when it grew or was damaged."""
        async with self._lock:
            self.index = SessionIndex()
            lines, needs_rewrite = await self._load()
            changed = await self._reconcile()
            if needs_rewrite or changed or lines > 2 * self.index.live_records() + _OPEN_SLACK:
                await self._compact()

    async def rebuild(self) -> int:
        """Throw the index away and make it again by reading every session file; returns the session count."""
        async with self._lock:
            self.index = SessionIndex()
            await self._reconcile()
            try:
                await self._compact()
            except OSError as exc:
                self._dirty = True
                raise StorageError(f"could not write the session index: {exc}") from exc
        return len(self.index.summaries)

    async def record(self, records: Iterable[dict[str, Any]]) -> None:
        """Apply records to memory and log them. The session files are the truth, so an index write error is
        logged and repaired later rather than failing a turn that is already safely on disk."""
        batch = list(records)
        async with self._lock:
            for record in batch:
                self.index.apply(record)
            limit = 4 * self.index.live_records() + _RUNTIME_SLACK
            try:
                if self._dirty or self._lines + len(batch) > limit:
                    await self._compact()
                else:
                    await append_durably(self.path, "".join(dumps(r) + "\n" for r in batch).encode())
                    self._lines += len(batch)
            except OSError as exc:
                self._dirty = True
                log.warning("could not update the session index %s (%s); will rewrite it", self.path, exc)

    async def forget(self, session_id: str) -> None:
        """Drop a session whose file is gone or broken (no-op when the index does not know it)."""
        if session_id in self.index.summaries:
            await self.record([SessionIndex.drop(session_id)])

    # --- callers hold _lock ------------------------------------------------------------------------------------

    async def _load(self) -> tuple[int, bool]:
        """Fold index.jsonl into memory; returns (line count, whether the file must be rewritten)."""
        try:
            async with aiofiles.open(self.path, "rb") as f:
                data = await f.read()
        except FileNotFoundError:
            return 0, True
        # A crash mid-append leaves a torn last line, or a whole record with no newline after it; both make the
        # next append unsafe until the log is rewritten.
        bad = 0 if data.endswith(b"\n") or not data else 1
        count = 0
        for raw in data.split(b"\n"):
            if not raw.strip():
                continue
            count += 1
            try:
                self.index.apply(json.loads(raw))
            except (ValueError, TypeError, KeyError, RecursionError):
                bad += 1
        if bad:
            log.warning("session index %s had %d unreadable lines; rewriting it", self.path, bad)
        return count, bad > 0

    async def _reconcile(self) -> bool:
        """Make the in-memory index agree with the session files, reading only files that changed."""
        index = self.index
        on_disk = await asyncio.to_thread(self._files.scan)
        changed = False
        for session_id in [sid for sid in index.summaries if sid not in on_disk]:
            index.forget(session_id)
            changed = True
        discovered: list[str] = []
        for session_id, stamp in on_disk.items():
            if index.stamps.get(session_id) == stamp:
                continue
            changed = True
            known = session_id in index.summaries
            loaded = await self._files.read(session_id)
            if loaded is None:
                index.lost_places.update(key for key, sid in index.current.items() if sid == session_id)
                index.forget(session_id)
                continue
            session, stamp = loaded
            index.summaries[session_id] = session.summary()
            index.stamps[session_id] = stamp
            if not known:
                discovered.append(session_id)
        # A session the index never heard of was made just before a crash (or the index is new): the newest
        # session of each place becomes current, which is also the rule for a rebuild from nothing.
        for session_id in discovered:
            summary = index.summaries[session_id]
            bound = index.current.get(summary.place.key)
            if bound is None or recency(summary) > recency(index.summaries[bound]):
                index.current[summary.place.key] = session_id
        for key in [k for k, sid in index.current.items() if index.summaries[sid].place.key != k]:
            del index.current[key]
            changed = True
        if changed:
            log.info("session index repaired from the session files (%d discovered)", len(discovered))
        return changed

    async def _compact(self) -> None:
        records = self.index.records()
        await atomic_write(self.path, "".join(dumps(r) + "\n" for r in records).encode("utf-8"))
        self._lines = len(records)
        self._dirty = False
