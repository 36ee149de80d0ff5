"""Personas: a system prompt a server's managers set for one channel or the whole server, which new sessions there
start with; and the template variables every system prompt may use. No Discord here: IDs and text only.

On disk, beside the sessions: `<data_dir>/personas.json`, replaced atomically on every change, e.g.
    {"version": 1, "personas": [{"guild_id": 1, "channel_id": 2, "prompt": "...", "set_by": 3, "set_at": "..."}]}
where `channel_id` null is the server's persona. A file that cannot be read as that is moved to quarantine/ with
one warning, and the bot starts with no personas: a broken file must not stop the bot, nor be overwritten unseen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import aiofiles
import aiofiles.os

from bot.errors import StorageError
from bot.history.files import atomic_write, dumps
from bot.sessions import utc_now_iso

log = logging.getLogger(__name__)

PERSONAS_FILE = "personas.json"
PERSONAS_FORMAT_VERSION = 1
MAX_PROMPT_CHARS = 4000  # as /newchat's system_prompt

Scope = Literal["channel", "server"]
# (guild_id, channel_id); channel_id None is the server-wide persona.
Key = tuple[int, int | None]


@dataclass(frozen=True)
class Persona:
    guild_id: int
    channel_id: int | None  # None: the whole server
    prompt: str
    set_by: int
    set_at: str

    @property
    def scope(self) -> Scope:
        return "server" if self.channel_id is None else "channel"

    @property
    def key(self) -> Key:
        return (self.guild_id, self.channel_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "guild_id": self.guild_id,
            "channel_id": self.channel_id,
            "prompt": self.prompt,
            "set_by": self.set_by,
            "set_at": self.set_at,
        }

    @classmethod
    def from_json(cls, d: object) -> Persona:
        if not isinstance(d, Mapping):
            raise TypeError("a persona must be a JSON object")
        channel_id = d["channel_id"]
        return cls(
            guild_id=_id(d["guild_id"], "guild_id"),
            channel_id=None if channel_id is None else _id(channel_id, "channel_id"),
            prompt=_prompt(d["prompt"]),
            set_by=_id(d["set_by"], "set_by"),
            set_at=_text(d["set_at"], "set_at"),
        )


def _id(value: object, name: str) -> int:
    # bool is an int subclass; true in a file is junk, not an ID.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"{name} must be a non-negative integer")
    return value


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string")
    return value


def _prompt(value: object) -> str:
    prompt = _text(value, "prompt")
    if not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"a persona's prompt must be 1 to {MAX_PROMPT_CHARS} characters, not blank")
    return prompt


def parse_personas(data: bytes) -> dict[Key, Persona]:
    """The personas a file holds; ValueError / TypeError / KeyError for anything else."""
    doc = json.loads(data)
    if not isinstance(doc, Mapping) or doc.get("version") != PERSONAS_FORMAT_VERSION:
        raise ValueError(f"not a version {PERSONAS_FORMAT_VERSION} personas file")
    entries = doc["personas"]
    if not isinstance(entries, list):
        raise TypeError("personas must be a list")
    found: dict[Key, Persona] = {}
    for entry in entries:
        persona = Persona.from_json(entry)
        if persona.key in found:
            raise ValueError(f"two personas for {persona.key}")
        found[persona.key] = persona
    return found


def encode_personas(personas: Mapping[Key, Persona]) -> bytes:
    entries = [p.to_json() for _, p in sorted(personas.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))]
    return dumps({"version": PERSONAS_FORMAT_VERSION, "personas": entries}).encode("utf-8")


class PersonaStore:
    """All personas in memory (a few per server at most), written through to one file under a lock.

    Reads are plain dict look-ups, so a turn never waits on the disk; each change writes the whole file first and
    takes effect in memory only once the file is replaced, so memory and disk never disagree."""

    def __init__(self, path: Path, personas: Mapping[Key, Persona] | None = None) -> None:
        self.path = Path(path)
        self._personas: dict[Key, Persona] = dict(personas or {})
        self._lock = asyncio.Lock()

    @classmethod
    async def load(cls, data_dir: Path) -> PersonaStore:
        """The store of `data_dir`, read once; no file is no personas, a broken one is quarantined."""
        path = Path(data_dir) / PERSONAS_FILE
        await aiofiles.os.makedirs(path.parent, exist_ok=True)
        try:
            async with aiofiles.open(path, "rb") as f:
                data = await f.read()
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise StorageError(f"could not read {path}: {exc}") from exc
        try:
            personas = parse_personas(data)
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            await _quarantine(path, exc)
            return cls(path)
        log.info("loaded %d personas from %s", len(personas), path)
        return cls(path, personas)

    @property
    def count(self) -> int:
        return len(self._personas)

    def get(self, guild_id: int, channel_id: int | None) -> Persona | None:
        """The persona that applies in this channel (a thread: its parent channel): the channel's own, else the
        server's, else None."""
        if channel_id is not None and (own := self._personas.get((guild_id, channel_id))) is not None:
            return own
        return self._personas.get((guild_id, None))

    def get_exact(self, guild_id: int, channel_id: int | None) -> Persona | None:
        """The persona set for exactly this channel (None: for the server), without falling back."""
        return self._personas.get((guild_id, channel_id))

    async def set(self, guild_id: int, channel_id: int | None, prompt: str, *, set_by: int) -> Persona:
        """Set (or replace) the persona of a channel, or of the server when `channel_id` is None."""
        persona = Persona(guild_id, channel_id, _prompt(prompt), set_by, utc_now_iso())
        async with self._lock:
            changed = {**self._personas, persona.key: persona}
            await self._write(changed)
            self._personas = changed
        log.info("persona set for %s %s by %s", persona.scope, channel_id or guild_id, set_by)
        return persona

    async def clear(self, guild_id: int, channel_id: int | None) -> Persona | None:
        """Remove the persona of a channel (or the server's); the one removed, or None when there was none."""
        async with self._lock:
            old = self._personas.get((guild_id, channel_id))
            if old is None:
                return None
            changed = {k: p for k, p in self._personas.items() if k != old.key}
            await self._write(changed)
            self._personas = changed
        log.info("persona cleared for %s %s", old.scope, channel_id or guild_id)
        return old

    async def _write(self, personas: Mapping[Key, Persona]) -> None:
        try:
            await atomic_write(self.path, encode_personas(personas))
        except OSError as exc:
            log.warning("could not write %s: %s", self.path, exc)
            raise StorageError(
                f"could not write {self.path}: {exc}", user_message="I could not save the persona; nothing changed."
            ) from exc


