"""`python -m bot chat`: the terminal chat, on the very same sessions, history, prompts and engine.

Terminal sessions are sessions of their own kind ("console"), listed and resumable like the others.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TextIO

from bot.chat import TurnInput
from bot.core import Core
from bot.errors import BotError
from bot.sessions import Place, Session

log = logging.getLogger(__name__)

CONSOLE_USER_ID = 0
HELP = """Commands:
  /new [title]     start a new session
  /list            list terminal sessions, newest first
  /resume ID       continue an earlier session
  /history         show this session's transcript
  /quit            leave (Ctrl-D works too)
Anything else is a message to the model."""


class ConsoleChat:
    def __init__(self, core: Core, *, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
        self.core = core
        self.stdin = stdin
        self.stdout = stdout
        self.place = Place(kind="console", user_id=CONSOLE_USER_ID)

    def say(self, text: str = "", *, end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    async def read_line(self) -> str | None:
        self.say("you> ", end="")
        # input() blocks; on a worker thread the event loop (and the engine's callbacks) keep running.
        line = await asyncio.to_thread(self.stdin.readline)
        return line.rstrip("\n") if line else None

    async def run(self) -> None:
        session = await self.core.chat.current_session(self.place, owner_id=CONSOLE_USER_ID)
        self.say(f"Session {session.id} ({session.turns} turns). Type /help for commands.")
        while (line := await self.read_line()) is not None:
            command, _, argument = line.strip().partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/help":
                self.say(HELP)
            elif command == "/new":
                session = await self.core.chat.new_session(
                    self.place, owner_id=CONSOLE_USER_ID, title=argument.strip() or None
                )
                self.say(f"New session {session.id}.")
            elif command == "/list":
                self.list_sessions(session)
            elif command == "/resume":
                session = await self.resume(argument.strip()) or session
            elif command == "/history":
                self.show_transcript(await self.core.store.get(session.id) or session)
            elif line.strip():
                session = await self.answer(session, line)
        self.say("\nBye.")

    def list_sessions(self, current: Session) -> None:
        summaries = self.core.store.list_sessions(kinds=["console"])
        if not summaries:
            self.say("No sessions yet.")
        for summary in summaries:
            marker = "*" if summary.id == current.id else " "
            self.say(f"{marker} {summary.id}  {summary.updated_at[:16]}  {summary.turns:3d} turns  {summary.title}")

    async def resume(self, session_id: str) -> Session | None:
        session = await self.core.store.get(session_id)
        if session is None or session.place.kind != "console":
            self.say(f"No terminal session {session_id!r}; /list shows them.")
            return None
        await self.core.store.set_current(self.place, session.id)
        self.say(f"Resumed {session.id}: {session.title} ({session.turns} turns).")
        return session

    def show_transcript(self, session: Session) -> None:
        for message in session.messages:
            note = "" if message.status == "ok" else f" [{message.status}]"
            self.say(f"{message.role}{note}: {message.content}")

    async def answer(self, session: Session, text: str) -> Session:
        self.say("bot> ", end="")
        try:
            async with self.core.chat.turn(
                TurnInput(place=self.place, author_id=CONSOLE_USER_ID, text=text), session_id=session.id
            ) as turn:
                async for delta in turn.stream():
                    self.say(delta, end="")
            self.say()
            return turn.session
        except BotError as exc:
            self.say(f"\n[{exc.user_message}]")
            return await self.core.store.get(session.id) or session
