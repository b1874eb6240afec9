"""GStreamer inputs and outputs: ``gst:PIPELINE`` beside the PyAV URLs.

``GstSource("gst:DESCRIPTION")`` runs ``DESCRIPTION ! videoconvert ! video/x-raw,format=BGR !
appsink`` and yields ``Frame``s; ``GstSink("gst:DESCRIPTION", ...)`` runs ``appsrc !
DESCRIPTION`` and is fed ``Frame``s. Both have the surface of the PyAV classes
(``facecast.live.pipeline.Source`` / ``Sink``), so the pipeline does not know which backend runs.

What lives where: gst_runtime (loading GStreamer, parsing a description, the bus and state
calls), gst_source (the input: how frames and drops are counted, reconnects) and gst_sink
(the output: timing, queueing, rate changes).

GStreamer is optional: ``gi`` is imported on first use, and a missing install gives a
``MediaError`` naming the fix. A description GStreamer cannot parse (unknown element, bad
property) is a ``MediaError`` at construction, never a hang.
"""

from __future__ import annotations

from facecast.media.gst_runtime import gst_modules, is_gst
from facecast.media.gst_sink import GstSink, check_output
from facecast.media.gst_source import GstSource

__all__ = ["GstSink", "GstSource", "check_output", "gst_modules", "is_gst"]
