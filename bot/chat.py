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
from datetime import datetime
from functools import partial

from bot.attachments import with_files
from bot.config import Settings
from bot.engine import Engine, GenerationRequest, SamplingParams
from bot.engine.base import FinishReason
from bot.errors import BotError, MessageRejectedError, NotLatestAnswerError, StorageError
from bot.history import HeldSession, HistoryStore
from bot.personas import PersonaStore, expand_prompt_variables, prompt_variables
from bot.render import Renderer, Speaker
from bot.sessions import MessageStatus, Place, Session, StoredMessage, utc_now_iso
from bot.turn import PlaceNames, Turn, TurnInput, record_unanswered, title_from

log = logging.getLogger(__name__)

# A reply to an answer older than this many sessions of its place goes to the place's current session.
ANSWER_LOOKUP_SESSIONS = 20


class ChatService:
    """Sessions, prompts and the engine put together; knows nothing of Discord."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: HistoryStore,
        engine: Engine,
        renderer: Renderer,
        personas: PersonaStore | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.renderer = renderer
        self.personas = personas

    def system_prompt_for(
        self, place: Place, names: PlaceNames | None = None, *, given: str | None = None
    ) -> str | None:
        """A new session's system prompt: the one given (/newchat's), else the persona of its channel or server,
        else `[chat] system_prompt`; its {date}, {time}, {server}, {channel} and {bot} filled in now, once, so the
        prompt stays the same through the session (and its cached prefix reusable)."""
        prompt = given
        if prompt is None and self.personas is not None and place.guild_id is not None:
            persona = self.personas.get(place.guild_id, place.channel_id)
            prompt = persona.prompt if persona is not None else None
        if prompt is None:
            prompt = self.settings.chat.system_prompt
        if not prompt:
            return None
        names = names or PlaceNames()
        values = prompt_variables(
            now=datetime.now().astimezone(), bot=names.bot, server=names.server, channel=names.channel
        )
        return expand_prompt_variables(prompt, values)

    async def current_session(self, place: Place, *, owner_id: int | None) -> Session:
        """The place's current session, made on first use (or when the old file was broken and set aside)."""
        async with self._hold(place, owner_id) as held:
            return held.session

    def _hold(
        self, place: Place, owner_id: int | None, names: PlaceNames | None = None
    ) -> AbstractAsyncContextManager[HeldSession]:
        # The prompt is worked out for a session that may not be made; reading a persona costs nothing.
        prompt = self.system_prompt_for(place, names)
        return self.store.hold_current(place, owner_id=owner_id, system_prompt=prompt)

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

    async def continue_here(self, place: Place, session: Session, *, owner_id: int | None) -> Session:
        """Make `session` the current one of `place`: itself when it lives there, else a copy of its conversation
        (a session belongs to one place, and the original stays where it was)."""
        if session.place.key == place.key:
            await self.store.set_current(place, session.id)
            return session
        copy = await self.store.create(
            place, owner_id=owner_id, title=session.title, system_prompt=session.system_prompt
        )
        kept = [m for m in session.messages if m.status != "pending"]
        return await self.store.append(copy.id, kept) if kept else copy

    async def new_session(
        self,
        place: Place,
        *,
        owner_id: int | None,
        title: str | None = None,
        system_prompt: str | None = None,
        names: PlaceNames | None = None,
    ) -> Session:
        prompt = self.system_prompt_for(place, names, given=system_prompt)
        return await self.store.create(place, owner_id=owner_id, title=title or "New chat", system_prompt=prompt)

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
        holding: AbstractAsyncContextManager[HeldSession]
        if session_id:
            holding = self.store.hold(session_id)
        else:
            holding = self._hold(request.place, request.author_id, request.names)
        async with contextlib.AsyncExitStack() as stack:
            try:
                held = await stack.enter_async_context(holding)
            except LookupError as exc:
                raise StorageError(f"session {session_id} cannot be read: {exc}") from exc
            yield await stack.enter_async_context(self._turn_in(held, request, text))

    @asynccontextmanager
    async def regenerate(self, session_id: str, asked_message_id: int) -> AsyncIterator[Turn]:
        """A new answer to the latest question of a session, which asked in Discord message `asked_message_id`;
        it replaces the old answer in history once it is complete (a failure before it begins keeps the old)."""
        async with self._latest_answer(session_id, asked_message_id, go_on=False) as turn:
            yield turn

    @asynccontextmanager
    async def continue_answer(self, session_id: str, asked_message_id: int) -> AsyncIterator[Turn]:
        """The latest answer of a session (to Discord message `asked_message_id`), cut at max_new_tokens, goes on
        where it stopped: the model continues the same answer, and history keeps the two parts as one. The Turn
        streams only the new part."""
        async with self._latest_answer(session_id, asked_message_id, go_on=True) as turn:
            yield turn

    @asynccontextmanager
    async def _latest_answer(self, session_id: str, asked_message_id: int, *, go_on: bool) -> AsyncIterator[Turn]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                held = await stack.enter_async_context(self.store.hold(session_id))
            except LookupError as exc:
                raise StorageError(f"session {session_id} cannot be read: {exc}") from exc
            messages = held.session.messages
            if latest_exchange(held.session, asked_message_id) is None:
                raise NotLatestAnswerError(f"message {asked_message_id} is not the latest answer of {session_id}")
            asked = len(messages) - 2
            before = dataclasses.replace(held.session, messages=messages[:asked])
            start = messages[-1].content if go_on else ""
            yield await stack.enter_async_context(
                self._answer(held, messages[asked], context=before, replaces=2, title=None, answer_start=start)
            )

    @asynccontextmanager
    async def _turn_in(self, held: HeldSession, request: TurnInput, text: str) -> AsyncIterator[Turn]:
        session = held.session
        # History keeps the turn as the model saw it: the text, then the files marked with their names.
        user_message = StoredMessage(
            role="user",
            content=with_files(text, request.files),
            author_id=request.author_id,
            created_at=utc_now_iso(),
            discord_message_id=request.message_id,
            author_name=request.author_name,
        )
        try:
            # Too long is checked here, not earlier, so the refused text is kept (marked failed), not lost.
            self.check_length(text)
        except MessageRejectedError as exc:
            await record_unanswered(held, [dataclasses.replace(user_message, status="failed")], exc)
            raise
        new_session = session.turns == 0 and session.title == "New chat"
        title = title_from(text or request.files[0].filename) if new_session else None
        async with self._answer(held, user_message, context=session, replaces=0, title=title) as turn:
            yield turn

    @asynccontextmanager
    async def _answer(
        self,
        held: HeldSession,
        user_message: StoredMessage,
        *,
        context: Session,
        replaces: int,
        title: str | None,
        answer_start: str = "",
    ) -> AsyncIterator[Turn]:
        """Stream an answer to `user_message` after the history in `context` (going on from `answer_start`, the
        answer so far, when given); the outcome replaces the last `replaces` messages of the held session."""
        deltas: AsyncGenerator[str, None] | None = None
        turn: Turn | None = None
        try:
            # Tokenizing a long history takes milliseconds: off the event loop.
            speaker = Speaker(user_message.author_id, user_message.author_name)
            rendered = await asyncio.to_thread(
                partial(self.renderer.render, answer_start=answer_start), context, user_message.content, speaker
            )
            queued_ahead = self.engine.waiting
            ending: list[FinishReason] = []
            deltas = self.engine.generate(
                GenerationRequest(
                    prompt=rendered.prompt,
                    sampling=SamplingParams.from_settings(self.settings.model),
                    session_id=held.session.id,
                    on_finish=ending.append,
                )
            )
            turn = Turn(held, user_message, queued_ahead=queued_ahead, deltas=deltas, replaces=replaces, ending=ending)
            yield turn
        except BaseException as exc:
            # Errors fail the turn; CancelledError and GeneratorExit (the caller went away) cancel it.
            status: MessageStatus = "failed" if isinstance(exc, Exception) else "cancelled"
            target = turn or Turn(held, user_message, queued_ahead=0, deltas=_nothing(), replaces=replaces)
            await record_unanswered(target, [dataclasses.replace(target.user_message, status=status)], exc)
            raise
        finally:
            if deltas is not None:
                # Takes the request out of the engine's batch if the stream was left early.
                await deltas.aclose()
        if not (turn.finished or turn.stopped):
            # The caller left the stream early (message deleted, shutdown): the turn has no answer.
            await record_unanswered(turn, [dataclasses.replace(turn.user_message, status="cancelled")], None)
            return
        answer = StoredMessage(
            role="assistant",
            content=(answer_start + turn.answer).strip(),
            author_id=None,
            created_at=utc_now_iso(),
            discord_message_id=turn.user_message.answer_message_id,
            status="stopped" if turn.stopped else "ok",
        )
        await turn.end([dataclasses.replace(turn.user_message, status="ok"), answer], title=title)


def latest_exchange(session: Session, asked_message_id: int) -> tuple[StoredMessage, StoredMessage] | None:
    """The question asked in Discord message `asked_message_id` and its answer, when they are the session's last two
    messages (the only answer Regenerate and Continue act on); None otherwise."""
    turns = session.answered_turns()
    if not turns or turns[-1][0].discord_message_id != asked_message_id or session.messages[-1] is not turns[-1][1]:
        return None
    return turns[-1]


async def _nothing() -> AsyncIterator[str]:
    return
    yield  # an async generator that yields nothing: a Turn that never began
