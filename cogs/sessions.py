"""`/newchat` and `/history`: starting sessions and looking them up, with Discord's visibility rules."""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.admission import SYSTEM_PROMPT_NEEDS_ROLE, AccessPolicy, NewChatRateLimitedError, RateWindow
from bot.discord_text import MESSAGE_LIMIT, no_pings
from bot.sessions import Place, Session, SessionSummary, is_valid_session_id
from cogs.answer_buttons import ContinueHereButton, buttons
from cogs.chat import asker_of, place_of
from cogs.command_errors import AccessRefused, tell_command_error
from cogs.message_parts import place_names
from cogs.visibility import ThreadDirectory, Viewer

if TYPE_CHECKING:
    from bot.client import ChatBot

log = logging.getLogger(__name__)

PAGE_SIZE = 10
AUTOCOMPLETE_LIMIT = 25  # the most choices Discord shows
THREAD_NAME_LIMIT = 100
NOT_FOUND = "No session with that ID that you can see. `/history` lists yours."
NEWCHAT_NEEDS_THREADS = "You can't start a chat here: that needs permission to send messages and create threads."
NEWCHAT_NEEDS_THREAD_SENDING = "You can't start a chat here: you may not send messages in this thread."
# First Strong Isolate ... Pop Directional Isolate: direction marks in a user-made title stay inside it.
ISOLATE, END_ISOLATE = "\u2068", "\u2069"


def newchat_refusal(channel: object, allowed: discord.Permissions) -> str | None:
    """Why the caller may not start a chat in this channel, by their own permissions there: /newchat must not
    open a thread, or speak, with the bot's rights on behalf of someone who has not got them."""
    if isinstance(channel, discord.Thread) and not allowed.send_messages_in_threads:
        return NEWCHAT_NEEDS_THREAD_SENDING
    if isinstance(channel, discord.TextChannel) and not (allowed.send_messages and allowed.create_public_threads):
        return NEWCHAT_NEEDS_THREADS
    return None


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
        self.threads = ThreadDirectory()
        self.newchats = RateWindow(bot.settings.chat.newchat_per_minute, NewChatRateLimitedError)

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(ContinueHereButton)

    async def cog_unload(self) -> None:
        self.bot.remove_dynamic_items(ContinueHereButton)

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        # Commands are answered even where messages are ignored: the sentence is ephemeral, so only the caller
        # sees it and the channel stays quiet.
        refusal = self.access.check(asker_of(interaction.channel, interaction.user))
        if refusal is not None:
            command = interaction.command.name if interaction.command else "?"
            log.debug("/%s from %s refused by %s", command, interaction.user.id, refusal.key)
            raise AccessRefused(refusal.sentence)
        return True

    async def visible_sessions(
        self, interaction: discord.Interaction, needle: str = "", *, limit: int | None = None
    ) -> list[SessionSummary]:
        """The caller's sessions here whose ID or title holds `needle`, newest first, at most `limit`."""
        if interaction.guild is None:
            dm = Place(kind="dm", user_id=interaction.user.id)
            candidates = self.store.list_sessions(place_keys=[dm.key])
        else:
            candidates = self.store.list_sessions(guild_id=interaction.guild.id)
        matching = [s for s in candidates if needle in s.id.lower() or needle in s.title.lower()]
        viewer = Viewer(interaction, self.threads)
        if limit is None:
            return await viewer.visible(matching)
        # A page at a time: a private thread's membership costs a request, so stop asking once there are enough.
        found: list[SessionSummary] = []
        for start in range(0, len(matching), limit):
            found += await viewer.visible(matching[start : start + limit])
            if len(found) >= limit:
                break
        return found[:limit]

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
        refusal = newchat_refusal(channel, interaction.permissions)
        if refusal is not None:
            raise AccessRefused(refusal)
        # Counted only once the caller may start a chat here: what the other checks refuse costs nothing.
        self.newchats.take(interaction.user.id)
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
        names = place_names(thread or channel, self.bot.user)
        session = await self.chat.new_session(
            place, owner_id=interaction.user.id, title=title, system_prompt=system_prompt, names=names
        )
        if isinstance(channel, discord.Thread) and self.bot.user is not None and channel.owner_id != self.bot.user.id:
            # Someone else's thread stays theirs: there the bot answers only when mentioned (cogs/chat.py).
            text = f"Started a new chat here: mention me in this thread to talk to me. (`{session.id}`)"
        else:
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
        summaries = await self.visible_sessions(interaction)
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
        if found is None or not await Viewer(interaction, self.threads).can_see(found):
            await interaction.response.send_message(NOT_FOUND, ephemeral=True)
            return
        text = transcript(found)
        view = buttons(ContinueHereButton(found.id))
        if len(text) <= MESSAGE_LIMIT:
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=no_pings(), view=view)
            return
        file = discord.File(io.BytesIO(text.encode()), filename=f"session-{found.id}.md")
        await interaction.response.send_message(
            f"**{discord.utils.escape_markdown(found.title)}**: {found.turns} turns, transcript attached.",
            file=file,
            ephemeral=True,
            allowed_mentions=no_pings(),
            view=view,
        )

    async def continue_here(self, interaction: discord.Interaction, session_id: str) -> None:
        """The transcript's Continue here button: that session becomes this place's current conversation (a copy
        of it, when it lives elsewhere), for a caller who may still see it and may write here."""
        found = await self.store.get(session_id)
        channel = interaction.channel
        place = place_of(channel, interaction.user) if channel is not None else None  # type: ignore[arg-type]
        if found is None or not await Viewer(interaction, self.threads).can_see(found):
            await interaction.response.send_message(NOT_FOUND, ephemeral=True)
            return
        in_thread = isinstance(channel, discord.Thread)
        may_write = interaction.guild is None or (
            interaction.permissions.send_messages_in_threads if in_thread else interaction.permissions.send_messages
        )
        if place is None or not may_write:
            await interaction.response.send_message("You can't continue a conversation here.", ephemeral=True)
            return
        current = await self.chat.continue_here(place, found, owner_id=interaction.user.id)
        title = discord.utils.escape_markdown(found.title)
        await interaction.response.send_message(
            f"{interaction.user.mention} continued **{title}** here ({found.turns} turns, `{current.id}`).",
            allowed_mentions=no_pings(),
        )

    @history.autocomplete("session")
    async def history_session_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        # Autocomplete skips interaction_check: without this, a refused user could list session titles.
        if self.access.check(asker_of(interaction.channel, interaction.user)) is not None:
            return []
        choices = []
        for summary in await self.visible_sessions(interaction, current.strip().lower(), limit=AUTOCOMPLETE_LIMIT):
            name = f"{summary.title[:70]} · {summary.turns} turns · {summary.id}"
            choices.append(app_commands.Choice(name=name[:100], value=summary.id))
        return choices

    async def cog_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        await tell_command_error(interaction, error)


async def setup(bot: ChatBot) -> None:
    await bot.add_cog(SessionsCog(bot))