async def _quarantine(path: Path, reason: BaseException) -> None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    dest = path.parent / "quarantine" / f"{path.name}.{stamp}"
    try:
        await aiofiles.os.makedirs(dest.parent, exist_ok=True)
        await aiofiles.os.replace(path, dest)
    except OSError as exc:
        # Left in place: the next change overwrites it, but the bot still starts.
        log.warning("personas file %s is broken (%s) and could not be moved aside (%s); no personas", path, reason, exc)
        return
    log.warning("personas file %s is broken (%s); moved it to %s and starting with no personas", path, reason, dest)


# --- template variables ---------------------------------------------------------------------------------------

PROMPT_VARIABLES = ("date", "time", "server", "channel", "bot")
_VARIABLE_RE = re.compile(r"\{(" + "|".join(PROMPT_VARIABLES) + r")\}")


def expand_prompt_variables(text: str, values: Mapping[str, str]) -> str:
    """`text` with `{date}`, `{time}`, `{server}`, `{channel}` and `{bot}` replaced by `values`. Any other brace
    stays as typed, and so does a name `values` lacks; one pass, so a value holding `{time}` (a server's name is
    anyone's text) is not expanded again. Never str.format: user text is not a format string."""

    def value_of(match: re.Match[str]) -> str:
        return values.get(match[1], match[0])

    return _VARIABLE_RE.sub(value_of, text)


def prompt_variables(
    *, now: datetime, bot: str, server: str | None = None, channel: str | None = None
) -> dict[str, str]:
    """The values for `expand_prompt_variables`, worded as llmcord words the date; a DM (no server or channel)
    gets words for one, so no bare `{server}` reaches the model."""
    return {
        "date": now.strftime("%A, %B %d, %Y"),
        "time": now.strftime("%H:%M %Z").strip(),
        "server": "direct messages" if server is None else server,
        "channel": "a direct message" if channel is None else channel,
        "bot": bot,
    }
