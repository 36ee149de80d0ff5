"""The benchmark's peer client (bench/peers.py) against the scripted OpenAI server, and the table it feeds.

The peers themselves (llama.cpp, vLLM) stay out of CI: these check what we send them and how we read them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from fake_openai import FakeOpenAIServer, Reply, Status

from bench.limits import probe
from bench.peers import Peer, parse_peer
from bench.results import Results, median_rows, print_table


class WordTokenizer:
    """Enough of a tokenizer for the client: one token per word; ids decode as w<id>."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(range(len(text.split())))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(f"w{i}" for i in ids)


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    fake = FakeOpenAIServer(models=[{"id": "smol", "object": "model"}])
    await fake.start()
    yield fake
    await fake.stop()


async def peer_for(server: FakeOpenAIServer, http: aiohttp.ClientSession) -> Peer:
    peer = Peer(parse_peer(f"fake={server.base_url}"), WordTokenizer(), http)  # type: ignore[arg-type]
    await peer.start()
    return peer


def test_parse_peer() -> None:
    assert parse_peer("llama.cpp=http://127.0.0.1:8080").url == "http://127.0.0.1:8080/v1"
    assert parse_peer("vllm=http://h:8000/v1/").url == "http://h:8000/v1"
    with pytest.raises(ValueError, match="NAME=http"):
        parse_peer("http://127.0.0.1:8080")


async def test_streamed_greedy_token_prompt(server: FakeOpenAIServer) -> None:
    server.script.append(Reply(("Paris", " is", " the capital"), delay=0.01))
    async with aiohttp.ClientSession() as http:
        peer = await peer_for(server, http)
        answer = await peer.answer([1, 2, 3], 16, session_id="ignored")
    assert answer.text == "Paris is the capital"
    assert answer.tokens == 4  # no usage in the stream: counted with our tokenizer
    assert 0 < answer.first_token_s < answer.seconds
    body = server.bodies[-1]
    assert server.paths[-1] == "/v1/completions"
    assert body["model"] == "smol"
    assert body["prompt"] == [1, 2, 3]  # token IDs, exactly what our engine gets
    assert body["temperature"] == 0.0 and body["stream"] is True and body["max_tokens"] == 16
    assert "min_tokens" not in body and "ignore_eos" not in body


async def test_held_length_and_refused_fields(server: FakeOpenAIServer) -> None:
    server.refuses = frozenset({"min_tokens"})
    async with aiohttp.ClientSession() as http:
        peer = await peer_for(server, http)
        await peer.answer([5], 8, min_new_tokens=8)
        await peer.answer([5], 8, min_new_tokens=8)
    refused, retried, later = server.bodies[-3:]
    assert refused["min_tokens"] == 8 and refused["ignore_eos"] is True
    assert "min_tokens" not in retried and retried["ignore_eos"] is True
    assert "min_tokens" not in later  # remembered for the rest of the run
    assert len(server.bodies) == 3  # one refused, then two answered
    assert peer.refused == {"min_tokens"}


async def test_text_prompt_when_token_ids_are_refused(server: FakeOpenAIServer) -> None:
    server.script.append(Status(422, body='{"detail": "prompt must be a string"}'))
    async with aiohttp.ClientSession() as http:
        peer = await peer_for(server, http)
        answer = await peer.answer([7, 8], 4)
    assert answer.text == "Hello there!"
    assert server.bodies[-2]["prompt"] == [7, 8]
    assert server.bodies[-1]["prompt"] == "w7 w8"


async def test_a_refusal_nothing_cures_is_raised(server: FakeOpenAIServer) -> None:
    server.script.append(Status(500))
    async with aiohttp.ClientSession() as http:
        peer = await peer_for(server, http)
        with pytest.raises(RuntimeError, match="HTTP 500"):
            await peer.answer([1], 4)


def test_table_prints_peer_columns_and_medians(capsys: pytest.CaptureFixture[str]) -> None:
    runs = []
    for ours, theirs in ((20.0, 40.0), (24.0, 40.0), (22.0, 44.0)):
        res = Results()
        res.add(
            "1: one chat alone",
            "decode tokens/s",
            f"{ours:.1f} (40%)",
            peers={"llama.cpp": (f"{theirs:.1f} (80%)", f"{ours / theirs:.2f}x")},
        )
        runs.append(res)
    row = median_rows(runs).rows[0]
    assert row.ours == "22.00 (40%)"
    assert row.peers["llama.cpp"] == ("40.00 (80%)", "0.50x (0.50-0.60)")
    print_table(median_rows(runs), "title")
    out = capsys.readouterr().out
    assert "| llama.cpp " in out and "ours/llama.cpp" in out


def test_memory_limit_probe() -> None:
    import torch

    limits = probe(8 * 2**20, "float32", torch.get_num_threads(), reps=2)
    assert limits.read_gb_s > 0.1 and limits.gflops > 0.1
    assert 0 < limits.step_s(1) <= limits.step_s(16)
    assert limits.share(limits.tokens_per_s(1) / 2, 1) == "50%"
