"""Several servers behind one engine: each request goes to the live one with the fewest requests in flight."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


def api_root(base_url: str) -> str:
    """The URL the `/completions`-style paths hang off: `http://host:8000` and `http://host:8000/v1` both work."""
    url = base_url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


@dataclass(eq=False)
class Replica:
    """One server and what we have learned about it."""

    url: str
    in_flight: int = 0
    sent: int = 0
    dead_until: float = 0.0
    # Whether `/completions` takes the prompt as a list of token IDs; None until the server has told us.
    accepts_token_ids: bool | None = None
    # Optional body fields the server refused (wire.OPTIONAL_FIELDS); requests to it leave them out.
    refused_fields: set[str] = field(default_factory=set)
    # llama.cpp's server (from /v1/models at start-up): it has its own names for some sampling fields.
    llama_cpp: bool = False
    # Whether its context size, smaller than a prompt, has been logged.
    told_context: bool = False


class ReplicaPool:
    def __init__(
        self, base_urls: Sequence[str], *, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not base_urls:
            raise ValueError("at least one server URL is needed")
        self.replicas = [Replica(api_root(url)) for url in base_urls]
        self._cooldown = cooldown
        self._clock = clock

    def is_live(self, replica: Replica) -> bool:
        return replica.dead_until <= self._clock()

    def pick(self, avoid: Collection[Replica] = ()) -> Replica:
        """The least-loaded live replica, preferring ones not in `avoid`; when all are in their cool-down, the
        one whose cool-down ends first (a request then doubles as the probe that finds it back)."""
        live = [r for r in self.replicas if self.is_live(r)]
        preferred = [r for r in live if r not in avoid] or live
        if not preferred:
            return min(self.replicas, key=lambda r: r.dead_until)
        # Ties go to the replica that has had the fewest requests, so an idle pool still spreads the load.
        return min(preferred, key=lambda r: (r.in_flight, r.sent))

    def mark_dead(self, replica: Replica) -> None:
        if self.is_live(replica):
            log.warning("model server %s is unreachable; skipping it for %.0f s", replica.url, self._cooldown)
        replica.dead_until = self._clock() + self._cooldown

    def mark_alive(self, replica: Replica) -> None:
        if not self.is_live(replica):
            log.info("model server %s answers again", replica.url)
        replica.dead_until = 0.0

    @property
    def any_live(self) -> bool:
        return any(self.is_live(r) for r in self.replicas)
