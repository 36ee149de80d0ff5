"""The load test at the size issue 5 asks for: 200 users in 50 channels and threads send 1,000 messages in
bursts. Figures print with `pytest -s` and go into the test report (record_property)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from load_test import LoadShape, run_load

from bot.admission import UserBusyError
from bot.errors import QueueFullError

pytestmark = pytest.mark.load

# Far above what the bot needs (a few MiB of messages, history and Discord state); a leak that keeps every
# prompt, stream or message would pass it.
RSS_GROWTH_LIMIT_MIB = 512


async def test_1000_messages_from_200_users_each_get_one_answer_or_one_refusal(
    tiny_llama_dir: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    shape = LoadShape(users=200, places=50, messages=1000, bursts=10, max_new_tokens=8, max_queue=16)
    figures = await run_load(tiny_llama_dir, tmp_path / "data", shape)
    print("\n" + figures.table())
    for name, value in figures.properties().items():
        record_property(name, value)

    assert figures.problems == [], figures.problems[:20]
    assert figures.lost == 0
    assert figures.answered + figures.refused == figures.messages == 1000
    assert figures.answered > 0
    # A refusal is one of the clear sentences for a full queue or a user whose previous answer is still running.
    assert set(figures.refusals) <= {QueueFullError.user_message, UserBusyError.user_message}, figures.refusals
    assert figures.peak_rss_mib - figures.rss_before_mib < RSS_GROWTH_LIMIT_MIB
