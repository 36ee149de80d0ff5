"""Continue (issue 11): an answer cut at max_new_tokens goes on in the same assistant turn. The engines' finish
reasons, the continuation prompt of each format by its exact token IDs, and the button end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from discord_harness import StartBot, World, channel_place, finished_session, mention
from fake_openai import FakeOpenAIServer, Reply
from test_conversation import answered, button_ids
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.config import ModelSettings
from bot.engine import (
    ChatMessage,
    GenerationRequest,
    LocalEngine,
    MessagePrompt,
    RemoteEngine,
    RetryPolicy,
    SamplingParams,
    TokenPrompt,
)
from bot.engine.base import FinishReason
from bot.render import ChatTemplateFormat, Exchange, Llama2Format, Renderer
from bot.reply_stream import STREAMING_MARK
from bot.sessions import Place, Session, StoredMessage, new_session_id, utc_now_iso
from cogs.answer_actions import CONTINUED

QUESTION = "Tell me a long story about dragons."


async def run(engine: Any, prompt: TokenPrompt | MessagePrompt, max_new_tokens: int) -> tuple[str, list[str]]:
    """The answer's text and the finish reasons the engine reported."""
    reasons: list[FinishReason] = []
    request = GenerationRequest(prompt, SamplingParams(max_new_tokens=max_new_tokens), on_finish=reasons.append)
    text = "".join([delta async for delta in engine.generate(request)])
    return text, list(reasons)


@pytest.fixture(scope="module")
def greedy_ids(tiny_llama_dir: Path) -> tuple[tuple[int, ...], list[int]]:
    """A prompt and the tiny model's first 16 greedy answer tokens, by model.generate alone."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompt = tuple(tokenizer(QUESTION).input_ids)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    return prompt, out[0, len(prompt) :].tolist()


async def test_a_continued_answer_reads_on_exactly_from_where_it_was_cut(
    tiny_llama_dir: Path, greedy_ids: tuple[tuple[int, ...], list[int]]
) -> None:
    prompt, answer = greedy_ids
    settings = ModelSettings(name=str(tiny_llama_dir), dtype="float32", device_map="cpu")
    async with LocalEngine(settings) as engine:
        whole, whole_end = await run(engine, TokenPrompt(prompt), 16)
        first, first_end = await run(engine, TokenPrompt(prompt), 8)
        rest, rest_end = await run(engine, TokenPrompt(prompt + tuple(answer[:8]), continues_answer=True), 8)
        plain_rest, _ = await run(engine, TokenPrompt(prompt + tuple(answer[:8])), 8)
    assert first_end == rest_end == whole_end == ["length"]
    # The continuation is decoded after the prompt's last tokens: its first word keeps the space before it, so the
    # two parts make the answer that was never cut.
    assert first + rest == whole
    assert rest.lstrip() == plain_rest.lstrip()


async def test_the_remote_engine_reports_how_the_answer_ended_and_asks_the_server_to_go_on() -> None:
    fake = FakeOpenAIServer()
    await fake.start()
    try:
        settings = ModelSettings(
            name="/nonexistent/fake-model", backend="openai", base_url=(fake.base_url,), context_length=2048
        )
        async with RemoteEngine(settings, api_key=None, retry=RetryPolicy(attempts=2, base_delay=0.01)) as engine:
            fake.script.extend([Reply(("a", "b"), finish="length"), Reply((" on",), finish="stop")])
            question = (ChatMessage("user", "hi"),)
            cut = await run(engine, MessagePrompt(question), 2)
            went_on = await run(engine, MessagePrompt((*question, ChatMessage("assistant", "ab"))), 2)
    finally:
        await fake.stop()
    assert cut == ("ab", ["length"]) and went_on == (" on", ["stop"])
    assert "continue_final_message" not in fake.bodies[0]
    assert fake.bodies[1]["messages"][-1] == {"role": "assistant", "content": "ab"}
    assert fake.bodies[1]["continue_final_message"] is True and fake.bodies[1]["add_generation_prompt"] is False


def one_exchange(system_prompt: str | None) -> Session:
    """A session of one finished exchange, before the turn being continued."""
    now = utc_now_iso()
    return Session(
        id=new_session_id(),
        place=Place(kind="dm", user_id=1),
        owner_id=1,
        title="t",
        created_at=now,
        updated_at=now,
        system_prompt=system_prompt,
        messages=(
            StoredMessage(role="user", content="earlier", author_id=1, created_at=now),
            StoredMessage(role="assistant", content="an earlier answer", author_id=None, created_at=now),
        ),
    )


def test_the_llama2_continuation_prompt_is_metas_exchange_up_to_the_answers_last_word(tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    fmt = Llama2Format(tokenizer)
    renderer = Renderer(fmt=fmt, as_messages=False, context_length=4096, max_new_tokens=64)
    before = one_exchange("Be brief.")
    rendered = renderer.render(before, QUESTION, answer_start=" Once upon a time ")
    bos = tokenizer.bos_token_id
    first = [
        bos,
        *tokenizer.encode(
            "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nearlier [/INST] an earlier answer ", add_special_tokens=False
        ),
        tokenizer.eos_token_id,
    ]
    last = [bos, *tokenizer.encode(f"[INST] {QUESTION} [/INST] Once upon a time", add_special_tokens=False)]
    assert isinstance(rendered.prompt, TokenPrompt) and rendered.prompt.continues_answer
    assert list(rendered.prompt.ids) == first + last
    # A plain turn is the same prompt without the answer's start, and does not continue anything.
    plain = renderer.render(before, QUESTION)
    assert isinstance(plain.prompt, TokenPrompt) and not plain.prompt.continues_answer
    open_turn = tokenizer.encode(f"[INST] {QUESTION} [/INST]", add_special_tokens=False)
    assert list(plain.prompt.ids) == [*first, bos, *open_turn]


def test_a_chat_template_continuation_leaves_the_answer_open(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    fmt = ChatTemplateFormat(tokenizer)
    ids = fmt.encode(None, [Exchange("hi", "hello")], QUESTION, answer_start="Once upon a time")
    text = tokenizer.decode(ids)
    assert text.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\nOnce upon a time")
    # The answer's turn is neither closed nor opened a second time.
    assert text.count("<|im_start|>assistant") == 2
    messages = Renderer(fmt=fmt, as_messages=True, context_length=2048, max_new_tokens=64).render(
        one_exchange(None), QUESTION, answer_start="Once"
    )
    assert isinstance(messages.prompt, MessagePrompt) and messages.prompt.continues_answer
    assert messages.prompt.messages[-1] == ChatMessage("assistant", "Once")


# --- the button, end to end -----------------------------------------------------------------------------------


async def continuation_of(world: World, answer: dict[str, Any]) -> dict[str, Any]:
    """The bot's finished message that continues `answer` (a reply to it)."""
    return await world.emu.wait_for(
        lambda: next(
            (
                m
                for m in world.emu.bot_messages_in(world.general)
                if m.get("message_reference", {}).get("message_id") == answer["id"]
                and not m["content"].endswith(STREAMING_MARK)
                and button_ids(m)
            ),
            None,
        ),
        60,
        "the continued answer",
    )


