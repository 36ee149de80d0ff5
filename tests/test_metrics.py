"""The operator's figures (bot/metrics.py): the one-minute token rate, token counting for each engine kind, and the
Prometheus endpoint scraped over real HTTP."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from fake_openai import FakeOpenAIServer

from bot.config import settings_from_mapping
from bot.core import build_engine
from bot.engine import (
    ChatMessage,
    GenerationRequest,
    LocalEngine,
    MessagePrompt,
    RemoteEngine,
    SamplingParams,
    TokenPrompt,
)
from bot.history import HistoryStore
from bot.metrics import BotMetrics, PrometheusEndpoint, TokenRate, prometheus_endpoint

PROMPT = (1, 518, 25580, 29962, 22172, 518, 29914, 25580, 29962)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAIServer]:
    server = FakeOpenAIServer()
    await server.start()
    yield server
    await server.stop()


def request(max_new_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(TokenPrompt(PROMPT), sampling=SamplingParams(max_new_tokens=max_new_tokens))


def chat_request() -> GenerationRequest:
    return GenerationRequest(MessagePrompt((ChatMessage("user", "hi"),)), sampling=SamplingParams(max_new_tokens=8))


def test_token_rate_covers_the_last_minute_only() -> None:
    rate = TokenRate(window_s=60)
    assert rate.per_second() == 0.0
    rate.observe(0.0, 0)
    rate.observe(10.0, 500)
    assert rate.per_second() == 50.0
    rate.observe(60.0, 600)
    assert rate.per_second() == 10.0  # 600 tokens over the first minute
    # A quiet minute later, the burst has left the window.
    rate.observe(100.0, 600)
    rate.observe(130.0, 600)
    assert rate.per_second() == pytest.approx(0.0)
    rate.observe(131.0, 660)
    assert 0 < rate.per_second() < 60


async def test_the_remote_engine_counts_streamed_tokens_and_the_figures_show_them(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    settings = settings_from_mapping(
        {"model": {"name": "/nonexistent/fake-model", "backend": "openai", "base_url": fake.base_url,
                   "context_length": 2048}}
    )  # fmt: skip
    clock = FakeClock()
    engine = build_engine(settings)
    assert isinstance(engine, RemoteEngine)
    async with HistoryStore(tmp_path / "data") as store, engine:
        metrics = BotMetrics(settings=settings, engine=engine, store=store, clock=clock)
        metrics.sample()
        clock.now += 3
        deltas = [d async for d in engine.generate(chat_request())]
        assert deltas == ["Hello", " there", "!"]
        clock.now += 3
        f = metrics.figures()
    assert f.tokens_generated == 3 and f.requests == 1
    assert f.tokens_per_second == pytest.approx(3 / 6)
    assert f.backend == f"openai ({fake.base_url})"
    assert f.model == "/nonexistent/fake-model"
    assert f.device == "model server"
    assert (f.waiting, f.running, f.sessions_stored) == (0, 0, 0)
    assert f.uptime_s == pytest.approx(6)
    assert f.version == "0.1.0"
    assert f.gpus == ()  # no CUDA on this machine


async def test_a_local_engine_counts_its_own_tokens(tiny_llama_dir: Path, tmp_path: Path) -> None:
    settings = settings_from_mapping(
        {"model": {"name": str(tiny_llama_dir), "device_map": "cpu", "temperature": 0, "max_new_tokens": 12}}
    )
    engine = build_engine(settings)
    assert isinstance(engine, LocalEngine)
    async with HistoryStore(tmp_path / "data") as store, engine:
        deltas = [d async for d in engine.generate(request(max_new_tokens=12))]
        metrics = BotMetrics(settings=settings, engine=engine, store=store)
        f = metrics.figures()
    assert 0 < len(deltas) <= engine.stats.tokens_generated <= 12
    assert engine.stats.requests == 1
    assert f.tokens_generated == engine.stats.tokens_generated
    assert (f.device, f.dtype) == ("cpu", "float32")
    assert f.backend == "local"


async def test_prometheus_endpoint_serves_the_same_figures(fake: FakeOpenAIServer, tmp_path: Path) -> None:
    port = free_port()
    settings = settings_from_mapping(
        {
            "model": {"name": "/nonexistent/fake-model", "backend": "openai", "base_url": fake.base_url,
                      "context_length": 2048},
            "metrics": {"prometheus_port": port},
        }
    )  # fmt: skip
    engine = build_engine(settings)
    async with HistoryStore(tmp_path / "data") as store, engine:
        metrics = BotMetrics(settings=settings, engine=engine, store=store)
        _ = [d async for d in engine.generate(chat_request())]
        async with (
            prometheus_endpoint(settings, metrics) as endpoint,
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            assert isinstance(endpoint, PrometheusEndpoint) and endpoint.port == port
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples["llama_discord_tokens_generated_total"]) == 3
    assert float(samples["llama_discord_requests_total"]) == 1
    assert float(samples["llama_discord_queue_waiting"]) == 0
    assert float(samples["llama_discord_running_requests"]) == 0
    assert float(samples["llama_discord_sessions_stored"]) == 0
    assert float(samples["llama_discord_uptime_seconds"]) >= 0
    assert "llama_discord_tokens_per_second" in samples
    (info,) = [key for key in samples if key.startswith("llama_discord_build_info{")]
    assert 'version="0.1.0"' in info and f'backend="openai ({fake.base_url})"' in info


async def test_prometheus_port_0_is_off(tmp_path: Path) -> None:
    settings = settings_from_mapping({})
    assert settings.metrics.prometheus_port == 0
    async with HistoryStore(tmp_path / "data") as store:
        metrics = BotMetrics(settings=settings, engine=build_engine(settings), store=store)
        async with prometheus_endpoint(settings, metrics) as endpoint:
            assert endpoint is None
