"""The server's Prometheus metrics, in a registry of its own (one per server, so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Seconds: time to first token spans prefill and queueing (CPU: seconds), per-token latency one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """Counters and histograms the engine and the routes update, and gauges read from the engine at scrape."""

    def __init__(self, queue_depth: Callable[[], float], busy_slots: Callable[[], float], slots: int,
                 speculative_tokens: int = 0):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("bloom_jax_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=registry)
        Gauge("bloom_jax_queue_depth", "requests waiting for a slot", registry=registry).set_function(queue_depth)
        Gauge("bloom_jax_running_slots", "decode slots in use", registry=registry).set_function(busy_slots)
        Gauge("bloom_jax_slots", "decode slots", registry=registry).set(slots)
        self.failed_requests = Counter("bloom_jax_failed_requests",
                                       "requests the engine failed, by kind: request (its own work raised), step (a "
                                       "device call it was in failed), engine (the engine stopped)", ["kind"],
                                       registry=registry)
        self.prompt_tokens = Counter("bloom_jax_prompt_tokens", "prompt tokens prefilled", registry=registry)
        self.generation_tokens = Counter("bloom_jax_generation_tokens", "tokens generated", registry=registry)
        self.time_to_first_token = Histogram("bloom_jax_time_to_first_token_seconds",
                                             "from arrival to a choice's first token", buckets=TTFT_BUCKETS,
                                             registry=registry)
        self.time_per_output_token = Histogram("bloom_jax_time_per_output_token_seconds",
                                               "between a choice's successive tokens", buckets=TPOT_BUCKETS,
                                               registry=registry)
        if speculative_tokens:  # speculative decoding, K tokens drafted per slot and step
            self.drafted_tokens = Counter("bloom_jax_speculative_drafted_tokens", "tokens the draft proposed",
                                          registry=registry)
            self.accepted_tokens = Counter("bloom_jax_speculative_accepted_tokens",
                                           "proposed tokens the model accepted (the acceptance rate: over drafted)",
                                           registry=registry)
            self.tokens_per_step = Histogram("bloom_jax_speculative_tokens_per_step",
                                             "tokens a slot made in one step (accepted + 1)",
                                             buckets=tuple(range(1, speculative_tokens + 2)), registry=registry)

            self._drafted = self._accepted = 0
            Gauge("bloom_jax_speculative_acceptance_rate", "accepted over drafted tokens since the start",
                  registry=registry).set_function(lambda: self._accepted / self._drafted if self._drafted else 0.0)
        self.request_duration = Histogram("bloom_jax_request_duration_seconds", "from arrival to a choice's last token",
                                          buckets=TTFT_BUCKETS, registry=registry)

    def speculative_step(self, drafted: int, made_per_slot: Sequence[int]) -> None:
        """Counts a speculative step: `drafted` proposals, and each busy slot's tokens made (accepted + 1)."""
        accepted = sum(made_per_slot) - len(made_per_slot)
        self._drafted, self._accepted = self._drafted + drafted, self._accepted + accepted
        self.drafted_tokens.inc(drafted)
        self.accepted_tokens.inc(accepted)
        for made in made_per_slot:
            self.tokens_per_step.observe(made)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["Metrics"]
