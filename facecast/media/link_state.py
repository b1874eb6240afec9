"""The state every live input and output shows the pipeline and the metrics: whether it is
connected and since when, how often it reconnected, how many frames it passed on."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from fractions import Fraction


# eq=False, repr=False: the inputs and outputs built on these keep identity comparison,
# hashing and repr.
@dataclass(eq=False, repr=False)
class LinkState:
    """``connected``; ``state_since`` (monotonic time of the last change); ``reconnects``
    (attempts after the first); ``frames`` (read from an input, written to an output)."""

    connected: bool = False
    state_since: float = field(default_factory=time.monotonic)
    reconnects: int = 0
    frames: int = 0


@dataclass(eq=False, repr=False)
class InputState(LinkState):
    """A live input's: also what its current stream is (``fps``, ``width``, ``height``) and
    when its last frame came (``last_frame_at``, monotonic)."""

    fps: Fraction | None = None
    width: int | None = None
    height: int | None = None
    last_frame_at: float | None = None


@dataclass(eq=False, repr=False)
class OutputState(LinkState):
    """A live output's: also ``dropped`` (frames not sent) and ``send_seconds`` (what the
    last frame took to send)."""

    dropped: int = 0
    send_seconds: float = 0.0


__all__ = ["InputState", "LinkState", "OutputState"]
