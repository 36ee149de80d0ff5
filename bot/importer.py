"""`python -m bot import-history chat_history.json`: sessions of the Gradio LLaMA-2 app this bot replaces.

That app kept one JSON object of every session: session id → list of messages, each either a
[user, assistant] pair or a {"role", "content"} dict. Imported sessions become terminal ("console") sessions,
listed and resumable with `python -m bot chat`; the old id is kept in the title, which is how a second import of
the same file knows what it already holds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofiles

from bot.history import HistoryStore
from bot.sessions import Place, StoredMessage, utc_now_iso

log = logging.getLogger(__name__)

IMPORT_USER_ID = 0


class ImportFormatError(ValueError):
    """The file cannot be read or is not a Gradio chat history; the message names it and says where."""


@dataclass(frozen=True)
class ImportReport:
    sessions: int
    messages: int
    skipped: list[str]  # old ids of sessions without messages
    already_imported: list[str] = field(default_factory=list)  # old ids an earlier import brought in


def plural(count: int, noun: str) -> str:
    """ "1 session", "2 sessions" """
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def imported_title(old_id: str) -> str:
    return f"Imported {old_id}"[:100]


def parse_gradio_messages(old_id: str, items: Any) -> list[tuple[str, str]]:
    """Normalise one session's messages to (role, content) pairs, in order."""
    if not isinstance(items, list):
        raise ImportFormatError(f"session {old_id!r}: expected a list of messages")
    messages: list[tuple[str, str]] = []
    for index, item in enumerate(items):
        if isinstance(item, list | tuple) and len(item) == 2:
            user, assistant = item
            if not all(part is None or isinstance(part, str) for part in item):
                odd = next(part for part in item if not (part is None or isinstance(part, str)))
                raise ImportFormatError(
                    f"session {old_id!r}, message {index}: a [user, assistant] pair holds text (or null), "
                    f"not {_json_kind(odd)}"
                )
            if isinstance(user, str) and user.strip():
                messages.append(("user", user))
            if isinstance(assistant, str) and assistant.strip():
                messages.append(("assistant", assistant))
        elif isinstance(item, dict) and isinstance(item.get("content"), str):
            role = item.get("role")
            if role == "system":
                messages.append(("system", item["content"]))
            elif role in ("user", "assistant"):
                messages.append((role, item["content"]))
            else:
                raise ImportFormatError(f"session {old_id!r}, message {index}: unknown role {role!r}")
        else:
            raise ImportFormatError(
                f"session {old_id!r}, message {index}: expected [user, assistant] or {{role, content}}"
            )
    return messages


async def import_gradio_history(path: Path, store: HistoryStore, *, default_system_prompt: str) -> ImportReport:
    """Import every session of the file that is not in the store yet; nothing at all when the file is bad."""
    data = await _read_json(path)
    if not isinstance(data, dict):
        raise ImportFormatError(f"{path}: expected a JSON object of session id → messages, not {_json_kind(data)}")
    # Parse everything before writing anything: a bad file imports nothing rather than half of itself.
    try:
        parsed = {str(old_id): parse_gradio_messages(str(old_id), items) for old_id, items in data.items()}
    except ImportFormatError as exc:
        raise ImportFormatError(f"{path}: {exc}") from None
    place = Place(kind="console", user_id=IMPORT_USER_ID)
    earlier = {s.title for s in store.list_sessions(kinds=["console"], user_id=IMPORT_USER_ID)}
    sessions = messages = 0
    skipped: list[str] = []
    already: list[str] = []
    for old_id, session_messages in parsed.items():
        if imported_title(old_id) in earlier:
            already.append(old_id)
            continue
        system = next((text for role, text in session_messages if role == "system"), default_system_prompt)
        turns = [(role, text) for role, text in session_messages if role != "system"]
        if not turns:
            skipped.append(old_id)
            continue
        session = await store.create(
            place,
            owner_id=IMPORT_USER_ID,
            title=imported_title(old_id),
            system_prompt=system or None,
            make_current=False,
        )
        await store.append(session.id, list(_stored(turns)))
        sessions += 1
        messages += len(turns)
    log.info("imported %d sessions (%d messages) from %s", sessions, messages, path)
    return ImportReport(sessions=sessions, messages=messages, skipped=skipped, already_imported=already)


async def _read_json(path: Path) -> Any:
    try:
        async with aiofiles.open(path, encoding="utf-8") as file:
            text = await file.read()
    except FileNotFoundError:
        raise ImportFormatError(f"{path}: no such file") from None
    except OSError as exc:
        raise ImportFormatError(f"{path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ImportFormatError(f"{path}: not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportFormatError(f"{path}: not valid JSON ({exc})") from None


def _stored(turns: Iterable[tuple[str, str]]) -> Iterable[StoredMessage]:
    now = utc_now_iso()
    for role, content in turns:
        yield StoredMessage(
            role="user" if role == "user" else "assistant",
            content=content,
            author_id=IMPORT_USER_ID if role == "user" else None,
            created_at=now,
        )


def _json_kind(value: Any) -> str:
    """What a parsed JSON value was, in JSON's words."""
    kinds = (
        (bool, "true/false"),
        (dict, "an object"),
        (list, "an array"),
        (str, "a string"),
        (int | float, "a number"),
    )
    return next((kind for cls, kind in kinds if isinstance(value, cls)), "null")
