"""`/newchat` and `/history`: starting sessions and looking them up, with Discord's visibility rules."""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.admission import SYSTEM_PROMPT_NEEDS_ROLE, AccessPolicy
from bot.discord_text import MESSAGE_LIMIT, no_pings
from bot.errors import BotError
from bot.sessions import Place, Session, SessionSummary, is_valid_session_id
from cogs.chat import asker_of, place_of

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)

PAGE_SIZE = 10
THREAD_NAME_LIMIT = 100
NOT_FOUND = "No session with that ID that you can see. `/history` lists yours."
# First Strong Isolate ... Pop Directional Isolate: direction marks in a user-made title stay inside it.
ISOLATE, END_ISOLATE = "\u2068", "\u2069"


class AccessRefused(app_commands.CheckFailure):
    """A command refused by the access rules; `sentence` is what the caller is told (ephemerally)."""

    def __init__(self, sentence: str) -> None:
        super().__init__(sentence)
        self.sentence = sentence


def can_see(interaction: discord.Interaction, place: Place) -> bool:
    """A channel or thread session is visible to whoever can see that channel; a DM session only to its user."""
    if place.kind in ("dm", "console"):
        return place.kind == "dm" and place.user_id == interaction.user.id
    guild = interaction.guild
    member = interaction.user
    if guild is None or place.guild_id != guild.id or not isinstance(member, discord.Member):
        return False
    channel = guild.get_channel(place.channel_id) if place.channel_id is not None else None
    if channel is None:
        return False
    return channel.permissions_for(member).view_channel


def where(place: Place) -> str:
    if place.kind == "thread":
        return f"<#{place.thread_id}>"
    if place.kind == "channel":
        return f"<#{place.channel_id}>"
    return "DM" if place.kind == "dm" else "terminal"


def summary_line(summary: SessionSummary) -> str:
    updated = discord.utils.format_dt(discord.utils.parse_time(summary.updated_at), "R")
    title = ISOLATE + discord.utils.escape_markdown(summary.title) + END_ISOLATE
    return f"**{title}** · {where(summary.place)} · {summary.turns} turns · {updated} · `{summary.id}`"


def transcript(session: Session) -> str:
    lines = [f"# {session.title}", f"Session `{session.id}` · {where(session.place)} · started {session.created_at}"]
    if session.system_prompt:
        lines.append(f"System prompt: {session.system_prompt}")
    for message in session.messages:
        note = "" if message.status == "ok" else f" ({message.status}, not answered)"
        speaker = "Assistant" if message.role == "assistant" else f"<@{message.author_id}>"
        lines.append(f"\n**{speaker}**{note}: {message.content}")
    return "\n".join(lines)


