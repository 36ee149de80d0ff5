"""A prompt's token IDs as text, for servers that take only text prompts (transformers serve, TGI)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def prompt_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], tokenizer_adds_bos: bool) -> str:
    """Text that the server's tokenizer turns back into `ids`, for servers that take no token IDs.

    Each run between special tokens is decoded on its own and the special tokens are written as their text, so
    "</s><s>[INST]" comes back as those three tokens (decoding the whole list puts a space after "<s>" that
    re-encodes as an extra token). The leading BOS is left out when the tokenizer adds it itself. The one thing
    text cannot carry: a user who typed "<s>" literally gets a real BOS on such servers (never with token IDs).
    """
    # transformers annotates these str | list[str] without overloads: one ID gives one token, a flat list one string.
    special = {i: cast(str, tokenizer.convert_ids_to_tokens(i)) for i in tokenizer.all_special_ids}
    body = list(ids)
    if tokenizer_adds_bos and body and body[0] == tokenizer.bos_token_id:
        body = body[1:]
    parts: list[str] = []
    run: list[int] = []
    for token in body:
        if token in special:
            if run:
                parts.append(cast(str, tokenizer.decode(run)))
                run = []
            parts.append(special[token])
        else:
            run.append(token)
    if run:
        parts.append(cast(str, tokenizer.decode(run)))
    text = "".join(parts)
    if log.isEnabledFor(logging.DEBUG) and tokenizer(text)["input_ids"] != list(ids):
        log.debug("the text prompt re-tokenizes differently from the token IDs")
    return text


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether plain `tokenizer(text)` puts BOS in front, as a text-only server's tokenization then does."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
