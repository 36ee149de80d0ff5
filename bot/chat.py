"""One conversation turn, from a user's text to a stored answer; shared by Discord and the terminal chat.

The flow: the place's current session → the renderer's prompt (bot/render/) → the engine's stream → the exchange
appended to history. A turn holds its session's lock from start to end, so two messages that
arrive at once in one session are answered one after the other, each seeing the one before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from bot.attachments import TextFile, with_files
from bot.config import Settings
from bot.engine import Engine, GenerationRequest, SamplingParams
from bot.errors import BotError, MessageRejectedError, StorageError
from bot.history import HeldSession, HistoryStore
from bot.render import Renderer, Speaker
from bot.sessions import MessageStatus, Place, Session, StoredMessage, utc_now_iso

log = logging.getLogger(__name__)

TITLE_CHARS = 60
# A reply to an answer older than this many sessions of its place goes to the place's current session.
ANSWER_LOOKUP_SESSIONS = 20


@dataclass(frozen=True)
class TurnInput:
    place: Place
    author_id: int | None
    text: str
    message_id: int | None = None
    author_name: str | None = None  # the display name, for the prompt of a session with several speakers
    files: tuple[TextFile, ...] = ()  # text files read from the message, part of what the model sees


class Turn:
    """A turn in progress: the session it belongs to and the answer's text as it streams.

    The session stays held (its one lock) while the turn runs; `mark_answering` writes the user's message as
    pending with the answer's Discord message, so a restart after a crash can tell the user it was cut off."""

    def __init__(
        self,
        held: HeldSession,
        user_message: StoredMessage,
        *,
        queued_ahead: int,
        deltas: AsyncIterator[str],
    ) -> None:
        self.held = held
        self.user_message = user_message
        self.queued_ahead = queued_ahead
        # The place's session file could not be read, so this turn starts a new session: the user should know.
        self.history_lost = held.replaced_broken
        self.answer = ""
        self.finished = False
        self.stopped = False
        self.marked = False  # the pending mark is in the session file (the last message)
        self._deltas = deltas

    @property
    def session(self) -> Session:
        return self.held.session

    async def stream(self) -> AsyncIterator[str]:
        async for delta in self._deltas:
            self.answer += delta
            yield delta
            if self.stopped:
                return
        self.finished = True

    def stop(self) -> None:
        """End the answer where it is (the Stop button); the part written so far is kept, marked stopped."""
        self.stopped = True

    async def mark_answering(self, answer_message_id: int) -> None:
        """Once: the answer now shows in Discord as message `answer_message_id`."""
        if self.marked:
            return
        self.user_message = dataclasses.replace(self.user_message, answer_message_id=answer_message_id)
        try:
            await self.held.commit([dataclasses.replace(self.user_message, status="pending")])
        except BotError:
            log.warning("session %s: could not mark the answer in progress", self.session.id, exc_info=True)
            return
        self.marked = True

    async def end(self, messages: list[StoredMessage], title: str | None = None) -> None:
        """The turn's outcome, in place of the pending mark if there is one."""
        await self.held.commit(messages, title=title, replacing=1 if self.marked else 0)


