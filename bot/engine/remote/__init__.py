"""The engine that streams answers from OpenAI-compatible servers (vLLM, llama.cpp, transformers serve, ...)."""

from __future__ import annotations

from bot.engine.remote.engine import RemoteEngine, RetryPolicy

__all__ = ["RemoteEngine", "RetryPolicy"]
