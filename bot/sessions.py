"""Session records: where a conversation lives, its messages, and their JSON form. Data and rules only, no I/O."""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from bot import json_fields as field

log = logging.getLogger(__name__)

PlaceKind = Literal["channel", "thread", "dm", "console"]
# A user message's outcome: "pending" while its answer is being written (so a restart after a crash can tell
# the user it was cut off: then "interrupted"); "stopped" when the user pressed Stop on a partial answer.
MessageStatus = Literal["ok", "failed", "cancelled", "pending", "interrupted", "stopped"]
Role = Literal["user", "assistant"]

PLACE_KINDS: frozenset[str] = frozenset(get_args(PlaceKind))
MESSAGE_STATUSES: frozenset[str] = frozenset(get_args(MessageStatus))
ROLES: frozenset[str] = frozenset(get_args(Role))

SESSION_FORMAT_VERSION = 1
# 16 characters of base64url = 96 random bits; the pattern admits no '.', '/' or '\\', so an id is a safe file name.
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{16}")


def new_session_id() -> str:
    """A fresh random session id: 96 bits from `secrets`, 16 characters of [A-Za-z0-9_-]."""
    return secrets.token_urlsafe(12)


def is_valid_session_id(s: object) -> bool:
    """True only for strings shaped exactly like `new_session_id()` output."""
    return isinstance(s, str) and _SESSION_ID_RE.fullmatch(s) is not None


