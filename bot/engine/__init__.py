"""Inference engines: token IDs in, streamed text out."""

from __future__ import annotations

from bot.engine.base import ChatMessage, Engine, EngineStats, GenerationRequest, SamplingParams
from bot.engine.local import LocalEngine
from bot.engine.remote import RemoteEngine, RetryPolicy

__all__ = [
    "ChatMessage",
    "Engine",
    "EngineStats",
    "GenerationRequest",
    "LocalEngine",
    "RemoteEngine",
    "RetryPolicy",
    "SamplingParams",
]
