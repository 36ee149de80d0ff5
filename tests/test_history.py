from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.history import HistoryStore
from bot.sessions import Place, Session, StoredMessage, new_session_id, utc_now_iso

REPO = Path(__file__).resolve().parents[1]
CHANNEL = Place("channel", guild_id=1, channel_id=10)
THREAD = Place("thread", guild_id=1, channel_id=10, thread_id=11)
OTHER_GUILD = Place("channel", guild_id=2, channel_id=20)
DM = Place("dm", user_id=5)
CONSOLE = Place("console", user_id=0)


def user(text: str, status: str = "ok") -> StoredMessage:
    return StoredMessage("user", text, 5, utc_now_iso(), status=status)  # type: ignore[arg-type]


def bot(text: str) -> StoredMessage:
    return StoredMessage("assistant", text, None, utc_now_iso(), discord_message_id=99)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def store(data_dir: Path) -> AsyncIterator[HistoryStore]:
    async with HistoryStore(data_dir) as s:
        yield s


async def new(store: HistoryStore, place: Place, owner: int | None = 5, **kw: object) -> Session:
    return await store.create(place, owner_id=owner, title=f"about {place.key}", system_prompt=None, **kw)  # type: ignore[arg-type]


def session_file(data_dir: Path, session_id: str) -> Path:
    return data_dir / "sessions" / f"{session_id}.json"


def index_lines(data_dir: Path) -> list[bytes]:
    return (data_dir / "index.jsonl").read_bytes().splitlines(keepends=True)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def quarantined(data_dir: Path) -> list[Path]:
    folder = data_dir / "quarantine"
    return sorted(folder.iterdir()) if folder.exists() else []


async def snapshot(store: HistoryStore, places: list[Place]) -> tuple[object, ...]:
    current = {}
    for place in places:
        session = await store.current(place)
        current[place.key] = session.id if session else None
    return (store.list_sessions(), current)


async def test_create_append_get_and_persist_across_reopen(data_dir: Path) -> None:
    async with HistoryStore(data_dir) as store:
        created = await store.create(CHANNEL, owner_id=5, title="first", system_prompt="Be kind.")
        assert await store.current(CHANNEL) == created
        after = await store.append(created.id, [user("hi"), bot("hello")], title="greetings")
        assert after.messages[-2:] == (after.messages[0], after.messages[1])
        assert after.title == "greetings" and after.turns == 1
        assert after.updated_at >= created.updated_at
        listing = store.list_sessions()
    async with HistoryStore(data_dir) as again:
        assert await again.get(created.id) == after
        assert await again.current(CHANNEL) == after
        assert again.list_sessions() == listing
        assert listing[0].turns == 1 and listing[0].title == "greetings"


async def test_make_current_false_keeps_the_current_session(store: HistoryStore) -> None:
    first = await new(store, DM)
    side = await new(store, DM, make_current=False)
    assert (await store.current(DM)) == first
    await store.set_current(DM, side.id)
    assert (await store.current(DM)) == side
    with pytest.raises(LookupError):
        await store.set_current(CHANNEL, first.id)  # a session of another place


async def test_place_without_session_has_no_current(store: HistoryStore) -> None:
    assert await store.current(THREAD) is None
    assert await store.get(new_session_id()) is None


async def test_many_concurrent_appends_land_in_order(store: HistoryStore) -> None:
    session = await new(store, CHANNEL)
    await asyncio.gather(*(store.append(session.id, [user(f"m{i}")]) for i in range(40)))
    loaded = await store.get(session.id)
    assert loaded is not None
    assert [m.content for m in loaded.messages] == [f"m{i}" for i in range(40)]
    assert store.list_sessions()[0].turns == 40


async def test_holds_serialize_whole_turns(store: HistoryStore) -> None:
    session = await new(store, CHANNEL)
    order: list[str] = []

    async def turn(name: str) -> None:
        async with store.hold(session.id) as held:
            order.append(f"{name} saw {held.session.turns}")
            await asyncio.sleep(0)
            await held.commit([user(name), bot(name)])

    await asyncio.gather(turn("a"), turn("b"), turn("c"))
    assert order == ["a saw 0", "b saw 1", "c saw 2"]


