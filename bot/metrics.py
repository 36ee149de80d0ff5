"""The operator's figures (/status and Prometheus): model, device, load, speed, sessions, uptime. No Discord here.

Tokens per second come from samples of the engine's running token count, taken about once a second by
`BotMetrics.run` and read over a sliding one-minute window, so reading the figures costs no model work.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bot.engine import Engine, LocalEngine
from bot.errors import ConfigError

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.history import HistoryStore
    from bot.personas import PersonaStore

log = logging.getLogger(__name__)

WINDOW_S = 60.0
DISTRIBUTION = "llama-discord"
METRICS_EXTRA_HINT = "pip install 'llama-discord[metrics]'"


@dataclass(frozen=True)
class GpuMemory:
    device: str
    allocated_bytes: int  # tensors of this process
    reserved_bytes: int  # held by this process's CUDA caching allocator
    total_bytes: int


@dataclass(frozen=True)
class StatusFigures:
    backend: str
    model: str
    device: str
    dtype: str
    gpus: tuple[GpuMemory, ...]  # empty: no CUDA here, the model (if local) runs on the CPU
    waiting: int
    running: int
    tokens_per_second: float  # over the last minute (less just after start-up)
    tokens_generated: int
    requests: int
    sessions_stored: int
    personas: int  # set with /persona, channels and servers together
    uptime_s: float
    version: str


class TokenRate:
    """Tokens per second over a sliding window, from timed samples of a running total."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def observe(self, now: float, total: int) -> None:
        self._samples.append((now, total))
        # Keep one sample at or before the window's start, so the rate spans the whole window.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def per_second(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class BotMetrics:
    """Computes the status figures from the core parts; `run()` samples the token count in the background."""

    def __init__(
        self,
        *,
        settings: Settings,
        engine: Engine,
        store: HistoryStore,
        personas: PersonaStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = WINDOW_S,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.personas = personas
        self._clock = clock
        self._started = clock()
        self._rate = TokenRate(window_s)
        self.version = package_version()

    def sample(self) -> None:
        self._rate.observe(self._clock(), self.engine.stats.tokens_generated)

    async def run(self, interval_s: float = 1.0) -> None:
        """Sample until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(interval_s)

    def figures(self) -> StatusFigures:
        self.sample()
        engine = self.engine
        stats = engine.stats
        device, dtype = _device_and_dtype(engine)
        return StatusFigures(
            backend=_backend(self.settings),
            model=engine.model_name,
            device=device,
            dtype=dtype,
            gpus=tuple(_gpu_memory()),
            waiting=engine.waiting,
            running=engine.running,
            tokens_per_second=self._rate.per_second(),
            tokens_generated=stats.tokens_generated,
            requests=stats.requests,
            sessions_stored=self.store.session_count,
            personas=self.personas.count if self.personas is not None else 0,
            uptime_s=self._clock() - self._started,
            version=self.version,
        )


def package_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _backend(settings: Settings) -> str:
    m = settings.model
    if m.backend == "openai":
        return f"openai ({', '.join(m.base_url)})"
    return "local" if m.quantization == "none" else f"local ({m.quantization})"


def _device_and_dtype(engine: Engine) -> tuple[str, str]:
    if not isinstance(engine, LocalEngine):
        return "model server", "as the server loaded it"
    try:
        model = engine.model
    except RuntimeError:
        return "not loaded", "-"
    device_map = getattr(model, "hf_device_map", None)
    devices = sorted({str(d) for d in device_map.values()}) if device_map else [str(model.device)]
    return ", ".join(devices), str(model.dtype).removeprefix("torch.")


def _gpu_memory() -> Iterator[GpuMemory]:
    import torch

    if not torch.cuda.is_available():
        return
    for i in range(torch.cuda.device_count()):
        yield GpuMemory(
            device=f"cuda:{i}",
            allocated_bytes=torch.cuda.memory_allocated(i),
            reserved_bytes=torch.cuda.memory_reserved(i),
            total_bytes=torch.cuda.get_device_properties(i).total_memory,
        )


# --- Prometheus -----------------------------------------------------------------------------------------------


def check_prometheus_supported(settings: Settings) -> None:
    """A ConfigError naming `metrics.prometheus_port` when the endpoint is asked for without prometheus-client."""
    if settings.metrics.prometheus_port and importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(
            settings.source or "<config>",
            "metrics.prometheus_port",
            f"needs the prometheus-client package, which is not installed ({METRICS_EXTRA_HINT}); 0 turns it off",
        )


class _Collector:
    """Reads the figures at each scrape (on the event loop: the endpoint is served by aiohttp, not a thread)."""

    def __init__(self, metrics: BotMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        f = self._metrics.figures()
        yield InfoMetricFamily(
            "llama_discord_build",
            "Version, backend, model, device and dtype of this bot",
            value={"version": f.version, "backend": f.backend, "model": f.model, "device": f.device, "dtype": f.dtype},
        )
        yield GaugeMetricFamily("llama_discord_queue_waiting", "Requests waiting for the model", value=f.waiting)
        yield GaugeMetricFamily("llama_discord_running_requests", "Requests being generated now", value=f.running)
        yield GaugeMetricFamily(
            "llama_discord_tokens_per_second", "Answer tokens per second over the last minute", f.tokens_per_second
        )
        yield CounterMetricFamily("llama_discord_tokens_generated", "Answer tokens streamed", f.tokens_generated)
        yield CounterMetricFamily("llama_discord_requests", "Generation requests sent to the engine", f.requests)
        yield GaugeMetricFamily("llama_discord_sessions_stored", "Chat sessions on disk", f.sessions_stored)
        yield GaugeMetricFamily("llama_discord_personas", "Personas set with /persona", f.personas)
        yield GaugeMetricFamily("llama_discord_uptime_seconds", "Seconds since the bot started", f.uptime_s)
        allocated = GaugeMetricFamily(
            "llama_discord_gpu_memory_allocated_bytes", "GPU memory held by this process's tensors", labels=["device"]
        )
        total = GaugeMetricFamily("llama_discord_gpu_memory_total_bytes", "GPU memory of the card", labels=["device"])
        for gpu in f.gpus:
            allocated.add_metric([gpu.device], gpu.allocated_bytes)
            total.add_metric([gpu.device], gpu.total_bytes)
        yield allocated
        yield total


class PrometheusEndpoint:
    """`GET /metrics` in Prometheus's text format on `host:port` (port 0: any free port, see `.port`)."""

    def __init__(self, metrics: BotMetrics, *, port: int, host: str = "127.0.0.1") -> None:
        self._metrics = metrics
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        self._registry: Any = None

    async def start(self) -> None:
        from prometheus_client import CollectorRegistry

        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self._metrics))
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]
        log.info("Prometheus metrics on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> PrometheusEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


@contextlib.asynccontextmanager
async def prometheus_endpoint(settings: Settings, metrics: BotMetrics) -> AsyncIterator[PrometheusEndpoint | None]:
    """The endpoint `[metrics]` asks for, for the duration of the block; None when prometheus_port is 0."""
    port = settings.metrics.prometheus_port
    if not port:
        yield None
        return
    check_prometheus_supported(settings)
    async with PrometheusEndpoint(metrics, port=port, host=settings.metrics.prometheus_addr) as endpoint:
        yield endpoint
