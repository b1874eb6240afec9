"""Prometheus metrics, read from the streams' own stats at scrape time.

A custom collector, not counters incremented on the hot path: the live stages already count
everything in ``LiveStats``/``StageClock``, so the exposition is exactly what the streams
did, and a stream that is gone simply stops being reported. One registry per server (no
global state), so tests and several servers in one process do not collide.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from facecast.streams import StreamManager, dropped_frames
from facecast.timing import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StreamCollector(Collector):
    def __init__(self, manager: StreamManager) -> None:
        self.manager = manager

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
            key, pipeline = handle.key, handle.pipeline
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
            up.add_metric([key, "input"], 1 if source.connected else 0)
            up.add_metric([key, "output"], 1 if sink is not None and sink.connected else 0)
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


def make_registry(manager: StreamManager, extra: Iterable[Collector] = ()) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamCollector(manager))
    for collector in extra:
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