async def test_cancelled_append_still_lands(data_dir: Path) -> None:
    async with HistoryStore(data_dir) as store:
        session = await new(store, CHANNEL)
        task = asyncio.create_task(store.append(session.id, [user("kept")]))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    async with HistoryStore(data_dir) as again:
        loaded = await again.get(session.id)
        assert loaded is not None and [m.content for m in loaded.messages] == ["kept"]
        assert again.list_sessions()[0].turns == 1


class FileReads:
    """Paths opened for reading, seen through the interpreter's audit hook ("open" events), not a mock of ours.

    An audit hook cannot be removed, so one is installed for the run and records only while a test listens."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.listening = False

    def __call__(self, event: str, args: tuple[object, ...]) -> None:
        # Called for every audited event in the process, so it must be cheap and never raise.
        if not self.listening or event != "open" or len(args) < 2:
            return
        path, mode = args[0], args[1]
        if isinstance(mode, str) and "r" in mode and isinstance(path, str | os.PathLike):
            self.paths.append(Path(os.fsdecode(path)))


@pytest.fixture(scope="session")
def audit_reads() -> FileReads:
    reads = FileReads()
    sys.addaudithook(reads)
    return reads


@pytest.fixture
def file_reads(audit_reads: FileReads) -> Iterator[list[Path]]:
    audit_reads.paths = []
    audit_reads.listening = True
    try:
        yield audit_reads.paths
    finally:
        audit_reads.listening = False


async def test_hold_reads_the_file_once_and_commits_from_memory(data_dir: Path, file_reads: list[Path]) -> None:
    async with HistoryStore(data_dir) as store:
        session = await new(store, CHANNEL)
        path = session_file(data_dir, session.id)
        async with store.hold(session.id) as held:
            assert held.session == session and not held.created and not held.replaced_broken
            first = await held.commit([user("q"), bot("a")], title="greetings")
            second = await held.commit([user("again")])
            assert held.session == second
        # One read of a session file for the hold, none for either commit.
        assert [p for p in file_reads if p.parent == path.parent] == [path]
        assert [m.content for m in second.messages] == ["q", "a", "again"] and second.title == "greetings"
        assert first.messages == second.messages[:2]
        assert await store.get(session.id) == second
        assert store.list_sessions()[0].turns == 2
        with pytest.raises(RuntimeError):
            await held.commit([user("after the hold")])  # no lock held any more: refused
    file_reads.clear()
    async with HistoryStore(data_dir) as again:
        # The index recorded the committed file's stamp, so open() has no reason to read the session file.
        assert path not in file_reads
        assert await again.get(session.id) == second


async def test_every_writer_waits_for_the_hold(store: HistoryStore, data_dir: Path) -> None:
    session = await new(store, CHANNEL)
    path = session_file(data_dir, session.id)
    async with store.hold(session.id) as held:
        before = path.stat()

        async def other_turn() -> None:
            async with store.hold(session.id) as other:
                await other.commit([user("second hold")])

        waiting = [asyncio.create_task(store.append(session.id, [user("append")])), asyncio.create_task(other_turn())]
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert not any(task.done() for task in waiting)
        after = path.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # nobody wrote meanwhile
        await held.commit([user("held")])
    await asyncio.gather(*waiting)
    loaded = await store.get(session.id)
    assert loaded is not None
    contents = [m.content for m in loaded.messages]
    assert contents[0] == "held" and sorted(contents[1:]) == ["append", "second hold"]  # nothing lost


async def test_two_first_messages_at_once_share_one_session(store: HistoryStore) -> None:
    seen: list[tuple[str, bool]] = []

    async def first_message(text: str) -> None:
        async with store.hold_current(THREAD, owner_id=5, system_prompt="Be brief.") as held:
            seen.append((held.session.id, held.created))
            assert not held.replaced_broken
            await held.commit([user(text)])

    await asyncio.gather(first_message("a"), first_message("b"))
    assert len({sid for sid, _ in seen}) == 1
    assert [created for _, created in seen] == [True, False]
    current = await store.current(THREAD)
    assert current is not None and current.system_prompt == "Be brief." and current.title == "New chat"
    assert sorted(m.content for m in current.messages) == ["a", "b"]
    assert store.session_count == 1 and len(store.list_sessions()) == 1


@pytest.mark.parametrize("bad_id", ["../x", "", "a" * 17])
async def test_hold_of_an_invalid_or_unknown_id_raises(store: HistoryStore, data_dir: Path, bad_id: str) -> None:
    for session_id in (bad_id, new_session_id()):
        with pytest.raises(LookupError):
            async with store.hold(session_id):
                pytest.fail("held a session that does not exist")
    assert names(data_dir) == ["index.jsonl", "sessions"]


async def test_hold_of_a_broken_file_quarantines_it_and_raises(store: HistoryStore, data_dir: Path) -> None:
    broken = await new(store, CHANNEL)
    kept = await new(store, DM)
    session_file(data_dir, broken.id).write_bytes(b"{not json")
    with pytest.raises(LookupError):
        async with store.hold(broken.id):
            pytest.fail("held a broken session")
    assert len(quarantined(data_dir)) == 1 and not session_file(data_dir, broken.id).exists()
    assert [s.id for s in store.list_sessions()] == [kept.id] and store.session_count == 1
    assert await store.current(CHANNEL) is None
    async with store.hold(kept.id) as held:  # the session's lock was let go after the failed hold
        assert held.session == kept


async def test_hold_current_replaces_a_broken_current_session(store: HistoryStore, data_dir: Path) -> None:
    async with store.hold_current(DM, owner_id=5) as held:
        assert held.created and not held.replaced_broken
        old = await held.commit([user("lost")])
    async with store.hold_current(DM, owner_id=5) as held:
        assert held.session == old and not held.created and not held.replaced_broken
    session_file(data_dir, old.id).write_bytes(b"\xff\xfe")
    async with store.hold_current(DM, owner_id=5, title="Fresh") as held:
        assert held.created and held.replaced_broken
        assert held.session.id != old.id and held.session.messages == () and held.session.title == "Fresh"
        fresh = await held.commit([user("new start")])
    assert await store.current(DM) == fresh
    assert [s.id for s in store.list_sessions()] == [fresh.id]
    assert len(quarantined(data_dir)) == 1


async def test_cancelled_commit_still_lands_before_the_next_hold(data_dir: Path) -> None:
    async with HistoryStore(data_dir) as store:
        session = await new(store, CHANNEL)
        committing = asyncio.Event()

        async def turn() -> None:
            async with store.hold(session.id) as held:
                committing.set()
                await held.commit([user("kept")])

        task = asyncio.create_task(turn())
        await committing.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The cancelled holder's write is still running; the lock passes on only once it has landed.
        async with store.hold(session.id) as held:
            assert [m.content for m in held.session.messages] == ["kept"]
    async with HistoryStore(data_dir) as again:
        loaded = await again.get(session.id)
        assert loaded is not None and [m.content for m in loaded.messages] == ["kept"]
        assert again.list_sessions()[0].turns == 1


async def test_session_count_follows_the_index(store: HistoryStore, data_dir: Path) -> None:
    assert store.session_count == 0
    sessions = [await new(store, place) for place in (CHANNEL, THREAD, DM)]
    await new(store, DM, make_current=False)
    assert store.session_count == 4 == len(store.list_sessions())
    session_file(data_dir, sessions[0].id).unlink()
    assert await store.get(sessions[0].id) is None
    assert store.session_count == 3
    assert await store.rebuild_index() == 3 == store.session_count


@pytest.mark.parametrize(
    "garbage",
    [b"{not json", b"", b'{"version": 1}', b"\xff\xfe\x00", b"[" * 100000],
    ids=["broken-json", "empty", "not-a-session", "not-utf8", "deep-nesting"],
)
async def test_broken_file_is_quarantined_and_others_survive(
    store: HistoryStore, data_dir: Path, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    broken = await new(store, CHANNEL)
    kept = await store.append((await new(store, DM)).id, [user("safe")])
    session_file(data_dir, broken.id).write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="bot.history"):
        assert await store.current(CHANNEL) is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    moved = quarantined(data_dir)
    assert len(moved) == 1 and moved[0].name.startswith(f"{broken.id}.json.")
    assert moved[0].read_bytes() == garbage
    assert not session_file(data_dir, broken.id).exists()
    assert await store.get(kept.id) == kept
    assert [s.id for s in store.list_sessions()] == [kept.id]
    fresh = await new(store, CHANNEL)
    assert await store.current(CHANNEL) == fresh


async def test_truncated_file_is_quarantined_on_open(data_dir: Path) -> None:
    async with HistoryStore(data_dir) as store:
        torn = await store.append((await new(store, CHANNEL)).id, [user("x" * 1000)])
        kept = await new(store, THREAD)
    path = session_file(data_dir, torn.id)
    path.write_bytes(path.read_bytes()[:500])
    async with HistoryStore(data_dir) as again:
        assert [s.id for s in again.list_sessions()] == [kept.id]
        assert await again.current(CHANNEL) is None
        assert await again.current(THREAD) == kept
    assert len(quarantined(data_dir)) == 1


async def test_file_holding_another_sessions_id_is_quarantined(store: HistoryStore, data_dir: Path) -> None:
    a = await new(store, CHANNEL)
    b = await new(store, DM)
    session_file(data_dir, a.id).write_bytes(session_file(data_dir, b.id).read_bytes())
    assert await store.get(a.id) is None
    assert await store.get(b.id) == b
    assert len(quarantined(data_dir)) == 1


async def test_leftover_temp_file_is_ignored_and_removed(data_dir: Path) -> None:
    async with HistoryStore(data_dir) as store:
        session = await store.append((await new(store, CHANNEL)).id, [user("old")])
    final = session_file(data_dir, session.id)
    half = final.read_bytes()[:40]
    tmp = final.with_name(f".{final.name}.0123456789ab.tmp")
    tmp.write_bytes(half)
    index_tmp = data_dir / ".index.jsonl.0123456789ab.tmp"
    index_tmp.write_bytes(b'{"op":"pu')
    async with HistoryStore(data_dir) as again:
        assert await again.get(session.id) == session
        assert not tmp.exists() and not index_tmp.exists()
    assert quarantined(data_dir) == []


async def _populate(store: HistoryStore) -> list[Place]:
    places = [CHANNEL, THREAD, OTHER_GUILD, DM, CONSOLE]
    for i, place in enumerate(places):
        first = await new(store, place, owner=i)
        await store.append(first.id, [user("a"), bot("b")])
        second = await new(store, place, owner=i)  # /newchat: the newer one becomes current
        await store.append(second.id, [user("c")])
    return places


async def test_index_rebuilt_from_files_equals_original(data_dir: Path) -> None:
    async with HistoryStore(data_dir) as store:
        places = await _populate(store)
        before = await snapshot(store, places)
        assert await store.rebuild_index() == 10
        assert await snapshot(store, places) == before
    (data_dir / "index.jsonl").unlink()
    async with HistoryStore(data_dir) as again:
        assert await snapshot(again, places) == before
        for place in places:
            current = await again.current(place)
            assert current is not None and current.messages[0].content == "c"
    (data_dir / "index.jsonl").write_bytes(b"\x00garbage\nmore garbage\n")
    async with HistoryStore(data_dir) as third:
        assert await snapshot(third, places) == before


async def test_torn_last_index_line_is_tolerated(data_dir: Path) -> None:
    async with HistoryStore(data_dir) as store:
        places = await _populate(store)
        before = await snapshot(store, places)
    with (data_dir / "index.jsonl").open("ab") as f:
        f.write(b'{"op":"put","session":{"id":"abc')
    async with HistoryStore(data_dir) as again:
        assert await snapshot(again, places) == before
        lines = index_lines(data_dir)
        assert all(json.loads(line) for line in lines)  # rewritten whole: no torn line is left to append to
        current = await again.current(DM)
        assert current is not None
        await again.append(current.id, [user("after the crash")])
        after = await snapshot(again, places)
    async with HistoryStore(data_dir) as third:
        assert await snapshot(third, places) == after


async def test_lost_index_lines_are_repaired_from_the_files(data_dir: Path) -> None:
    """A crash between the session write and its index line: open() notices the changed file."""
    async with HistoryStore(data_dir) as store:
        old = await new(store, CHANNEL)
        lines_before_append = index_lines(data_dir)
        await store.append(old.id, [user("q"), bot("a")])
        lines_before_create = index_lines(data_dir)
        newer = await new(store, CHANNEL)
        expected = await snapshot(store, [CHANNEL])
    (data_dir / "index.jsonl").write_bytes(b"".join(lines_before_append))
    async with HistoryStore(data_dir) as again:
        assert await snapshot(again, [CHANNEL]) == expected
        assert await again.current(CHANNEL) == newer
    assert len(lines_before_create) == len(lines_before_append) + 1


async def test_list_sessions_filters_and_order(store: HistoryStore) -> None:
    channel = await new(store, CHANNEL, owner=1)
    thread = await new(store, THREAD, owner=2)
    other = await new(store, OTHER_GUILD, owner=1)
    dm = await new(store, DM, owner=5)
    console = await new(store, CONSOLE, owner=None)
    await store.append(channel.id, [user("bump")])  # the oldest becomes the newest

    def ids(**kw: object) -> list[str]:
        return [s.id for s in store.list_sessions(**kw)]  # type: ignore[arg-type]

    assert ids() == [channel.id, console.id, dm.id, other.id, thread.id]
    assert ids(guild_id=1) == [channel.id, thread.id]
    assert ids(user_id=1) == [channel.id, other.id]
    assert ids(kinds={"dm", "console"}) == [console.id, dm.id]
    assert ids(place_keys=[THREAD.key, DM.key]) == [dm.id, thread.id]
    assert ids(guild_id=1, user_id=2) == [thread.id]
    assert ids(guild_id=1, kinds=["dm"]) == []
    assert ids(place_keys=[]) == []


async def test_listing_reads_only_the_index(store: HistoryStore, data_dir: Path, tmp_path: Path) -> None:
    for place in (CHANNEL, THREAD, DM):
        await new(store, place)
    listing = store.list_sessions()
    aside = tmp_path / "aside"
    (data_dir / "sessions").rename(aside)
    assert store.list_sessions() == listing
    aside.rename(data_dir / "sessions")


@pytest.mark.parametrize(
    "bad_id", ["../x", "..", "../index", "/etc/passwd", "", "AAAAAAAAAAAAAAA.", "a" * 16 + "/..", "a" * 17]
)
async def test_invalid_ids_never_touch_disk(store: HistoryStore, data_dir: Path, bad_id: str) -> None:
    bait = data_dir / "x.json"  # where "sessions/../x.json" would point
    bait.write_bytes(b"junk that would be quarantined if it were read")
    assert await store.get(bad_id) is None
    with pytest.raises(ValueError):
        await store.append(bad_id, [user("hi")])
    with pytest.raises(LookupError):
        await store.set_current(CHANNEL, bad_id)
    assert bait.exists()
    assert quarantined(data_dir) == []
    assert names(data_dir) == ["index.jsonl", "sessions", "x.json"]


async def test_append_cost_does_not_grow_with_the_number_of_sessions(store: HistoryStore, data_dir: Path) -> None:
    sessions = [await new(store, Place("channel", guild_id=1, channel_id=100 + i)) for i in range(25)]
    target = sessions[12]
    stats = {s.id: session_file(data_dir, s.id).stat() for s in sessions}
    lines = index_lines(data_dir)
    await store.append(target.id, [user("one more")])
    after = index_lines(data_dir)
    assert after[: len(lines)] == lines and len(after) == len(lines) + 1  # one appended line, nothing rewritten
    assert len(after[-1]) < 1000
    changed = [
        s.id
        for s in sessions
        if session_file(data_dir, s.id).stat().st_ino != stats[s.id].st_ino
        or session_file(data_dir, s.id).stat().st_mtime_ns != stats[s.id].st_mtime_ns
    ]
    assert changed == [target.id]
    assert len(list((data_dir / "sessions").iterdir())) == 25


async def test_index_is_compacted_on_open_when_it_grew(data_dir: Path) -> None:
    async with HistoryStore(data_dir) as store:
        session = await new(store, CHANNEL)
        for i in range(60):
            await store.append(session.id, [user(str(i))])
        listing = store.list_sessions()
        assert len(index_lines(data_dir)) == 62
    async with HistoryStore(data_dir) as again:
        assert len(index_lines(data_dir)) == 2  # one summary, one binding
        assert again.list_sessions() == listing


DISK_ERROR_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, resource, signal, sys
    from pathlib import Path
    from bot.errors import StorageError
    from bot.history import HistoryStore
    from bot.sessions import Place, StoredMessage, utc_now_iso

    async def main():
        data = Path(sys.argv[1])
        msg = lambda text: StoredMessage("user", text, 1, utc_now_iso())
        async with HistoryStore(data) as store:
            s = await store.create(Place("dm", user_id=1), owner_id=1, title="t", system_prompt=None)
            s = await store.append(s.id, [msg("small")])
            path = data / "sessions" / f"{s.id}.json"
            before = path.read_bytes()
            # Files may not grow past 8 KiB: writing the bigger session fails with EFBIG, as a full disk would.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
            try:
                await store.append(s.id, [msg("x" * 50000)])
                result = {"raised": None}
            except StorageError as exc:
                result = {"raised": "StorageError", "cause": type(exc.__cause__).__name__}
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            result["intact"] = path.read_bytes() == before
            result["files"] = sorted(os.listdir(data / "sessions"))
            result["id"] = s.id
            again = await store.append(s.id, [msg("works again")])
            result["turns"] = again.turns
        print(json.dumps(result))

    asyncio.run(main())
    """
)


