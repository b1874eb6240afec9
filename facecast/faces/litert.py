"""A thin, typed wrapper around one LiteRT (TFLite) interpreter."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter


class TFLiteModel:
    """One model session. Not shared across threads: ``run`` holds a lock because a LiteRT
    interpreter keeps its tensors inside, so two callers would overwrite each other."""

    def __init__(self, path: Path, num_threads: int = 1) -> None:
        with _without_native_chatter():
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


# LiteRT's C++ runtime prints this at INFO on the process's stderr (not through Python
# logging, and TF_CPP_MIN_LOG_LEVEL does not reach it); users read it as a warning.
_CHATTER = (b"Created TensorFlow Lite XNNPACK delegate",)


@contextlib.contextmanager
def _without_native_chatter() -> Iterator[None]:
    """Run the block with file descriptor 2 going to a temporary file, then pass on every
    line of it except LiteRT's known INFO chatter. A file, not a pipe: a chatty block can
    never fill a buffer and block, and nothing another thread writes meanwhile is lost,
    only delayed until the block ends."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all (a daemon): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().splitlines(keepends=True)
                if not any(marker in line for marker in _CHATTER)
            ]
            if kept:
                os.write(2, b"".join(kept))
