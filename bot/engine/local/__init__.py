"""The engine that runs the model in this process: async face, core loop, model runner, KV store, output."""

from __future__ import annotations

from bot.engine.local.engine import LocalEngine

__all__ = ["LocalEngine"]
