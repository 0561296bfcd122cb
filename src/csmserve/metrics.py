"""Every Prometheus metric csmserve exports, in one place. One registry per app (tests run many).

With several API worker processes (``api_workers``), prometheus-client's multiprocess mode is on
(``PROMETHEUS_MULTIPROC_DIR``, set by the server before it starts them): each worker's counters and
histograms live in files that :func:`exposition` adds up at scrape time, ``csm_active_streams`` is the
sum over live workers, and the engine's figures (one engine, whichever worker is scraped) come from a
collector that reads its :class:`~csmserve.engine.Capacity` at scrape time, in both modes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
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
        self.active_streams = Gauge(
            "csm_active_streams", "Requests streaming now.", registry=r, multiprocess_mode="livesum"
        )
        self.requests = Counter("csm_requests", "Requests by outcome.", ["endpoint", "outcome"], registry=r)
        self.audio_seconds = Counter("csm_audio_seconds", "Seconds of audio produced.", registry=r)
        self.disconnects = Counter("csm_client_disconnects", "Clients that went away mid-stream.", registry=r)
        self.cancellations = Counter("csm_cancellations", "Requests cancelled by the client (barge-in).", registry=r)
        self.slow_clients = Counter("csm_slow_clients", "Connections closed for reading too slowly.", registry=r)
        self._engine: list[Collector] = []
        for endpoint in ("ws", "rest", "openai"):
            for outcome in OUTCOMES:
                self.requests.labels(endpoint, outcome)

    def watch_capacity(self, capacity: Callable[[], object]) -> None:
        """Export the engine's :class:`~csmserve.engine.Capacity`, read at scrape time."""
        self._engine.append(_CapacityCollector(capacity))
        self.registry.register(self._engine[-1])

    def watch_prefill(self, counts: Callable[[], dict[str, int]]) -> None:
        """Export ``counts()`` (positions ``computed``/``reused``) as ``csm_prefill_positions_total``."""
        self._engine.append(_PrefillCollector(counts))
        self.registry.register(self._engine[-1])

    def exposition(self) -> bytes:
        """The text ``/metrics`` answers: this process's registry, or, with several API workers, every
        worker's counters added up (prometheus-client's multiprocess mode) and the engine's figures."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        for collector in self._engine:
            registry.register(collector)
        return generate_latest(registry)

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


class _CapacityCollector(Collector):
    """The engine's load and step times, read from its capacity snapshot at scrape time."""

    GAUGES = (
        ("csm_queue_depth", "Requests waiting for a row of the engine (queued or prefilling).", "waiting"),
        ("csm_engine_rows", "Streams in the engine's batch now.", "active"),
        ("csm_engine_free_slots", "Rows the engine's batch can still take.", "free_slots"),
        ("csm_engine_step_milliseconds", "Duration of the engine's last step.", "last_step_ms"),
        ("csm_engine_step_cpu_milliseconds", "CPU time the model thread spent in the engine's last step.",
         "last_step_cpu_ms"),
        ("csm_engine_step_device_milliseconds",
         "GPU time of the engine's last decode step (0 on a CPU). Wall time well above this and the CPU time "
         "is time spent waiting for the interpreter lock.", "last_step_device_ms"),
        ("csm_engine_batch_size", "Streams decoded in the engine's last step.", "last_batch"),
        ("csm_engine_realtime_streams",
         "Streams this device holds in real time (the largest batch whose step took at most 80 percent of a "
         "frame at start-up; 0 until measured).", "realtime_streams"),
    )

    def __init__(self, capacity: Callable[[], object]):
        self.capacity = capacity

    def collect(self):
        snapshot = self.capacity()
        for name, documentation, field in self.GAUGES:
            yield GaugeMetricFamily(name, documentation, value=float(getattr(snapshot, field) or 0.0))
