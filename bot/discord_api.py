"""Which Discord API discord.py talks to: Discord's own, a REST proxy, or the emulator the tests and `demo` run.

discord.py keeps this in two process-wide class attributes, `Route.BASE` (REST) and `DiscordWebSocket.DEFAULT_GATEWAY`
(the websocket it dials when it does not ask GET /gateway/bot first: with a shard_count, and for a plain Client).
`use_api_base` is the one place that sets them, and it puts them back when its block ends.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
import discord.http
import yarl
from discord.gateway import DiscordWebSocket

from bot.config import DISCORD_API_BASE

log = logging.getLogger(__name__)

GATEWAY_LOOKUP_TIMEOUT_S = 30.0


class ApiBaseUnreachableError(Exception):
    """Nothing at the API base answered GET /gateway with a gateway URL; the message says what happened."""


class ApiBaseDownError(ApiBaseUnreachableError):
    """Nothing answered at all (connection refused, no such host, timeout) or the server failed (5xx): an outage
    that may pass, where the other answers mean `[discord] api_base` is wrong."""


async def gateway_of(api_base: str) -> yarl.URL:
    """The gateway the API at `api_base` names (GET /gateway, which needs no token)."""
    url = f"{api_base}/gateway"
    timeout = aiohttp.ClientTimeout(total=GATEWAY_LOOKUP_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as response:
            response.raise_for_status()
            data = await response.json()
        return yarl.URL(str(data["url"]))
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise ApiBaseDownError(f"no Discord API answered GET {url} ({exc or type(exc).__name__})") from None
    except aiohttp.ClientResponseError as exc:
        error = ApiBaseDownError if exc.status >= 500 else ApiBaseUnreachableError
        raise error(f"no Discord API answered GET {url} with a gateway URL (HTTP {exc.status})") from None
    except (aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
        raise ApiBaseUnreachableError(f"no Discord API answered GET {url} with a gateway URL ({exc!r})") from None


@contextlib.asynccontextmanager
async def use_api_base(api_base: str) -> AsyncIterator[None]:
    """Inside the block discord.py sends REST calls to `api_base` and opens its gateway where that API says.

    Discord's own API base leaves discord.py's defaults as they are. Both settings are restored on exit, so blocks
    nest; they are process-wide, so two clients in one process share one API base."""
    base = api_base.rstrip("/")
    previous = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    gateway = previous[1] if base == DISCORD_API_BASE else await gateway_of(base)
    discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = base, gateway
    if base != DISCORD_API_BASE:
        log.info("Discord API at %s, gateway at %s", base, gateway)
    try:
        yield
    finally:
        discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = previous
