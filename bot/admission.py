"""What a message must pass before it becomes a turn: who may ask where, how often, and text that can't pose as
the prompt's own markup. No Discord here: the cogs hand in plain IDs and text."""

from __future__ import annotations

import logging
import math
import time
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from bot.config import DiscordSettings
from bot.errors import BotError

log = logging.getLogger(__name__)

RATE_WINDOW = 60.0
NOTICE_INTERVAL = 3600.0

# LLaMA-2's (and Mistral's) turn and system markers are plain text to the tokenizer, so typed by a user they
# would read to the model exactly like the real ones. BOS/EOS and other special tokens are not here: the prompt
# builders encode user text so that typed special tokens stay text (bot/prompt.py).


class UserBusyError(BotError):
    user_message = "I'm still answering your previous message here; send this one again once that answer is done."


class RateLimitedError(BotError):
    """Too many of something from one user within a minute; the sentence says when to try again."""

    what = "messages"
    sentence = (
        "You've sent me {limit} messages in the last minute, the most I take from one person; "
        "please try again in {wait}."
    )

    def __init__(self, limit: int, retry_after: float) -> None:
        self.retry_after = retry_after
        seconds = max(1, math.ceil(retry_after))
        wait = f"{seconds} second" if seconds == 1 else f"{seconds} seconds"
        super().__init__(
            f"rate limit of {limit} {self.what} per minute reached",
            user_message=self.sentence.format(limit=limit, wait=wait),
        )


class NewChatRateLimitedError(RateLimitedError):
    what = "new chats"
    sentence = (
        "You've started {limit} new chats in the last minute, the most I open for one person; "
        "please try again in {wait}."
    )