class HistoryPages(discord.ui.View):
    """Previous/next buttons over the caller's list of sessions; only the caller can turn the pages."""

    def __init__(self, owner_id: int, summaries: list[SessionSummary]) -> None:
        super().__init__(timeout=600)
        self.owner_id = owner_id
        self.summaries = summaries
        self.page = 0
        self.pages = max(1, -(-len(summaries) // PAGE_SIZE))
        self._update_buttons()

    def render(self) -> str:
        start = self.page * PAGE_SIZE
        lines = [summary_line(s) for s in self.summaries[start : start + PAGE_SIZE]]
        header = f"Your sessions here, newest first (page {self.page + 1} of {self.pages}):"
        return "\n".join([header, *lines])[:MESSAGE_LIMIT]

    def _update_buttons(self) -> None:
        self.previous.disabled = self.page == 0
        self.next.disabled = self.page >= self.pages - 1

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id != self.owner_id:
            await interaction.response.send_message("These pages belong to someone else.", ephemeral=True)
            return False
        return True

    async def _turn(self, interaction: discord.Interaction, step: int) -> None:
        self.page = min(max(self.page + step, 0), self.pages - 1)
        self._update_buttons()
        await interaction.response.edit_message(content=self.render(), view=self, allowed_mentions=no_pings())

    @discord.ui.button(label="Previous", style=discord.ButtonStyle.secondary, custom_id="history:previous")
    async def previous(self, interaction: discord.Interaction, button: discord.ui.Button[HistoryPages]) -> None:
        await self._turn(interaction, -1)

    @discord.ui.button(label="Next", style=discord.ButtonStyle.secondary, custom_id="history:next")
    async def next(self, interaction: discord.Interaction, button: discord.ui.Button[HistoryPages]) -> None:
        await self._turn(interaction, 1)


class SessionsCog(commands.Cog):
    def __init__(self, bot: ChatBot) -> None:
        self.bot = bot
        self.chat = bot.core.chat
        self.store = bot.core.store
        self.access = AccessPolicy(bot.settings.discord)

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        # Commands are answered even where messages are ignored: the sentence is ephemeral, so only the caller
        # sees it and the channel stays quiet.
        refusal = self.access.check(asker_of(interaction.channel, interaction.user))
        if refusal is not None:
            command = interaction.command.name if interaction.command else "?"
            log.debug("/%s from %s refused by %s", command, interaction.user.id, refusal.key)
            raise AccessRefused(refusal.sentence)
        return True

    def visible_sessions(self, interaction: discord.Interaction) -> list[SessionSummary]:
        if interaction.guild is None:
            dm = Place(kind="dm", user_id=interaction.user.id)
            return self.store.list_sessions(place_keys=[dm.key])
        candidates = self.store.list_sessions(guild_id=interaction.guild.id)
        return [s for s in candidates if can_see(interaction, s.place)]

    @app_commands.command(name="newchat")
    @app_commands.describe(
        topic="What the chat is about; names the new thread",
        system_prompt="Instructions for the model in this chat (replaces the default system prompt)",
    )
    async def newchat(
        self,
        interaction: discord.Interaction,
        topic: app_commands.Range[str, 1, THREAD_NAME_LIMIT] | None = None,
        system_prompt: app_commands.Range[str, 1, 4000] | None = None,
    ) -> None:
        """Start a new chat session (in a text channel: in a new thread)."""
        channel = interaction.channel
        if channel is None:
            await interaction.response.send_message("I can't start a chat here.", ephemeral=True)
            return
        if system_prompt is not None and not self.access.may_set_system_prompt(asker_of(channel, interaction.user)):
            raise AccessRefused(SYSTEM_PROMPT_NEEDS_ROLE)
        title = topic or f"Chat with {interaction.user.display_name}"
        if isinstance(channel, discord.TextChannel):
            await interaction.response.defer(thinking=True)
            thread = await channel.create_thread(
                name=title[:THREAD_NAME_LIMIT], type=discord.ChannelType.public_thread, auto_archive_duration=1440
            )
            place = place_of(thread, interaction.user)
            target = thread.mention
        else:
            place = place_of(channel, interaction.user)  # type: ignore[arg-type]
            target = "here"
            thread = None
        if place is None:
            await interaction.response.send_message("I can't start a chat in this kind of channel.", ephemeral=True)
            return
        session = await self.chat.new_session(
            place, owner_id=interaction.user.id, title=title, system_prompt=system_prompt
        )
        text = f"Started a new chat {target}: every message there is a turn, no mention needed. (`{session.id}`)"
        if thread is not None:
            # The welcome goes first, so it is the thread's first message whatever the user writes next.
            await thread.send(
                f"New chat started by {interaction.user.mention}. Write here to talk to me.",
                allowed_mentions=no_pings(),
            )
            await interaction.edit_original_response(content=text, allowed_mentions=no_pings())
        else:
            await interaction.response.send_message(text, allowed_mentions=no_pings())

    @app_commands.command(name="history")
    @app_commands.describe(session="A session ID: shows that session's transcript")
    async def history(self, interaction: discord.Interaction, session: str | None = None) -> None:
        """List your chat sessions here, or show one session's transcript."""
        if session is not None:
            await self.show_transcript(interaction, session.strip())
            return
        summaries = self.visible_sessions(interaction)
        if not summaries:
            await interaction.response.send_message(
                "No chat sessions here yet. Mention me or use `/newchat` to start one.", ephemeral=True
            )
            return
        view = HistoryPages(interaction.user.id, summaries)
        await interaction.response.send_message(
            view.render(),
            view=view if view.pages > 1 else discord.utils.MISSING,
            ephemeral=True,
            allowed_mentions=no_pings(),
        )

    async def show_transcript(self, interaction: discord.Interaction, session_id: str) -> None:
        found = await self.store.get(session_id) if is_valid_session_id(session_id) else None
        # Unknown and invisible answer alike, so an ID cannot be probed.
        if found is None or not can_see(interaction, found.place):
            await interaction.response.send_message(NOT_FOUND, ephemeral=True)
            return
        text = transcript(found)
        if len(text) <= MESSAGE_LIMIT:
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=no_pings())
            return
        file = discord.File(io.BytesIO(text.encode()), filename=f"session-{found.id}.md")
        await interaction.response.send_message(
            f"**{discord.utils.escape_markdown(found.title)}**: {found.turns} turns, transcript attached.",
            file=file,
            ephemeral=True,
            allowed_mentions=no_pings(),
        )

    @history.autocomplete("session")
    async def history_session_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        # Autocomplete skips interaction_check: without this, a refused user could list session titles.
        if self.access.check(asker_of(interaction.channel, interaction.user)) is not None:
            return []
        needle = current.strip().lower()
        choices = []
        for summary in self.visible_sessions(interaction):
            if needle in summary.id.lower() or needle in summary.title.lower():
                name = f"{summary.title[:70]} · {summary.turns} turns · {summary.id}"
                choices.append(app_commands.Choice(name=name[:100], value=summary.id))
            if len(choices) == 25:
                break
        return choices

    async def cog_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        original = getattr(error, "original", error)
        if isinstance(original, AccessRefused):
            sentence = original.sentence
        elif isinstance(original, BotError):
            sentence = original.user_message
        else:
            sentence = "That didn't work; please try again."
        if not isinstance(original, BotError | discord.HTTPException | AccessRefused):
            log.warning("app command %s failed", interaction.command and interaction.command.name, exc_info=original)
        send = interaction.followup.send if interaction.response.is_done() else interaction.response.send_message
        try:
            await send(sentence, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("could not report an app command error: %s", exc)


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(SessionsCog(bot))
