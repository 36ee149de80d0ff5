"""Builds the core parts from settings and owns them for their lifetime (`async with open_core(...)`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from bot.chat import ChatService
from bot.config import Settings
from bot.engine import Engine, LocalEngine
from bot.history import HistoryStore
from bot.prompt import select_format

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Core:
    settings: Settings
    store: HistoryStore
    engine: Engine
    chat: ChatService


@asynccontextmanager
async def open_core(settings: Settings, *, engine: Engine | None = None) -> AsyncIterator[Core]:
    """Open the history store and start the engine (a LocalEngine from settings unless one is given)."""
    engine = engine or LocalEngine(settings.model, hf_token=settings.hf_token)
    async with HistoryStore(settings.storage.data_dir) as store, engine:
        prompt_format = select_format(engine.tokenizer, settings.model.name, settings.model.prompt_format)
        log.info("prompt format: %s", type(prompt_format).__name__)
        chat = ChatService(settings=settings, store=store, engine=engine, prompt_format=prompt_format)
        yield Core(settings=settings, store=store, engine=engine, chat=chat)
