"""A thin, typed wrapper around one LiteRT (TFLite) interpreter."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter


class TFLiteModel:
    """One model session. Not shared across threads: ``run`` holds a lock because a LiteRT
    interpreter keeps its tensors inside, so two callers would overwrite each other."""

    def __init__(self, path: Path, num_threads: int = 1) -> None:
        self._interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        self._outputs = self._interpreter.get_output_details()
        self._lock = threading.Lock()

    @property
    def input_size(self) -> tuple[int, int]:
        """(width, height) of the NHWC input."""
        _, height, width, _ = self._input["shape"]
        return int(width), int(height)

    def run(self, tensor: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            self._interpreter.set_tensor(self._input["index"], tensor[None].astype(np.float32))
            self._interpreter.invoke()
            return [self._interpreter.get_tensor(o["index"])[0].copy() for o in self._outputs]