class AdmissionTicket:
    """Held while a request is answered; `release()` or leaving the `with` block frees the user's slot."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release

    def release(self) -> None:
        """Idempotent: the answer is out, so the user may send the next message."""
        self._release()

    def __enter__(self) -> AdmissionTicket:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._release()


class RateWindow:
    """At most `per_minute` events per user over a sliding minute (0 = no limit); `take` refuses the one over
    with `error`. Refusals are immediate, never queued, and don't count."""

    def __init__(
        self,
        per_minute: int,
        error: type[RateLimitedError] = RateLimitedError,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.error = error
        self.clock = clock
        # Event times within the window, per user, least recently seen first: users idle for a whole window
        # are dropped from the front, so this holds only the users of the last minute.
        self._recent: OrderedDict[int, deque[float]] = OrderedDict()

    @property
    def tracked_users(self) -> int:
        return len(self._recent)

    def take(self, user_id: int) -> None:
        if self.per_minute <= 0:
            return
        now = self.clock()
        horizon = now - RATE_WINDOW
        while self._recent:
            oldest_user, times = next(iter(self._recent.items()))
            if times and times[-1] > horizon:
                break
            del self._recent[oldest_user]
        times = self._recent.setdefault(user_id, deque())
        self._recent.move_to_end(user_id)
        while times and times[0] <= horizon:
            times.popleft()
        if len(times) >= self.per_minute:
            # Refusals don't count: the window frees up at the pace the user was admitted.
            raise self.error(self.per_minute, times[0] - horizon)
        times.append(now)


class Admission:
    """Per-user limits: one request in flight per user and session, and at most `per_minute` admitted messages
    per user over a sliding minute (0 = no rate limit). Refusals are immediate, never queued."""

    def __init__(self, *, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._in_flight: set[tuple[int, str]] = set()
        self._rate = RateWindow(per_minute, clock=clock)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def tracked_users(self) -> int:
        return self._rate.tracked_users

    def is_busy(self, user_id: int, session_key: str) -> bool:
        """Whether the user has a request in flight there (one more would be refused)."""
        return (user_id, session_key) in self._in_flight

    def admit(self, user_id: int, session_key: str) -> AdmissionTicket:
        """A ticket for one request, or UserBusyError / RateLimitedError at once."""
        key = (user_id, session_key)
        if key in self._in_flight:
            raise UserBusyError(f"user {user_id} already has a request in flight in {session_key}")
        self._rate.take(user_id)
        self._in_flight.add(key)
        return AdmissionTicket(lambda: self._in_flight.discard(key))


class NoticeGate:
    """Whether to tell a refused user why, at most once per `interval` seconds each, so that someone refused
    can't make the bot post an answer to every message they send."""

    def __init__(self, interval: float = NOTICE_INTERVAL, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._told: OrderedDict[int, float] = OrderedDict()  # in the order they were told, oldest first

    def should_tell(self, user_id: int) -> bool:
        now = self.clock()
        while self._told and next(iter(self._told.values())) <= now - self.interval:
            self._told.popitem(last=False)
        if user_id in self._told:
            return False
        self._told[user_id] = now
        return True


@dataclass(frozen=True)
class Asker:
    """Who asks, and where: a guild channel (for a thread, its parent channel and the thread) or a DM."""

    user_id: int
    guild_id: int | None = None
    channel_id: int | None = None
    thread_id: int | None = None
    role_ids: frozenset[int] = frozenset()

    @property
    def in_dm(self) -> bool:
        return self.guild_id is None


@dataclass(frozen=True)
class Refusal:
    """Why a user may not use the bot here. `quiet`: a message is ignored without an answer (commands, which
    only the caller sees, always get the sentence)."""

    key: str
    sentence: str
    quiet: bool


# Quiet or told, and why: a blocked user gets no reaction at all (any answer is attention, and costs a post); a
# server or channel the operator kept the bot out of gets no noise from it; someone who lacks a role, or writes a
# DM that can't show roles, is in the right place and is told once (NoticeGate) what is missing.
BLOCKED = Refusal("discord.blocked_user_ids", "You can't use this bot.", quiet=True)
NO_DMS = Refusal("discord.allow_dms", "I don't answer direct messages.", quiet=True)
DM_NEEDS_ROLE = Refusal(
    "discord.allowed_role_ids",
    "I only talk to members with certain server roles, which a direct message can't show; "
    "please write to me in the server.",
    quiet=False,
)
OTHER_GUILD = Refusal("discord.allowed_guild_ids", "I'm not available in this server.", quiet=True)
OTHER_CHANNEL = Refusal("discord.allowed_channel_ids", "I don't chat in this channel.", quiet=True)
NEEDS_ROLE = Refusal(
    "discord.allowed_role_ids", "Talking to me needs a server role you don't have; ask a moderator.", quiet=False
)
SYSTEM_PROMPT_NEEDS_ROLE = (
    "Only members with certain roles may set a system prompt here; start the chat without one, or ask a moderator."
)


class AccessPolicy:
    """The `[discord]` access lists; an empty list allows everyone."""

    def __init__(self, settings: DiscordSettings) -> None:
        self.allow_dms = settings.allow_dms
        self.guilds = frozenset(settings.allowed_guild_ids)
        self.channels = frozenset(settings.allowed_channel_ids)
        self.roles = frozenset(settings.allowed_role_ids)
        self.blocked = frozenset(settings.blocked_user_ids)
        self.system_prompt_roles = frozenset(settings.newchat_system_prompt_role_ids)

    def check(self, asker: Asker) -> Refusal | None:
        if asker.user_id in self.blocked:
            return BLOCKED
        if asker.in_dm:
            if not self.allow_dms:
                return NO_DMS
            return DM_NEEDS_ROLE if self.roles else None
        if self.guilds and asker.guild_id not in self.guilds:
            return OTHER_GUILD
        # A thread inherits its parent channel's allowance (or is listed itself).
        if self.channels and asker.channel_id not in self.channels and asker.thread_id not in self.channels:
            return OTHER_CHANNEL
        if self.roles and not self.roles & asker.role_ids:
            return NEEDS_ROLE
        return None

    def may_set_system_prompt(self, asker: Asker) -> bool:
        if not self.system_prompt_roles:
            return True
        return not asker.in_dm and bool(self.system_prompt_roles & asker.role_ids)

    def may_set_persona(self, asker: Asker, *, manages_server: bool) -> bool:
        """A persona speaks for everyone in a place, so unlike /newchat's prompt an empty role list does not open
        it to all: it takes Manage Server, or one of the system-prompt roles."""
        if asker.in_dm:
            return False
        return manages_server or bool(self.system_prompt_roles & asker.role_ids)


def has_visible_text(text: str) -> bool:
    """False for text of only whitespace and invisible format characters (zero-width spaces, direction marks)."""
    return any(not ch.isspace() and unicodedata.category(ch) != "Cf" for ch in text)