async def test_continue_goes_on_with_the_same_answer_even_after_a_restart(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(model={"max_new_tokens": 6}) as bot:
        asked = await mention(world, world.general, world.alice, QUESTION)
        first = await answered(world, bot, world.general, asked, 1)
        before = await finished_session(bot, channel_place(world, world.general))
    continue_id = f"answer:continue:{before.id}:{asked['id']}"
    assert button_ids(first) == {f"answer:regenerate:{before.id}:{asked['id']}": False, continue_id: False}
    cut = before.messages[1].content

    async with start_bot(model={"max_new_tokens": 6}) as bot:  # the button's custom id says it all
        handle = await emu.click_button(first, world.alice, continue_id)
        more = await continuation_of(world, first)
        after = await finished_session(bot, channel_place(world, world.general))
        # What the model was given: the same turn, its answer left open after the part already written.
        tokenizer = bot.core.engine.tokenizer
        expected = Llama2Format(tokenizer).open_turn_ids(QUESTION, "Be brief.", cut)
        went_on, ending = await run(bot.core.engine, TokenPrompt(tuple(expected), continues_answer=True), 6)
    assert handle.response_type == 7  # the click edits the cut message: its buttons move to the new part
    assert button_ids(emu.message(world.general, first["id"])) == {}
    assert emu.message(world.general, first["id"])["content"] == first["content"]
    # History keeps one exchange, the answer now both parts; Discord shows the new part below the first.
    assert [m.role for m in after.messages] == ["user", "assistant"]
    assert after.messages[0].content == QUESTION
    assert after.messages[1].content == (cut + went_on).strip()
    assert more["content"] == (CONTINUED + went_on).strip()
    assert after.messages[1].discord_message_id == int(more["id"])
    new_ids = {f"answer:regenerate:{before.id}:{asked['id']}": False}
    if ending == ["length"]:
        new_ids[continue_id] = False
    assert button_ids(more) == new_ids


async def test_continue_on_an_older_answer_turns_itself_off(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(model={"max_new_tokens": 6}) as bot:
        asked = await mention(world, world.general, world.alice, "one")
        first = await answered(world, bot, world.general, asked, 1)
        later = await mention(world, world.general, world.alice, "two")
        await answered(world, bot, world.general, later, 2)
        session = await finished_session(bot, channel_place(world, world.general), turns=2)
        continue_id = f"answer:continue:{session.id}:{asked['id']}"
        handle = await emu.click_button(emu.message(world.general, first["id"]), world.alice, continue_id)
        await emu.wait_for(lambda: handle.followups(), 30, "the sentence")
        unchanged = await bot.core.store.get(session.id)
    assert button_ids(emu.message(world.general, first["id"]))[continue_id] is True
    assert handle.followups()[0]["content"] == "Only the latest answer of a conversation can be continued."
    assert unchanged is not None and unchanged.messages == session.messages


async def test_only_the_asker_or_a_moderator_continues_an_answer(world: World, start_bot: StartBot) -> None:
    emu = world.emu
    async with start_bot(model={"max_new_tokens": 6}) as bot:
        asked = await mention(world, world.general, world.alice, QUESTION)
        first = await answered(world, bot, world.general, asked, 1)
        session = await finished_session(bot, channel_place(world, world.general))
        handle = await emu.click_button(first, world.bob, f"answer:continue:{session.id}:{asked['id']}")
        await emu.wait_for_response(handle)
        unchanged = await bot.core.store.get(session.id)
    assert handle.ephemeral and "Only the person who asked" in handle.response_data["content"]
    assert unchanged is not None and unchanged.messages == session.messages
