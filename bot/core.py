"""Builds the core parts from settings and owns them for their lifetime (`async with open_core(...)`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from bot.chat import ChatService
from bot.config import Settings
from bot.engine import Engine, LocalEngine, RemoteEngine
from bot.engine.local.source import ModelHubUnreachableError, ModelNotFoundError
from bot.errors import ConfigError, StartUpError, first_line
from bot.history import HistoryStore
from bot.personas import PersonaStore
from bot.render import Renderer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Core:
    settings: Settings
    store: HistoryStore
    engine: Engine
    renderer: Renderer
    chat: ChatService
    personas: PersonaStore


@asynccontextmanager
async def open_core(settings: Settings, *, engine: Engine | None = None) -> AsyncIterator[Core]:
    """Open the history store and start the engine (built from settings unless one is given)."""
    engine = engine or build_engine(settings)
    async with HistoryStore(settings.storage.data_dir) as store, started(engine, settings):
        renderer = Renderer.for_engine(settings, engine)
        personas = await PersonaStore.load(settings.storage.data_dir)
        chat = ChatService(settings=settings, store=store, engine=engine, renderer=renderer, personas=personas)
        yield Core(settings=settings, store=store, engine=engine, renderer=renderer, chat=chat, personas=personas)


@asynccontextmanager
async def started(engine: Engine, settings: Settings) -> AsyncIterator[Engine]:
    """The engine, started; a model that cannot be loaded (not found, no access, no network) is a clear
    start-up error naming `[model] name`, not a stack trace."""
    source = settings.source or "<config>"
    try:
        await engine.start()
    except ModelNotFoundError as exc:
        raise ConfigError(source, exc.key, exc.problem) from None
    except ModelHubUnreachableError as exc:
        raise StartUpError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(
            source,
            "model.name",
            f"cannot load {settings.model.name!r}: {first_line(exc)} (a gated model such as LLaMA-2 needs HF_TOKEN "
            "and its licence accepted on Hugging Face; or set name to a local folder)",
        ) from exc
    try:
        yield engine
    finally:
        await engine.close()


def build_engine(settings: Settings) -> Engine:
    """The engine `[model] backend` asks for: the model in this process, or an OpenAI-compatible server."""
    m = settings.model
    if m.backend == "openai":
        return RemoteEngine(
            m,
            api_key=settings.secret(m.api_key_env),
            hf_token=settings.hf_token,
            config_source=settings.source or "<config>",
        )
    return LocalEngine(m, hf_token=settings.hf_token)
