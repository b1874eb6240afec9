"""Judges: face recognisers that say whose face a swap shows, for benchmarks and tests.

Two judges from unrelated families, so that a swap cannot please the judge it was tuned
against and nothing else:

- ``DlibJudge``: dlib's 128-D ResNet (``faces/embed.py``, the recogniser facecast itself uses
  for reference mode), on the largest face found by facecast's own analyser.
- ``FaceResJudge``: HSE FaceRes, a 1024-D descriptor with no dlib lineage, run by the Human
  library (@vladmandic/human, TensorFlow.js on its WebAssembly backend) in a Node.js process
  (``tools/judge/judge.mjs``). It does its own detection and alignment (Human's BlazeFace,
  mesh and rotation), so it shares nothing with facecast's face analysis. The weights ship in
  the npm package; ``scripts/setup`` installs it from ``tools/judge/package-lock.json``.
  Bench and test tooling only: facecast's runtime does not need Node.

Each judge answers for the largest face in a whole image, in its own distance units: compare
a distance with ``same_person`` of the same judge, never across judges.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from facecast.errors import FacecastError
from facecast.faces.analyse import FaceAnalyser
from facecast.faces.embed import FaceEmbedder, face_distance
from facecast.faces.recognise import cosine_distance, normalise

TOOL_DIR = Path(__file__).resolve().parents[3] / "tools" / "judge"

# Calibrated on tests/media: 7 people x 2 photos, plus obama/obama-720p, biden,
# alex-lacamoire and lin-manuel-miranda (8 same-person pairs, 163 different-person pairs;
# tests/test_judges.py checks the ranking these numbers support).
# dlib (Euclidean): same person 0.09-0.41, and aniston's two photos 0.63; different people
# 0.66 and up (median 0.88). dlib's own 0.6: every different pair above, 7 of 8 same below.
DLIB_SAME_PERSON = 0.6
# FaceRes (cosine): same person 0.09-0.29; different people 0.44 and up (median 0.60). The
# threshold is the middle of that gap.
FACERES_SAME_PERSON = 0.36


class JudgeError(FacecastError):
    """A judge cannot run (not installed, crashed, no answer in time)."""


@runtime_checkable
class Judge(Protocol):
    """A face recogniser used to score swaps, not to make them."""

    name: str
    same_person: float  # distances below this: one person (in this judge's units)

    def embed(self, image_bgr: np.ndarray) -> np.ndarray | None:
        """The embedding of the largest face in a BGR image; None when it finds no face."""
        ...

    def distance(self, a: np.ndarray, b: np.ndarray) -> float: ...

    def close(self) -> None: ...


class DlibJudge:
    """dlib's ResNet descriptor on the largest face facecast's analyser finds (tiled, for
    photos). Euclidean distance, as dlib intends."""

    name = "dlib"
    same_person = DLIB_SAME_PERSON

    def __init__(
        self, analyser: FaceAnalyser | None = None, embedder: FaceEmbedder | None = None
    ) -> None:
        self.analyser = analyser or FaceAnalyser(tiles=True)
        self.embedder = embedder or FaceEmbedder()

    def embed(self, image_bgr: np.ndarray) -> np.ndarray | None:
        faces = self.analyser.analyse(_bgr(image_bgr))  # largest first
        if not faces:
            return None
        return self.embedder.embed(_bgr(image_bgr), faces[0])

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return face_distance(a, b)

    def close(self) -> None:
        pass

    def __enter__(self) -> DlibJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FaceResJudge:
    """HSE FaceRes via Human in a long-lived ``node tools/judge/judge.mjs``.

    Images go to the process as PNG files in a private temp folder, one JSON line per
    request; every read has a timeout, so a stuck or dead Node process raises JudgeError
    instead of hanging the bench. Embeddings come back L2-normalised; cosine distance.
    One request at a time (a lock), so a judge may be shared between threads.
    """

    name = "faceres"
    same_person = FACERES_SAME_PERSON

    def __init__(
        self,
        tool_dir: Path | str = TOOL_DIR,
        start_timeout: float = 90.0,
        timeout: float = 30.0,
    ) -> None:
        self.tool_dir = Path(tool_dir)
        self.timeout = timeout
        node = _require_installed(self.tool_dir)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=40)
        self._tmp = Path(tempfile.mkdtemp(prefix="facecast-judge-"))
        started = time.perf_counter()
        self._proc = subprocess.Popen(
            [node, str(self.tool_dir / "judge.mjs")],
            cwd=self.tool_dir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,  # line-buffered: each request line reaches node at once
        )
        # Cleans up even if close() is never called (an exception in a bench, the test run).
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._tmp)
        # Reader threads: the queue gives reads a timeout, and draining stderr keeps a
        # chatty node from blocking on a full pipe.
        threading.Thread(target=_pump, args=(self._proc.stdout, self._lines), daemon=True).start()
        threading.Thread(target=_drain, args=(self._proc.stderr, self._stderr), daemon=True).start()
        ready = self._read(start_timeout, "to start")  # on failure _read has shut it down
        if not ready.get("ready"):
            self._abandon()
            raise JudgeError(f"face judge failed to start: {ready.get('error', ready)}")
        self.info: dict[str, Any] = ready
        self.startup_s = time.perf_counter() - started

    def embed(self, image_bgr: np.ndarray) -> np.ndarray | None:
        with self._lock:
            if self._proc.poll() is not None:
                raise JudgeError(f"face judge is not running (exit {self._proc.returncode})")
            request_id = next(self._ids)
            path = self._tmp / f"{request_id}.png"
            if not cv2.imwrite(str(path), _bgr(image_bgr)):
                raise JudgeError(f"face judge: cannot write {path}")
            try:
                self._send({"id": request_id, "path": str(path)})
                answer = self._read(self.timeout, "to answer")
            finally:
                path.unlink(missing_ok=True)
        if answer.get("id") != request_id:
            self._abandon()
            raise JudgeError(f"face judge answered {answer.get('id')!r}, expected {request_id}")
        if "embedding" in answer:
            return normalise(np.asarray(answer["embedding"], dtype=np.float32))
        if answer.get("error") == "no face":
            return None
        raise JudgeError(f"face judge: {answer.get('error', answer)}")

    def distance(self, a: np.ndarray, b: np.ndarray) -> float:
        return cosine_distance(a, b)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> FaceResJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _abandon(self) -> None:
        """Shut down a process that broke the protocol or timed out: killed, not asked."""
        if self._proc.poll() is None:
            self._proc.kill()
        self.close()

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            self._abandon()
            raise JudgeError(f"face judge stopped: {exc}{self._stderr_tail()}") from exc

    def _read(self, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._abandon()
                raise JudgeError(
                    f"face judge took more than {timeout:g} s {what}{self._stderr_tail()}"
                ) from None
            if line is None:  # stdout closed: node exited
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=5)
                self._abandon()
                code = self._proc.returncode
                raise JudgeError(f"face judge exited ({code}){self._stderr_tail()}")
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                self._stderr.append(line.rstrip())  # stray output; the protocol is JSON only
                continue
            if isinstance(message, dict):
                return message

    def _stderr_tail(self) -> str:
        tail = [line for line in list(self._stderr)[-3:] if line.strip()]
        return f"; stderr: {' | '.join(tail)}" if tail else ""


def available_judges(tool_dir: Path | str = TOOL_DIR) -> list[Judge]:
    """Both judges, dlib first. Raises JudgeError (naming the fix) when the FaceRes judge
    is not installed: a bench that silently lost its second judge would mislead."""
    faceres = FaceResJudge(tool_dir)
    return [DlibJudge(), faceres]


def _require_installed(tool_dir: Path) -> str:
    """The node executable, once the judge's files and packages are in place."""
    if not (tool_dir / "judge.mjs").is_file():
        raise JudgeError(f"face judge not found: no judge.mjs in {tool_dir}")
    if not (tool_dir / "node_modules" / "@vladmandic" / "human" / "models").is_dir():
        raise JudgeError(
            f"face judge not installed: {tool_dir / 'node_modules'} is missing or incomplete; "
            "run scripts/setup"
        )
    node = shutil.which("node")
    if node is None:
        raise JudgeError(
            "face judge needs Node.js 18+ and `node` is not on PATH: install it "
            "(Debian: apt-get install nodejs npm), then run scripts/setup"
        )
    return node


def _bgr(image: np.ndarray) -> np.ndarray:
    """3-channel BGR uint8: grey is expanded, an alpha channel is composited onto white
    (as ``media.image_io.read_image`` does), so both judges see the same pixels."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"judges take 8-bit images, not {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        return (image[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return image


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _drain(stream: Any, keep: deque[str]) -> None:
    for line in stream:
        keep.append(line.rstrip())


def _shutdown(proc: subprocess.Popen[str], tmp: Path) -> None:
    """Closing stdin asks node to exit; it is killed if it does not within 5 s."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    shutil.rmtree(tmp, ignore_errors=True)
