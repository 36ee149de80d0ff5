"""The bot's persistent buttons: Stop while an answer streams, Regenerate on a session's latest answer, Continue
on a latest answer cut at max_new_tokens, and Continue here on a transcript from `/history`.

All are `DynamicItem`s: their custom ids carry what they act on, so they keep working after a restart (discord.py
rebuilds them from the id). The work itself is the cogs' (cogs/answer_actions.py through the ChatCog,
`SessionsCog.continue_here`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import discord

if TYPE_CHECKING:
    from cogs.chat import ChatCog
    from cogs.sessions import SessionsCog

STOP_ID = "answer:stop:{asked}"
CONTINUE_ID = "session:continue:{session}"
REGENERATE_ID = "answer:regenerate:{session}:{asked}"
CONTINUE_ANSWER_ID = "answer:continue:{session}:{asked}"


def cog_of(interaction: discord.Interaction, name: str) -> Any:
    cog = getattr(interaction.client, "get_cog", lambda _: None)(name)
    if cog is None:
        raise RuntimeError(f"the {name} cog is not loaded")
    return cog


def chat_cog(interaction: discord.Interaction) -> ChatCog:
    return cog_of(interaction, "ChatCog")  # type: ignore[no-any-return]


def sessions_cog(interaction: discord.Interaction) -> SessionsCog:
    return cog_of(interaction, "SessionsCog")  # type: ignore[no-any-return]


class StopButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"answer:stop:(?P<asked>[0-9]+)"):
    """Stops the answer to user message `asked` where it is; the asker or a moderator only."""

    def __init__(self, asked: int) -> None:
        super().__init__(
            discord.ui.Button(label="Stop", style=discord.ButtonStyle.danger, custom_id=STOP_ID.format(asked=asked))
        )
        self.asked = asked

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> StopButton:
        return cls(int(match["asked"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await chat_cog(interaction).actions.stop(interaction, self.asked)


class RegenerateButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"answer:regenerate:(?P<session>[A-Za-z0-9_-]{16}):(?P<asked>[0-9]+)",
):
    """A new answer to the latest question of session `session`, asked in user message `asked`."""

    def __init__(self, session_id: str, asked: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Regenerate",
                style=discord.ButtonStyle.secondary,
                custom_id=REGENERATE_ID.format(session=session_id, asked=asked),
            )
        )
        self.session_id = session_id
        self.asked = asked

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> RegenerateButton:
        return cls(match["session"], int(match["asked"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await chat_cog(interaction).actions.regenerate(interaction, self.session_id, self.asked)


class ContinueAnswerButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"answer:continue:(?P<session>[A-Za-z0-9_-]{16}):(?P<asked>[0-9]+)",
):
    """The latest answer of session `session` (to user message `asked`) goes on where max_new_tokens cut it."""

    def __init__(self, session_id: str, asked: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Continue",
                style=discord.ButtonStyle.primary,
                custom_id=CONTINUE_ANSWER_ID.format(session=session_id, asked=asked),
            )
        )
        self.session_id = session_id
        self.asked = asked

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ContinueAnswerButton:
        return cls(match["session"], int(match["asked"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await chat_cog(interaction).actions.continue_answer(interaction, self.session_id, self.asked)


class ContinueHereButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"session:continue:(?P<session>[A-Za-z0-9_-]{16})"
):
    """Makes session `session` the current conversation of the place where the button is used."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            discord.ui.Button(
                label="Continue here",
                style=discord.ButtonStyle.primary,
                custom_id=CONTINUE_ID.format(session=session_id),
            )
        )
        self.session_id = session_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ContinueHereButton:
        return cls(match["session"])

    async def callback(self, interaction: discord.Interaction) -> None:
        await sessions_cog(interaction).continue_here(interaction, self.session_id)


def buttons(*items: discord.ui.Item[Any]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for item in items:
        view.add_item(item)
    return view


async def turn_off(interaction: discord.Interaction, sentence: str) -> None:
    """A button on an older answer, used: its message's buttons turn themselves off, and the user is told why."""
    message = interaction.message
    if message is None:
        await interaction.response.send_message(sentence, ephemeral=True)
        return
    view = discord.ui.View.from_message(message, timeout=None)
    for item in view.children:
        if isinstance(item, discord.ui.Button):
            item.disabled = True
    await interaction.response.edit_message(view=view)
    await interaction.followup.send(sentence, ephemeral=True)
