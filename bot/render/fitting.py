"""Fitting a conversation into the context window: the oldest whole exchanges go first.

By tokens when there is a tokenizer (`fit_tokens`), by a cautious guess from characters when the prompt goes to a
server as messages and no tokenizer is at hand (`fit_chars`). The system prompt and the newest message always stay;
PromptTooLongError when even those two alone do not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from bot.errors import PromptTooLongError
from bot.render.formats import Exchange, Llama2Format, PromptFormat

log = logging.getLogger(__name__)

# Without a tokenizer the budget is guessed from characters; 3 per token errs on the short side for most text.
CHARS_PER_TOKEN_GUESS = 3


@dataclass(frozen=True)
class BuiltPrompt:
    token_ids: list[int]
    kept_exchanges: int
    dropped_exchanges: int


def fit_tokens(
    fmt: PromptFormat,
    system_prompt: str | None,
    history: Sequence[Exchange],
    user_message: str,
    *,
    context_length: int,
    max_new_tokens: int,
    answer_start: str = "",
) -> BuiltPrompt:
    """Encode the conversation so that prompt + max_new_tokens <= context_length.

    The oldest whole exchanges go first; the system prompt and the newest message (with `answer_start`, the
    answer being continued) always stay. Raises PromptTooLongError when even those alone do not fit.
    """
    budget = _budget(context_length, max_new_tokens)
    if isinstance(fmt, Llama2Format):
        ids, dropped = _fit_llama2(fmt, system_prompt, history, user_message, budget, answer_start)
    else:
        ids, dropped = _fit_generic(fmt, system_prompt, history, user_message, budget, answer_start)
    if dropped:
        log.debug("dropped %s of %s exchanges to fit %s prompt tokens", dropped, len(history), budget)
    return BuiltPrompt(token_ids=ids, kept_exchanges=len(history) - dropped, dropped_exchanges=dropped)


def _fit_llama2(
    fmt: Llama2Format,
    system_prompt: str | None,
    history: Sequence[Exchange],
    user_message: str,
    budget: int,
    answer_start: str,
) -> tuple[list[int], int]:
    # Meta encodes each exchange on its own, so lengths add up: encode every exchange once, then only
    # re-encode the one that becomes first (it carries the system prompt) for each candidate cut.
    n = len(history)
    plain = [fmt.exchange_ids(exchange) for exchange in history]
    open_plain = fmt.open_turn_ids(user_message, answer_start=answer_start)
    suffix = [0] * (n + 1)  # suffix[k]: tokens of plain exchanges k..n-1
    for k in range(n - 1, -1, -1):
        suffix[k] = suffix[k + 1] + len(plain[k])
    for k in range(n):
        # Exchange k itself adds at least one token, so a cut whose remainder alone overflows can't fit.
        if suffix[k + 1] + len(open_plain) >= budget:
            continue
        first = fmt.exchange_ids(history[k], system_prompt) if system_prompt else plain[k]
        if len(first) + suffix[k + 1] + len(open_plain) <= budget:
            ids = [*first, *(t for ex in plain[k + 1 :] for t in ex), *open_plain]
            return ids, k
    open_sys = fmt.open_turn_ids(user_message, system_prompt, answer_start) if system_prompt else open_plain
    if len(open_sys) > budget:
        raise _too_long(len(open_plain), len(open_sys), budget)
    return open_sys, n


def _fit_generic(
    fmt: PromptFormat,
    system_prompt: str | None,
    history: Sequence[Exchange],
    user_message: str,
    budget: int,
    answer_start: str,
) -> tuple[list[int], int]:
    # Templates may join turns in ways that don't add up, so re-encode; the length falls as exchanges
    # are dropped, so binary search for the fewest drops that fit.
    n = len(history)
    full = fmt.encode(system_prompt, history, user_message, answer_start)
    if len(full) <= budget:
        return full, 0
    alone = fmt.encode(system_prompt, (), user_message, answer_start)
    if len(alone) > budget:
        open_plain = fmt.encode(None, (), user_message, answer_start)
        raise _too_long(len(open_plain), len(alone), budget)
    best, best_k = alone, n
    lo, hi = 1, n - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = fmt.encode(system_prompt, history[mid:], user_message, answer_start)
        if len(ids) <= budget:
            best, best_k = ids, mid
            hi = mid - 1
        else:
            lo = mid + 1
    return best, best_k


def _budget(context_length: int, max_new_tokens: int) -> int:
    if max_new_tokens < 0 or context_length <= max_new_tokens:
        raise ValueError(f"context_length ({context_length}) must be larger than max_new_tokens ({max_new_tokens})")
    return context_length - max_new_tokens


def _too_long(message_tokens: int, with_system_tokens: int, budget: int) -> PromptTooLongError:
    # The limit is what the message's turn may take once the system prompt has its share, so
    # message_tokens > limit_tokens holds exactly when the prompt does not fit.
    # Clamped at 0 for a system prompt that alone overflows (a configuration problem, logged).
    system_share = with_system_tokens - message_tokens
    limit = budget - system_share
    if limit <= 0:
        log.warning("the system prompt alone takes %s of %s prompt tokens", system_share, budget)
    return PromptTooLongError(message_tokens=message_tokens, limit_tokens=max(0, limit))


def fit_chars(
    system_prompt: str | None,
    history: Sequence[Exchange],
    user_message: str,
    *,
    context_length: int,
    max_new_tokens: int,
    answer_start: str = "",
) -> int:
    """How many of the oldest exchanges to leave out so that the guessed token count fits the budget."""
    budget = _budget(context_length, max_new_tokens)

    def guess(chars: int) -> int:
        return -(-chars // CHARS_PER_TOKEN_GUESS)

    used = guess(len(system_prompt or "") + len(user_message) + len(answer_start))
    if used > budget:
        raise PromptTooLongError(guess(len(user_message)), max(0, budget - guess(len(system_prompt or ""))))
    keep = len(history)
    while keep > 0:
        cost = guess(len(history[keep - 1].user) + len(history[keep - 1].assistant))
        if used + cost > budget:
            break
        used += cost
        keep -= 1
    return keep
