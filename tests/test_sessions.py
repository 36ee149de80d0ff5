from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from bot.history.index import SessionIndex
from bot.sessions import (
    Place,
    Session,
    SessionSummary,
    StoredMessage,
    is_valid_session_id,
    new_session_id,
    utc_now_iso,
)

T0 = "2024-05-01T12:00:00.000000+00:00"
T1 = "2024-05-01T12:05:00.000000+00:00"


def msg(role: str, content: str, status: str = "ok") -> StoredMessage:
    return StoredMessage(role, content, 7 if role == "user" else None, T0, status=status)  # type: ignore[arg-type]


def make_session(*messages: StoredMessage) -> Session:
    return Session(
        id=new_session_id(),
        place=Place("thread", guild_id=1, channel_id=2, thread_id=3),
        owner_id=7,
        title="chat",
        created_at=T0,
        updated_at=T1,
        system_prompt="Be brief.",
        messages=messages,
    )


def test_place_keys() -> None:
    assert Place("channel", guild_id=11, channel_id=22).key == "channel:11:22"
    assert Place("thread", guild_id=11, channel_id=22, thread_id=33).key == "thread:11:33"
    assert Place("thread", guild_id=11, channel_id=22, thread_id=33).channel_id == 22
    assert Place("dm", user_id=5).key == "dm:5"
    assert Place("console", user_id=0).key == "console:0"
    assert Place("console", user_id=1000).key == "console:1000"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "channel", "guild_id": 1},
        {"kind": "channel", "channel_id": 2},
        {"kind": "channel", "guild_id": 1, "channel_id": 2, "thread_id": 3},
        {"kind": "thread", "guild_id": 1, "channel_id": 2},
        {"kind": "dm"},
        {"kind": "dm", "user_id": 5, "guild_id": 1},
        {"kind": "console", "user_id": 0, "channel_id": 4},
        {"kind": "channel", "guild_id": -1, "channel_id": 2},
        {"kind": "voice", "guild_id": 1, "channel_id": 2},
    ],
)
def test_place_rejects_inconsistent_ids(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Place(**kwargs)


def test_place_rejects_bool_id() -> None:
    with pytest.raises(TypeError):
        Place("dm", user_id=True)


@pytest.mark.parametrize(
    "place",
    [
        Place("channel", guild_id=1, channel_id=2),
        Place("thread", guild_id=1, channel_id=2, thread_id=3),
        Place("dm", user_id=4),
        Place("console", user_id=0),
    ],
)
def test_place_json_round_trip(place: Place) -> None:
    assert Place.from_json(json.loads(json.dumps(place.to_json()))) == place


def test_session_json_round_trip() -> None:
    session = make_session(msg("user", "hi"), msg("assistant", "hello"), msg("user", "and?", "failed"))
    data = json.loads(json.dumps(session.to_json()))
    assert data["version"] == 1
    assert Session.from_json(data) == session


def test_stored_message_defaults_to_ok() -> None:
    data = msg("user", "hi").to_json()
    del data["status"]
    assert StoredMessage.from_json(data).status == "ok"


def _junk_variants() -> list[tuple[str, Any, type[Exception]]]:
    good = make_session(msg("user", "hi")).to_json()

    def changed(**kw: Any) -> dict[str, Any]:
        d = json.loads(json.dumps(good))
        d.update(kw)
        return d

    missing_id = json.loads(json.dumps(good))
    del missing_id["id"]
    bad_message = changed(messages=[{"role": "system", "content": "x", "author_id": None, "created_at": T0}])
    return [
        ("not an object", [1, 2], TypeError),
        ("missing id", missing_id, KeyError),
        ("bad version", changed(version=2), ValueError),
        ("bool version", changed(version=True), ValueError),
        ("path in id", changed(id="../../etc/passwd"), ValueError),
        ("messages not a list", changed(messages="hi"), TypeError),
        ("bad role", bad_message, ValueError),
        ("naive time", changed(created_at="2024-05-01T12:00:00"), ValueError),
        ("not a time", changed(updated_at="yesterday"), ValueError),
        ("owner is text", changed(owner_id="7"), TypeError),
        ("title is null", changed(title=None), TypeError),
        ("place is junk", changed(place={"kind": "dm"}), ValueError),
    ]


@pytest.mark.parametrize(("name", "data", "error"), _junk_variants(), ids=lambda v: v if isinstance(v, str) else "")
def test_session_from_json_rejects_junk(name: str, data: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        Session.from_json(data)


def test_exchanges_skip_unanswered_and_failed_turns() -> None:
    session = make_session(
        msg("user", "q1"),
        msg("assistant", "a1"),
        msg("user", "q2", "failed"),
        msg("user", "q3", "cancelled"),
        msg("user", "q4"),  # never answered: the next user message comes first
        msg("user", "q5"),
        msg("assistant", "a5"),
        msg("user", "q6"),
        msg("assistant", "partial", "cancelled"),
        msg("user", "q7"),
    )
    assert session.exchanges() == [("q1", "a1"), ("q5", "a5")]
    assert session.turns == 7


def test_with_messages_and_summary() -> None:
    session = make_session(msg("user", "q1"))
    later = session.with_messages((msg("assistant", "a1"),), updated_at=T1, title="renamed")
    assert later.messages == (msg("user", "q1"), msg("assistant", "a1"))
    assert later.title == "renamed" and session.title == "chat"
    assert later.summary() == SessionSummary(
        id=session.id,
        place=session.place,
        owner_id=7,
        title="renamed",
        created_at=T0,
        updated_at=T1,
        turns=1,
    )
    assert SessionSummary.from_json(json.loads(json.dumps(later.summary().to_json()))) == later.summary()


def test_new_session_ids_are_unique_and_valid() -> None:
    ids = {new_session_id() for _ in range(2000)}
    assert len(ids) == 2000
    for sid in ids:
        assert is_valid_session_id(sid)
        assert len(sid) == 16
        assert set(sid) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


@pytest.mark.parametrize(
    "text",
    ["", "../x", "..", "a" * 15, "a" * 17, "abcdefghijklmno/", "abcdefghijklmn..", "abcdefghijklmno.", 12, None],
)
def test_invalid_session_ids(text: Any) -> None:
    assert not is_valid_session_id(text)


def test_utc_now_iso_is_utc_and_fixed_width() -> None:
    stamp = utc_now_iso()
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 3600
    assert len(stamp) == len(T0)


def test_session_index_fold_and_compaction() -> None:
    index = SessionIndex()
    older = make_session(msg("user", "q"))
    newer = Session(**{**older.__dict__, "id": new_session_id(), "updated_at": "2024-05-02T00:00:00+00:00"})
    log = [
        SessionIndex.put(older.summary(), (1, 10, 100)),
        SessionIndex.bind(older.place.key, older.id),
        SessionIndex.put(newer.summary(), (2, 20, 200)),
        SessionIndex.bind(newer.place.key, newer.id),
        SessionIndex.put(older.summary(), (3, 30, 300)),
    ]
    for record in log:
        index.apply(json.loads(json.dumps(record)))
    assert index.current == {older.place.key: newer.id}
    assert index.stamps[older.id] == (3, 30, 300)
    assert [s.id for s in index.select()] == [newer.id, older.id]  # newest updated_at first
    assert index.live_records() == 3

    refolded = SessionIndex()
    for record in index.records():
        refolded.apply(record)
    assert (refolded.summaries, refolded.stamps, refolded.current) == (index.summaries, index.stamps, index.current)

    index.apply(SessionIndex.drop(newer.id))
    assert index.current == {} and list(index.summaries) == [older.id]


@pytest.mark.parametrize(
    "record",
    [
        "put",
        {"op": "rename"},
        {"op": "bind", "place": "dm:1", "id": "AAAAAAAAAAAAAAAA"},  # unknown session
        {"op": "put", "session": {"id": "x"}, "file": [1, 2, 3]},
        {"op": "drop"},
    ],
)
def test_session_index_rejects_junk_records(record: object) -> None:
    index = SessionIndex()
    with pytest.raises((ValueError, TypeError, KeyError)):
        index.apply(record)
    assert index.live_records() == 0


def test_session_index_rejects_binding_to_another_place() -> None:
    index = SessionIndex()
    session = make_session()
    index.apply(SessionIndex.put(session.summary(), (1, 2, 3)))
    with pytest.raises(ValueError):
        index.apply(SessionIndex.bind("dm:1", session.id))
    bad_stamp = SessionIndex.put(session.summary(), (1, 2, 3)) | {"file": [1, 2, True]}
    with pytest.raises(ValueError):
        index.apply(bad_stamp)
