"""Models the benchmark runs: SmolLM2-135M-Instruct (bot/smollm2.py fetches it), LLaMA-2-7B shapes at random."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import ModelSettings, Quantization
from bot.engine.local.loading import model_load_kwargs
from bot.smollm2 import SMOLLM2_FOLDER, ensure_smollm2

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def llama2_tokenizer_dir() -> Path:
    """The LLaMA-2 tokenizer checked out beside the project (or where LLAMA2_TOKENIZER_DIR points)."""
    env = os.environ.get("LLAMA2_TOKENIZER_DIR")
    root = Path(__file__).resolve().parents[1]
    candidates = [Path(env)] if env else [root / "../shared/llama2-tokenizer", root / "shared/llama2-tokenizer"]
    path = next((c for c in candidates if (c / "tokenizer.model").is_file()), candidates[0])
    if not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(
            f"LLaMA-2 tokenizer not found at {path}: set LLAMA2_TOKENIZER_DIR to a folder holding tokenizer.model"
        )
    return path.resolve()


@dataclass(frozen=True)
class ModelChoice:
    """Which model the benchmark runs, picklable: the baseline's process loads the same one."""

    folder: Path | None  # None: SmolLM2-135M-Instruct
    llama2_7b_shape: bool
    dtype: str
    device: str
    quantization: Quantization = "none"  # [model] quantization: "int8" for torchao's int8 weights

    @property
    def name(self) -> str:
        if self.llama2_7b_shape:
            return "random LLaMA-2-7B shapes"
        return self.folder.name if self.folder else SMOLLM2_FOLDER


def load_model(choice: ModelChoice) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if choice.llama2_7b_shape:
        return random_llama2_7b(llama2_tokenizer_dir(), dtype=choice.dtype, device=choice.device)
    folder = choice.folder or ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # The bot's own loading arguments, so the benchmark quantizes as the bot does.
    settings = ModelSettings(
        name=str(folder), dtype=choice.dtype, device_map=choice.device, quantization=choice.quantization
    )
    model = AutoModelForCausalLM.from_pretrained(folder, **model_load_kwargs(settings))
    return model.eval(), tokenizer


def random_llama2_7b(
    tokenizer_dir: Path, *, dtype: str, device: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-weight model with LLaMA-2-7B's exact shapes, built on `device` (no download, nothing saved)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    with torch.no_grad():
        # Random weights could end answers on EOS at any step; a zero row keeps every answer at max_new_tokens.
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    return model, tokenizer
