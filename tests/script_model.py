"""A tiny LLaMA whose weights are set by hand so that greedy decoding writes a known text, over and over.

It is a plain LlamaForCausalLM saved and loaded through `from_pretrained`, so the engine runs exactly as with
any model; only its weights are chosen instead of random. Each token of the script has its own basis vector as
embedding; attention and MLP outputs are zeroed so the residual stream carries the last token through; the
output head maps each script token to the next one (a bigram machine). Every token outside the script maps to
the script's first token, so whatever the prompt, the answer is the script repeated until max_new_tokens.
That needs the script's tokens to be distinct, which `build_script_llama` checks.
"""

from __future__ import annotations

from pathlib import Path

from model_fixtures import llama2_tokenizer_dir

HIDDEN = 64
# Scripts the tests use: code with fences (long answers, splitting) and text that would ping (mention safety).
CODE_SCRIPT = "```python\nprint(42)``` Then more words, said the model."
PING_SCRIPT = "Hi @everyone and <@&1234567890> look!"
LOGIT = 10.0


def script_tokens(script: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama2_tokenizer_dir())
    return tokenizer.encode(script, add_special_tokens=False)


def build_script_llama(target: Path, script: str, *, max_positions: int = 4096, then_eos: bool = False) -> Path:
    """`then_eos`: the script's last token is followed by end-of-sequence instead of the script's first token."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(llama2_tokenizer_dir())
    ids = tokenizer.encode(script, add_special_tokens=False)
    if len(set(ids)) != len(ids) or len(ids) >= HIDDEN:
        raise ValueError(f"script tokens must be distinct and fewer than {HIDDEN}: {ids}")
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    entry = HIDDEN - 1  # the direction of every token outside the script
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed.zero_()
        embed[:, entry] = 1.0
        head = model.lm_head.weight
        head.zero_()
        head[ids[0], entry] = LOGIT
        for position, token in enumerate(ids):
            embed[token].zero_()
            embed[token, position] = 1.0
            head[ids[(position + 1) % len(ids)], position] = LOGIT
        if then_eos:
            last = len(ids) - 1
            head[ids[0], last] = 0.0
            head[tokenizer.eos_token_id, last] = LOGIT
    model.generation_config.pad_token_id = tokenizer.unk_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def expected_answer(script: str, max_new_tokens: int) -> str:
    """The text the script model writes in `max_new_tokens` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama2_tokenizer_dir())
    ids = tokenizer.encode(script, add_special_tokens=False)
    generated = [ids[i % len(ids)] for i in range(max_new_tokens)]
    return tokenizer.decode(generated)
