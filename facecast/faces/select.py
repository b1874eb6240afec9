"""Which faces in a frame get swapped."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from facecast.faces.face import Face


@dataclass(frozen=True)
class Selection:
    mode: Literal["all", "largest", "index"] = "all"
    index: int = 0

    @classmethod
    def parse(cls, text: str) -> Selection:
        """``all``, ``largest`` or ``index:N`` (N counts faces left to right from 0)."""
        text = text.strip().lower()
        if text in ("all", "largest"):
            return cls(text)  # type: ignore[arg-type]
        if text.startswith("index:"):
            number = text.removeprefix("index:")
            if number.isdigit():
                return cls("index", int(number))
        raise ValueError(f"unknown face selection {text!r}: use all, largest or index:N")

    def __str__(self) -> str:
        return f"index:{self.index}" if self.mode == "index" else self.mode

    def choose(self, faces: list[Face], order: Callable[[Face], float] | None = None) -> list[Face]:
        """The faces to swap. ``order`` ranks faces for ``index:N`` (default: left to right
        in this frame; in video, where each track was first seen, so the choice stays with
        the person when people cross)."""
        if not faces or self.mode == "all":
            return faces
        if self.mode == "largest":
            return [max(faces, key=lambda f: f.area)]
        ordered = sorted(faces, key=order or (lambda f: float(f.center[0])))
        return [ordered[self.index]] if self.index < len(ordered) else []
