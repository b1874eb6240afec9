"""Prometheus metrics, read from the streams' own stats at scrape time.

A custom collector, not counters incremented on the hot path: the live stages already count
everything in ``LiveStats``/``StageClock``, so the exposition is exactly what the streams
did. One registry per server (no global state), so tests and several servers in one process
do not collide.

A stream that ended is still reported, with its final values, for as long as the manager
keeps it listed (``StreamManager.retention``, 300 s by default): otherwise the frames it
handled between the last scrape and its end would never reach Prometheus. Its
``facecast_stream_up`` is 0, and ``facecast_streams_active`` counts running streams only.
When it expires it stops being reported; a new stream on the key starts its counters from
0, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from facecast.config import ModelSettings
from facecast.engine.timing import Histogram
from facecast.serve.streams import StreamManager, dropped_frames

if TYPE_CHECKING:
    from facecast.serve.ingest import IngestServer
    from facecast.serve.store import ClusterStore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StreamCollector(Collector):
    """``label``: a stream's ``stream`` label from its key (the key itself by default; the
    HTTP plane can hash it, for keys that are secrets)."""

    def __init__(self, manager: StreamManager, label: Callable[[str], str] | None = None) -> None:
        self.manager = manager
        self.label = label or (lambda key: key)

    def collect(self) -> Iterator[Metric]:
        handles = self.manager.handles()
        frames = CounterMetricFamily(
            "facecast_frames", "Frames by what happened to them.", labels=["stream", "result"]
        )
        faces = GaugeMetricFamily(
            "facecast_faces", "Faces found in the last processed frame.", labels=["stream"]
        )
        reconnects = CounterMetricFamily(
            "facecast_reconnects", "Connection attempts after the first.", labels=["stream", "side"]
        )
        up = GaugeMetricFamily(
            "facecast_stream_up",
            "1 while the input/output is connected.",
            labels=["stream", "side"],
        )
        latency = HistogramMetricFamily(
            "facecast_latency_seconds",
            "Decoded to encoded and handed to the output, per frame.",
            labels=["stream"],
        )
        stages = HistogramMetricFamily(
            "facecast_stage_seconds", "Time per call of each stage.", labels=["stream", "stage"]
        )
        for handle in handles:
            key, pipeline = self.label(handle.key), handle.pipeline
            stats, source, sink = pipeline.stats, pipeline.source, pipeline.sink
            for result, value in (
                ("swapped", stats.frames_swapped),
                ("passed", stats.frames_passed),
                ("failed", stats.frames_failed),
                ("dropped", dropped_frames(pipeline)),
            ):
                frames.add_metric([key, result], value)
            faces.add_metric([key], stats.faces_last)
            reconnects.add_metric([key, "input"], source.reconnects)
            reconnects.add_metric([key, "output"], sink.reconnects if sink else 0)
            up.add_metric([key, "input"], 1 if handle.input_up() else 0)
            up.add_metric([key, "output"], 1 if handle.output_up() else 0)
            _add_histogram(latency, [key], stats.latency_histogram)
            for stage, histogram in sorted(stats.clock.histograms.items()):
                _add_histogram(stages, [key, stage], histogram)
        active = GaugeMetricFamily(
            "facecast_streams_active", "Streams running in this process (the HPA's metric)."
        )
        active.add_metric([], sum(1 for h in handles if h.running))
        yield from (frames, faces, reconnects, up, latency, stages, active)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], hist: Histogram) -> None:
    family.add_metric(labels, buckets=hist.cumulative(), sum_value=hist.sum)


class BuildInfoCollector(Collector):
    """``facecast_build_info``: always 1, the labels say what runs. The usual Prometheus idiom:
    count by version to see a rollout's progress, or join it onto other series."""

    def __init__(self) -> None:
        # Read once: the code running in this process does not change when the installed
        # package does, so a later look-up could report a version that is not running.
        self.labels = build_labels()

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "facecast_build_info", "Always 1; the labels say what runs.", labels=list(self.labels)
        )
        info.add_metric(list(self.labels.values()), 1)
        yield info


def build_labels() -> dict[str, str]:
    """The installed package's version, the Python version and the built-in default swapper."""
    try:
        version = metadata.version("facecast")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = "unknown"
    return {
        "version": version,
        "python": platform.python_version(),
        # The built-in default, not FACECAST_SWAPPER: each stream may pick its own swapper
        # (profiles), so one process-wide label could only ever name the default.
        "default_swapper": str(ModelSettings.model_fields["swapper"].default),
    }


class IngestCollector(Collector):
    """``facecast_ingest_up`` (1 while nginx runs) and ``facecast_ingest_restarts_total``
    (times the supervisor started it again after it died) for ``facecast serve``'s ingest
    server. A restart cuts every publisher, so a rising count explains streams that ended
    together."""

    def __init__(self, ingest: IngestServer) -> None:
        self.ingest = ingest

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("facecast_ingest_up", "1 while the ingest server (nginx) runs.")
        up.add_metric([], 1 if self.ingest.is_running else 0)
        restarts = CounterMetricFamily(
            "facecast_ingest_restarts", "Times the ingest server was restarted after it died."
        )
        restarts.add_metric([], self.ingest.restarts)
        yield from (up, restarts)


class ClusterCollector(Collector):
    """A cluster ingest's view of the store, read at scrape time: ``facecast_keys_waiting``
    (published keys no worker has taken: the workers' autoscaling signal),
    ``facecast_cluster_workers`` (workers alive) and ``facecast_store_up``."""

    def __init__(self, store: ClusterStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        from facecast.serve.store import StoreError, cluster_view

        up = GaugeMetricFamily("facecast_store_up", "1 while the coordination store answers.")
        waiting = GaugeMetricFamily(
            "facecast_keys_waiting", "Published stream keys that no worker runs yet."
        )
        workers = GaugeMetricFamily("facecast_cluster_workers", "Workers alive (heartbeats).")
        try:
            view = cluster_view(self.store)
        except StoreError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        waiting.add_metric([], len(view["waiting"]))
        workers.add_metric([], len(view["workers"]))
        yield from (up, waiting, workers)


class _ManagerCollectors(Collector):
    """The collectors added to ``manager.collectors``, read at scrape time: the registry is
    made with the app, before ``facecast serve`` adds its ingest server's."""

    def __init__(self, manager: StreamManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        for collector in list(self.manager.collectors):
            yield from collector.collect()


def make_registry(
    manager: StreamManager,
    extra: Iterable[Collector] = (),
    label: Callable[[str], str] | None = None,
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamCollector(manager, label))
    registry.register(BuildInfoCollector())
    registry.register(_ManagerCollectors(manager))
    # process_* (CPU, RSS, open fds, start time) on this registry, not the global default:
    # no state shared between servers in one process. It reads /proc, so off Linux it
    # simply reports nothing.
    ProcessCollector(registry=registry)
    for collector in extra:
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