def utc_now_iso() -> str:
    """Now, UTC, fixed-width ISO 8601 (so these strings also sort by time)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Place:
    """Where a session lives. Which ids are set depends on the kind; the constructor enforces it."""

    kind: PlaceKind
    guild_id: int | None = None
    channel_id: int | None = None  # for a thread: the thread's parent channel
    thread_id: int | None = None
    user_id: int | None = None  # the DM partner, or the console user

    def __post_init__(self) -> None:
        field.choice(self.kind, "place.kind", PLACE_KINDS)
        for name in ("guild_id", "channel_id", "thread_id", "user_id"):
            field.optional_id(getattr(self, name), f"place.{name}")
        required = {
            "channel": ("guild_id", "channel_id"),
            "thread": ("guild_id", "channel_id", "thread_id"),
            "dm": ("user_id",),
            "console": ("user_id",),
        }[self.kind]
        for name in ("guild_id", "channel_id", "thread_id", "user_id"):
            is_set = getattr(self, name) is not None
            if is_set != (name in required):
                state = "needs" if name in required else "must not have"
                raise ValueError(f"a {self.kind} place {state} {name}")

    @property
    def key(self) -> str:
        """Stable identity of the place: "channel:G:C", "thread:G:T", "dm:U" or "console:U"."""
        if self.kind == "channel":
            return f"channel:{self.guild_id}:{self.channel_id}"
        if self.kind == "thread":
            return f"thread:{self.guild_id}:{self.thread_id}"
        return f"{self.kind}:{self.user_id}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: object) -> Place:
        m = field.mapping(d, "place")
        return cls(
            kind=field.choice(m["kind"], "place.kind", PLACE_KINDS),  # type: ignore[arg-type]
            guild_id=field.optional_id(m.get("guild_id"), "place.guild_id"),
            channel_id=field.optional_id(m.get("channel_id"), "place.channel_id"),
            thread_id=field.optional_id(m.get("thread_id"), "place.thread_id"),
            user_id=field.optional_id(m.get("user_id"), "place.user_id"),
        )


@dataclass(frozen=True)
class StoredMessage:
    """One message of a session. A user turn that got no answer is kept with status "failed"/"cancelled"."""

    role: Role
    content: str
    author_id: int | None
    created_at: str
    discord_message_id: int | None = None
    status: MessageStatus = "ok"
    # The speaker's display name when the turn was asked (older files have none).
    author_name: str | None = None
    # A user message: the bot's first Discord message answering it (set once the answer began to show).
    answer_message_id: int | None = None

    def __post_init__(self) -> None:
        field.choice(self.role, "message.role", ROLES)
        field.string(self.content, "message.content")
        field.optional_id(self.author_id, "message.author_id")
        field.optional_string(self.author_name, "message.author_name")
        field.timestamp(self.created_at, "message.created_at")
        field.optional_id(self.discord_message_id, "message.discord_message_id")
        field.optional_id(self.answer_message_id, "message.answer_message_id")
        field.choice(self.status, "message.status", MESSAGE_STATUSES)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: object) -> StoredMessage:
        m = field.mapping(d, "message")
        return cls(
            role=m["role"],
            content=m["content"],
            author_id=m.get("author_id"),
            created_at=m["created_at"],
            discord_message_id=m.get("discord_message_id"),
            status=m.get("status", "ok"),
            author_name=m.get("author_name"),
            answer_message_id=m.get("answer_message_id"),
        )


@dataclass(frozen=True)
class SessionSummary:
    """What the index keeps of a session: enough to list it without reading its file."""

    id: str
    place: Place
    owner_id: int | None
    title: str
    created_at: str
    updated_at: str
    turns: int
    open_turn: bool = False  # Session.open_turn

    def __post_init__(self) -> None:
        if not is_valid_session_id(self.id):
            raise ValueError(f"invalid session id {self.id!r}")
        if not isinstance(self.place, Place):
            raise TypeError("summary.place must be a Place")
        if not isinstance(self.open_turn, bool):
            raise TypeError("summary.open_turn must be true or false")
        field.optional_id(self.owner_id, "summary.owner_id")
        field.string(self.title, "summary.title")
        field.timestamp(self.created_at, "summary.created_at")
        field.timestamp(self.updated_at, "summary.updated_at")
        if isinstance(self.turns, bool) or not isinstance(self.turns, int) or self.turns < 0:
            raise ValueError("summary.turns must be a non-negative integer")

    def to_json(self) -> dict[str, Any]:
        record = {
            "id": self.id,
            "place": self.place.to_json(),
            "owner_id": self.owner_id,
            "title": self.title,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "turns": self.turns,
        }
        # Only when set: index lines of sessions without an open turn stay as they were.
        return {**record, "open_turn": True} if self.open_turn else record

    @classmethod
    def from_json(cls, d: object) -> SessionSummary:
        m = field.mapping(d, "summary")
        return cls(
            id=field.string(m["id"], "summary.id"),
            place=Place.from_json(m["place"]),
            owner_id=m.get("owner_id"),
            title=m["title"],
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            turns=m["turns"],
            open_turn=m.get("open_turn", False),
        )


@dataclass(frozen=True)
class Session:
    """A conversation: its place, owner, optional system prompt, and messages in order."""

    id: str
    place: Place
    owner_id: int | None
    title: str
    created_at: str
    updated_at: str
    system_prompt: str | None
    messages: tuple[StoredMessage, ...] = ()

    def __post_init__(self) -> None:
        if not is_valid_session_id(self.id):
            raise ValueError(f"invalid session id {self.id!r}")
        if not isinstance(self.place, Place):
            raise TypeError("session.place must be a Place")
        field.optional_id(self.owner_id, "session.owner_id")
        field.string(self.title, "session.title")
        field.timestamp(self.created_at, "session.created_at")
        field.timestamp(self.updated_at, "session.updated_at")
        field.optional_string(self.system_prompt, "session.system_prompt")
        if not isinstance(self.messages, tuple) or not all(isinstance(m, StoredMessage) for m in self.messages):
            raise TypeError("session.messages must be a tuple of StoredMessage")

    def answered_turns(self) -> list[tuple[StoredMessage, StoredMessage]]:
        """Finished (user, assistant) message pairs in order: both ok, or an answer the user stopped part-way
        (they saw it, so it is part of the conversation); unanswered turns are left out."""
        pairs: list[tuple[StoredMessage, StoredMessage]] = []
        pending: StoredMessage | None = None
        for message in self.messages:
            if message.role == "user":
                pending = message if message.status == "ok" else None
            else:
                if pending is not None and message.status in ("ok", "stopped"):
                    pairs.append((pending, message))
                pending = None
        return pairs

    def exchanges(self) -> list[tuple[str, str]]:
        """The texts of `answered_turns()`."""
        return [(user.content, answer.content) for user, answer in self.answered_turns()]

    @property
    def turns(self) -> int:
        """The number of user messages, answered or not."""
        return sum(1 for m in self.messages if m.role == "user")

    def with_messages(
        self, messages: tuple[StoredMessage, ...], *, updated_at: str, title: str | None = None, replacing: int = 0
    ) -> Session:
        """The session with `messages` added, after dropping its last `replacing` ones (a pending turn's mark)."""
        if not 0 <= replacing <= len(self.messages):
            raise ValueError(f"cannot replace {replacing} of {len(self.messages)} messages")
        return replace(
            self,
            messages=self.messages[: len(self.messages) - replacing] + messages,
            updated_at=updated_at,
            title=self.title if title is None else title,
        )

    def summary(self) -> SessionSummary:
        return SessionSummary(
            id=self.id,
            place=self.place,
            owner_id=self.owner_id,
            title=self.title,
            created_at=self.created_at,
            updated_at=self.updated_at,
            turns=self.turns,
            open_turn=self.open_turn,
        )

    @property
    def open_turn(self) -> bool:
        """Whether an answer was being written when the file was last saved (true after a crash mid-answer)."""
        return any(m.status == "pending" for m in self.messages)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SESSION_FORMAT_VERSION,
            "id": self.id,
            "place": self.place.to_json(),
            "owner_id": self.owner_id,
            "title": self.title,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "system_prompt": self.system_prompt,
            "messages": [m.to_json() for m in self.messages],
        }

    @classmethod
    def from_json(cls, d: object) -> Session:
        m = field.mapping(d, "session")
        version = m["version"]
        if version != SESSION_FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(f"unsupported session format version {version!r}")
        raw_messages = m["messages"]
        if not isinstance(raw_messages, list):
            raise TypeError("session.messages must be a list")
        return cls(
            id=field.string(m["id"], "session.id"),
            place=Place.from_json(m["place"]),
            owner_id=m.get("owner_id"),
            title=m["title"],
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            system_prompt=m.get("system_prompt"),
            messages=tuple(StoredMessage.from_json(x) for x in raw_messages),
        )
