"""What the buttons on an answer do: Stop while it streams, Regenerate and Continue on a session's latest answer.

The buttons themselves (cogs/answer_buttons.py) only carry ids; the turns go through the ChatCog that streams
every answer, so a regenerated or continued answer can be stopped like any other.
"""

from __future__ import annotations

import logging
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Literal

import discord

from bot.chat import latest_exchange
from bot.errors import BotError, NotLatestAnswerError, PromptTooLongError
from bot.reply_stream import StreamingReply
from bot.turn import Turn
from cogs.answer_buttons import ContinueAnswerButton, RegenerateButton, StopButton, buttons, turn_off

if TYPE_CHECKING:
    from cogs.chat import ChatCog

log = logging.getLogger(__name__)

ONLY_ASKER = "Only the person who asked (or a moderator) can {what} this answer."
SAME_ANSWER = "The model answers with temperature 0 here, so the new answer is the same as the old one."
NOT_LATEST = "Only the latest answer of a conversation can be {what}d."
NO_ROOM = "This answer has filled the model's context window, so it cannot go on; ask a new question instead."
# Where a continued answer's new message begins: it reads on from the message above.
CONTINUED = "…"

Action = Literal["regenerate", "continue"]


class AnswerActions:
    def __init__(self, cog: ChatCog) -> None:
        self.cog = cog

    async def stop(self, interaction: discord.Interaction, asked: int) -> None:
        """The Stop button: the asker or a moderator ends the answer to message `asked` where it is."""
        turn = self.cog.running.get(asked)
        if turn is None:
            await turn_off(interaction, "This answer is already finished.")
            return
        if interaction.user.id != turn.user_message.author_id and not interaction.permissions.manage_messages:
            await interaction.response.send_message(ONLY_ASKER.format(what="stop"), ephemeral=True)
            return
        turn.stop(by=interaction.user.display_name)
        await interaction.response.defer()

    async def regenerate(self, interaction: discord.Interaction, session_id: str, asked: int) -> None:
        """A new answer to the latest question, streamed into the same message."""
        delivered = await self._rerun(interaction, session_id, asked, "regenerate")
        if delivered and self.cog.bot.settings.model.temperature == 0:
            await interaction.followup.send(SAME_ANSWER, ephemeral=True)

    async def continue_answer(self, interaction: discord.Interaction, session_id: str, asked: int) -> None:
        """The latest answer, cut at max_new_tokens, goes on in a new message below it (its buttons move there)."""
        await self._rerun(interaction, session_id, asked, "continue")

    async def _rerun(self, interaction: discord.Interaction, session_id: str, asked: int, action: Action) -> bool:
        """Regenerate or continue the latest answer of `session_id` (to user message `asked`) from its button on
        `interaction.message`; True when the new answer was delivered."""
        message = interaction.message
        session = await self.cog.store.get(session_id)
        latest = latest_exchange(session, asked) if session is not None else None
        if message is None or session is None or latest is None:
            await turn_off(interaction, NOT_LATEST.format(what=action))
            return False
        if interaction.user.id != latest[0].author_id and not interaction.permissions.manage_messages:
            await interaction.response.send_message(ONLY_ASKER.format(what=action), ephemeral=True)
            return False
        try:
            ticket = self.cog.admission.admit(interaction.user.id, session.place.key)
        except BotError as exc:
            await interaction.response.send_message(exc.user_message, ephemeral=True)
            return False
        # Held until the turn ends (the inner block); the outer one frees it on any other way out.
        with ticket:
            settings = self.cog.bot.settings.discord
            turn_cm: AbstractAsyncContextManager[Turn]
            try:
                if action == "regenerate":
                    await interaction.response.defer()
                    reply = StreamingReply(message, edit_interval=settings.stream_edit_interval, rewrite=message)
                    turn_cm = self.cog.chat.regenerate(session_id, asked)
                else:
                    # The buttons move to the new part; this message keeps the answer's first part as it was.
                    await interaction.response.edit_message(view=None)
                    reply = StreamingReply(message, edit_interval=settings.stream_edit_interval)
                    turn_cm = self.cog.chat.continue_answer(session_id, asked)
            except discord.HTTPException as exc:
                # Nothing was started, and Discord shows the user that the click failed.
                log.warning("Discord refused the %s button's acknowledgement: %s", action, exc)
                return False
            reply.view = buttons(StopButton(asked))
            try:
                # Freed as the turn ends, before the answer shows as final or an error shows (as in ChatCog.answer).
                with ticket:
                    async with turn_cm as turn:
                        if action == "continue":
                            await reply.feed(CONTINUED)
                        await self.cog.stream(turn, reply, asked)
                await self.cog.finish(reply, turn, asked)
            except NotLatestAnswerError:
                await interaction.followup.send(NOT_LATEST.format(what=action), ephemeral=True)
                return False
            except (BotError, discord.HTTPException) as exc:
                log.info("%s in session %s failed: %s", action, session_id, exc)
                if isinstance(exc, PromptTooLongError) and action == "continue":
                    sentence = NO_ROOM
                elif isinstance(exc, BotError):
                    sentence = exc.user_message
                else:
                    sentence = "Discord refused a message."
                if action == "continue" and not reply.messages:
                    # Nothing new was shown: the answer keeps its buttons, to try again.
                    view = buttons(RegenerateButton(session_id, asked), ContinueAnswerButton(session_id, asked))
                    await message.edit(view=view)
                    await interaction.followup.send(sentence, ephemeral=True)
                else:
                    await self.cog.tell(reply, sentence)
                return False
            return True