async def _python(script: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


async def test_disk_error_raises_storage_error_and_keeps_the_old_file(data_dir: Path) -> None:
    proc = await _python(DISK_ERROR_SCRIPT, str(data_dir))
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    result = json.loads(out)
    assert result["raised"] == "StorageError"
    assert result["cause"] == "OSError"
    assert result["intact"] is True
    assert result["files"] == [f"{result['id']}.json"]  # the failed temp file was removed
    assert result["turns"] == 2


WRITER_SCRIPT = textwrap.dedent(
    """
    import asyncio, resource, signal, sys
    from pathlib import Path
    from bot.history import HistoryStore
    from bot.sessions import Place, StoredMessage, utc_now_iso

    async def main():
        if len(sys.argv) > 2:
            # Files may not grow past this size: the write that crosses it gets SIGXFSZ, which kills the process
            # in the middle of that write, deterministically (Python ignores SIGXFSZ unless told otherwise).
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        async with HistoryStore(Path(sys.argv[1])) as store:
            ids = []
            for c in range(3):
                place = Place("channel", guild_id=1, channel_id=c)
                s = await store.create(place, owner_id=1, title="t", system_prompt=None)
                ids.append(s.id)
            while True:
                for sid in ids:
                    s = await store.append(sid, [StoredMessage("user", "x" * 40000, 1, utc_now_iso())])
                    print(sid, s.turns, flush=True)

    asyncio.run(main())
    """
)


async def test_sigkill_mid_write_leaves_every_file_loadable(data_dir: Path) -> None:
    proc = await _python(WRITER_SCRIPT, str(data_dir))
    assert proc.stdout is not None
    acked: dict[str, int] = {}
    while sum(acked.values()) < 45:
        line = await proc.stdout.readline()
        assert line, "the writer died on its own"
        sid, turns = line.decode().split()
        acked[sid] = int(turns)
    proc.kill()  # SIGKILL: no cleanup runs, the writer is somewhere in its loop
    await proc.wait()
    async with HistoryStore(data_dir) as store:
        assert sorted(s.id for s in store.list_sessions()) == sorted(acked)
        summaries = {s.id: s for s in store.list_sessions()}
        for sid, turns in acked.items():
            session = await store.get(sid)
            assert session is not None
            assert session.turns >= turns  # every acknowledged append survived
            assert summaries[sid].turns == session.turns
    assert quarantined(data_dir) == []
    assert not [p for p in (data_dir / "sessions").iterdir() if p.name.endswith(".tmp")]


async def test_crash_in_the_middle_of_a_write_leaves_the_old_file(data_dir: Path) -> None:
    limit = 300_000
    proc = await _python(WRITER_SCRIPT, str(data_dir), str(limit))
    out, _ = await proc.communicate()
    assert proc.returncode == -signal.SIGXFSZ
    acked: dict[str, int] = {}
    for line in out.decode().splitlines():
        sid, turns = line.split()
        acked[sid] = int(turns)
    assert len(acked) == 3
    # The process died inside a write: a temp file cut off at the size limit is left behind.
    leftovers = [p for p in (data_dir / "sessions").iterdir() if p.name.endswith(".tmp")]
    assert [p.stat().st_size for p in leftovers] == [limit]
    async with HistoryStore(data_dir) as store:
        summaries = {s.id: s for s in store.list_sessions()}
        for sid, turns in acked.items():
            session = await store.get(sid)
            assert session is not None and session.turns == turns
            assert summaries[sid].turns == turns
    assert quarantined(data_dir) == []
    assert not leftovers[0].exists()
