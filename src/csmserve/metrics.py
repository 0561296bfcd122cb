"""Every Prometheus metric csmserve exports, in one place. One registry per app (tests run many)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, 30.0)
OUTCOMES = ("ok", "error", "cancelled", "rejected", "disconnected", "timeout")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttfa = Histogram(
            "csm_time_to_first_audio_seconds", "From request to its first audio chunk.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.rtf = Histogram(
            "csm_real_time_factor", "Generation time / audio duration per request (<1 is faster than real time).",
            buckets=RTF_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "csm_queue_depth", "Requests waiting for a row of the engine (queued or prefilling).", registry=r
        )
        self.engine_rows = Gauge("csm_engine_rows", "Streams in the engine's batch now.", registry=r)
        self.engine_free_slots = Gauge("csm_engine_free_slots", "Rows the engine's batch can still take.", registry=r)
        self.engine_step_ms = Gauge("csm_engine_step_milliseconds", "Duration of the engine's last step.", registry=r)
        self.engine_step_cpu_ms = Gauge(
            "csm_engine_step_cpu_milliseconds", "CPU time the model thread spent in the engine's last step.", registry=r
        )
        self.engine_step_device_ms = Gauge(
            "csm_engine_step_device_milliseconds",
            "GPU time of the engine's last decode step (0 on a CPU). Wall time well above this and the CPU "
            "time is time spent waiting for the interpreter lock.",
            registry=r,
        )
        self.engine_realtime = Gauge(
            "csm_engine_realtime_streams",
            "Streams this device holds in real time (the largest batch whose step took at most 80% of a frame "
            "at start-up; 0 until measured).",
            registry=r,
        )
        self.engine_batch = Gauge("csm_engine_batch_size", "Streams decoded in the engine's last step.", registry=r)
        self.active_streams = Gauge("csm_active_streams", "Requests streaming now.", registry=r)
        self.requests = Counter("csm_requests", "Requests by outcome.", ["endpoint", "outcome"], registry=r)
        self.audio_seconds = Counter("csm_audio_seconds", "Seconds of audio produced.", registry=r)
        self.disconnects = Counter("csm_client_disconnects", "Clients that went away mid-stream.", registry=r)
        self.cancellations = Counter("csm_cancellations", "Requests cancelled by the client (barge-in).", registry=r)
        self.slow_clients = Counter("csm_slow_clients", "Connections closed for reading too slowly.", registry=r)
        for endpoint in ("ws", "rest", "openai"):
            for outcome in OUTCOMES:
                self.requests.labels(endpoint, outcome)

    def watch_capacity(self, capacity: Callable[[], object]) -> None:
        """Export the engine's :class:`~csmserve.engine.Capacity` at scrape time."""
        self.queue_depth.set_function(lambda: capacity().waiting)
        self.engine_rows.set_function(lambda: capacity().active)
        self.engine_free_slots.set_function(lambda: capacity().free_slots)
        self.engine_step_ms.set_function(lambda: capacity().last_step_ms)
        self.engine_step_cpu_ms.set_function(lambda: capacity().last_step_cpu_ms)
        self.engine_step_device_ms.set_function(lambda: capacity().last_step_device_ms or 0.0)
        self.engine_realtime.set_function(lambda: capacity().realtime_streams or 0)
        self.engine_batch.set_function(lambda: capacity().last_batch)

    def watch_prefill(self, counts: Callable[[], dict[str, int]]) -> None:
        """Export ``counts()`` (positions ``computed``/``reused``) as ``csm_prefill_positions_total``."""
        self.registry.register(_PrefillCollector(counts))

    def finished(self, endpoint: str, outcome: str, stats=None) -> None:
        """Record one request's end; ``stats`` is its :class:`~csmserve.speech.StreamStats`."""
        self.requests.labels(endpoint, outcome).inc()
        if stats is None:
            return
        audio_s = stats.samples / stats.sample_rate
        self.audio_seconds.inc(audio_s)
        if stats.first_audio is not None:
            self.ttfa.observe(stats.first_audio - stats.started)
        if outcome == "ok" and audio_s > 0:
            fields = stats.as_event_fields()
            self.rtf.observe(fields["rtf"])


class _PrefillCollector(Collector):
    """Reads the engine's running totals at scrape time (the engine owns them, on its worker thread)."""

    def __init__(self, counts: Callable[[], dict[str, int]]):
        self.counts = counts

    def collect(self):
        family = CounterMetricFamily(
            "csm_prefill_positions",
            "Prompt positions the backbone prefilled (computed) or took from its cache (reused: prefix reuse).",
            labels=["kind"],
        )
        for kind, value in sorted(self.counts().items()):
            family.add_metric([kind], value)
        yield family
