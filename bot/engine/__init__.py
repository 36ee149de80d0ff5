"""Inference engines: a prompt (token IDs, or chat messages for a server) in, streamed text out."""

from __future__ import annotations

from bot.engine.base import (
    ChatMessage,
    Engine,
    EngineStats,
    GenerationRequest,
    MessagePrompt,
    Prompt,
    SamplingParams,
    TokenPrompt,
)
from bot.engine.local import LocalEngine
from bot.engine.remote import RemoteEngine, RetryPolicy

__all__ = [
    "ChatMessage",
    "Engine",
    "EngineStats",
    "GenerationRequest",
    "LocalEngine",
    "MessagePrompt",
    "Prompt",
    "RemoteEngine",
    "RetryPolicy",
    "SamplingParams",
    "TokenPrompt",
]