class ChatService:
    """Sessions, prompts and the engine put together; knows nothing of Discord."""

    def __init__(self, *, settings: Settings, store: HistoryStore, engine: Engine, renderer: Renderer) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.renderer = renderer

    async def current_session(self, place: Place, *, owner_id: int | None) -> Session:
        """The place's current session, made on first use (or when the old file was broken and set aside)."""
        async with self._hold(place, owner_id) as held:
            return held.session

    def _hold(self, place: Place, owner_id: int | None) -> AbstractAsyncContextManager[HeldSession]:
        prompt = self.settings.chat.system_prompt
        return self.store.hold_current(place, owner_id=owner_id, system_prompt=prompt or None)

    async def close_interrupted_turns(self, tell: Callable[[Session, StoredMessage], Awaitable[None]]) -> int:
        """After a crash: every answer that history shows as still being written was cut off. `tell` shows that
        where the user sees it (the Discord message); then history marks the turn interrupted, so it is told
        once. Returns how many turns were closed."""
        closed = 0
        for summary in self.store.list_sessions():
            if not summary.open_turn:
                continue
            try:
                async with self.store.hold(summary.id) as held:
                    messages = list(held.session.messages)
                    pending = [i for i, m in enumerate(messages) if m.status == "pending"]
                    if not pending:
                        continue
                    for i in pending:
                        await tell(held.session, messages[i])
                        messages[i] = dataclasses.replace(messages[i], status="interrupted")
                    first = pending[0]
                    await held.commit(messages[first:], replacing=len(messages) - first)
                    closed += len(pending)
            except (LookupError, BotError) as exc:
                log.warning("session %s: could not close its interrupted turn: %s", summary.id, exc)
        return closed

    async def session_of_answer(self, place: Place, answer_message_id: int) -> str | None:
        """The session of this place whose answer is Discord message `answer_message_id` (a user replied to it),
        looking through the place's most recent sessions; None when none holds it."""
        for summary in self.store.list_sessions(place_keys=[place.key])[:ANSWER_LOOKUP_SESSIONS]:
            session = await self.store.get(summary.id)
            if session is not None and any(
                m.answer_message_id == answer_message_id or m.discord_message_id == answer_message_id
                for m in session.messages
                if m.role == "user" or m.role == "assistant"
            ):
                return session.id
        return None

    async def new_session(
        self,
        place: Place,
        *,
        owner_id: int | None,
        title: str | None = None,
        system_prompt: str | None = None,
    ) -> Session:
        prompt = self.settings.chat.system_prompt if system_prompt is None else system_prompt
        return await self.store.create(
            place, owner_id=owner_id, title=title or "New chat", system_prompt=prompt or None
        )

    def check_length(self, text: str) -> None:
        limit = self.settings.chat.max_message_chars
        if len(text) > limit:
            raise MessageRejectedError(
                "message too long",
                user_message=f"Your message is {len(text)} characters; the limit is {limit}. Please shorten it.",
            )

    @asynccontextmanager
    async def turn(self, request: TurnInput, *, session_id: str | None = None) -> AsyncIterator[Turn]:
        """Run one turn in the place's current session (or `session_id`). The session is held under its one lock
        from the prompt to the end, so two messages at once in one session are answered one after the other, each
        seeing the one before. Whatever happens inside, history ends consistent: the exchange, or the user's
        message marked failed/cancelled (never a half-written answer)."""
        text = request.text.strip()
        if not text and not request.files:
            # Nothing to keep: an empty message (or only a mention) is not a turn at all.
            raise MessageRejectedError("empty message", user_message="Send me some text and I'll answer it.")
        holding = self.store.hold(session_id) if session_id else self._hold(request.place, request.author_id)
        async with contextlib.AsyncExitStack() as stack:
            try:
                held = await stack.enter_async_context(holding)
            except LookupError as exc:
                raise StorageError(f"session {session_id} cannot be read: {exc}") from exc
            yield await stack.enter_async_context(self._turn_in(held, request, text))

    @asynccontextmanager
    async def _turn_in(self, held: HeldSession, request: TurnInput, text: str) -> AsyncIterator[Turn]:
        session = held.session
        # History keeps the turn as the model saw it: the text, then the files marked with their names.
        content = with_files(text, request.files)
        user_message = StoredMessage(
            role="user",
            content=content,
            author_id=request.author_id,
            created_at=utc_now_iso(),
            discord_message_id=request.message_id,
            author_name=request.author_name,
        )
        deltas: AsyncGenerator[str, None] | None = None
        turn: Turn | None = None
        try:
            # Too long is checked here, not earlier, so the refused text is kept (marked failed), not lost.
            self.check_length(text)
            # Tokenizing a long history takes milliseconds: off the event loop.
            speaker = Speaker(request.author_id, request.author_name)
            rendered = await asyncio.to_thread(self.renderer.render, session, content, speaker)
            queued_ahead = self.engine.waiting
            deltas = self.engine.generate(
                GenerationRequest(
                    prompt=rendered.prompt,
                    sampling=SamplingParams.from_settings(self.settings.model),
                    session_id=session.id,
                )
            )
            turn = Turn(held, user_message, queued_ahead=queued_ahead, deltas=deltas)
            yield turn
        except BaseException as exc:
            # Errors fail the turn; CancelledError and GeneratorExit (the caller went away) cancel it.
            status: MessageStatus = "failed" if isinstance(exc, Exception) else "cancelled"
            if turn is None:
                await _record_unanswered(held, [dataclasses.replace(user_message, status=status)], exc)
            else:
                await _record_unanswered(turn, [dataclasses.replace(turn.user_message, status=status)], exc)
            raise
        finally:
            if deltas is not None:
                # Takes the request out of the engine's batch if the stream was left early.
                await deltas.aclose()
        answer = StoredMessage(
            role="assistant",
            content=turn.answer.strip(),
            author_id=None,
            created_at=utc_now_iso(),
            discord_message_id=turn.user_message.answer_message_id,
            status="stopped" if turn.stopped else "ok",
        )
        if not (turn.finished or turn.stopped):
            # The caller left the stream early (message deleted, shutdown): the turn has no answer.
            await _record_unanswered(turn, [dataclasses.replace(turn.user_message, status="cancelled")], None)
            return
        title = (
            _title_from(text or request.files[0].filename)
            if session.turns == 0 and session.title == "New chat"
            else None
        )
        await turn.end([dataclasses.replace(turn.user_message, status="ok"), answer], title=title)


async def _record_unanswered(
    target: Turn | HeldSession, messages: list[StoredMessage], exc: BaseException | None
) -> None:
    session = target.session
    log.info("session %s: turn ended without an answer (%s: %r)", session.id, messages[0].status, exc)
    try:
        if isinstance(target, Turn):
            await target.end(messages)
        else:
            await target.commit(messages)
    except BotError:
        log.warning("session %s: could not record the unanswered turn", session.id, exc_info=True)


def _title_from(text: str) -> str:
    first_line = " ".join(text.split())
    return first_line if len(first_line) <= TITLE_CHARS else first_line[: TITLE_CHARS - 1] + "…"
