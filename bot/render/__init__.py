"""The one owner of prompts: format choice, LLaMA-2's reference format, chat templates, the context budget."""

from __future__ import annotations

from bot.render.fitting import BuiltPrompt, fit_chars, fit_tokens
from bot.render.formats import ChatTemplateFormat, Exchange, Llama2Format, PromptFormat, neutralise_control_tags
from bot.render.renderer import (
    PROMPT_FORMATS,
    RenderedPrompt,
    Renderer,
    Speaker,
    is_llama2_name,
    select_format,
    speaker_label,
)

__all__ = [
    "PROMPT_FORMATS",
    "BuiltPrompt",
    "ChatTemplateFormat",
    "Exchange",
    "Llama2Format",
    "PromptFormat",
    "RenderedPrompt",
    "Renderer",
    "Speaker",
    "fit_chars",
    "fit_tokens",
    "is_llama2_name",
    "neutralise_control_tags",
    "select_format",
    "speaker_label",
]
