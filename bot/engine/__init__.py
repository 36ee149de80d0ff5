"""Inference engines: token IDs in, streamed text out."""

from __future__ import annotations

from bot.engine.base import Engine, EngineStats, GenerationRequest, SamplingParams
from bot.engine.local import LocalEngine

__all__ = ["Engine", "EngineStats", "GenerationRequest", "LocalEngine", "SamplingParams"]
