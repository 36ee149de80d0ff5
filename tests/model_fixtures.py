"""Builds the models the tests run: a tiny random LLaMA, and the cached SmolLM2-135M (bot/smollm2.py)."""

from __future__ import annotations

import os
from pathlib import Path

from bot.smollm2 import ensure_smollm2, smollm2_cache_dir

__all__ = ["build_tiny_llama", "ensure_smollm2", "llama2_tokenizer_dir", "smollm2_cache_dir"]

REPO = Path(__file__).resolve().parents[1]


def llama2_tokenizer_dir() -> Path:
    """The LLaMA-2 tokenizer checked out beside the project (or where LLAMA2_TOKENIZER_DIR points)."""
    env = os.environ.get("LLAMA2_TOKENIZER_DIR")
    candidates = [Path(env)] if env else [REPO / "../shared/llama2-tokenizer", REPO / "shared/llama2-tokenizer"]
    path = next((c for c in candidates if (c / "tokenizer.model").is_file()), candidates[0])
    if not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(
            f"LLaMA-2 tokenizer not found at {path}: set LLAMA2_TOKENIZER_DIR to a folder holding tokenizer.model"
        )
    return path.resolve()


def build_tiny_llama(target: Path, *, seed: int = 1234, key_value_heads: int = 4) -> Path:
    """Save a 2-layer random-weight LLaMA with the real LLaMA-2 tokenizer into `target`; with `key_value_heads` < 4,
    its attention is grouped (GQA, as in SmolLM2 and LLaMA-2-70B)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(llama2_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=key_value_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # A wide initialisation gives peaked, varied next-token choices; the default 0.02 makes a random model
        # repeat one token forever.
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Random weights would end some answers on EOS at once; a zero row gives EOS a logit of 0, far below
        # the best of 32,000 random logits, so answers run to max_new_tokens.
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.generation_config.pad_token_id = tokenizer.unk_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
