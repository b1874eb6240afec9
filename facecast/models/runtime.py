"""ONNX Runtime sessions for user-supplied models: execution providers, fp16, memory.

Every adapter (detectors, recognisers, swappers, enhancers) gets its session from
``OnnxModel``, so the provider order, the fallback and the memory strategy are decided in
one place:

- providers are tried in the order asked (``cuda``, ``tensorrt``, ``cpu``); one that this
  onnxruntime build lacks is skipped with one log line naming it and what runs instead.
  CPU always ends the list, so a session can always be made.
- ``fp16`` asks TensorRT for half-precision engines (CUDA runs the graph's own precision).
- the memory strategy says when a session exists: ``tolerant`` keeps one per file for the
  whole process, shared by every stream and kept after a stream ends (no reload when it
  starts again); ``moderate`` (default) gives each stream its own, freed when the stream
  ends; ``strict`` frees it after every call (least memory, slowest).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from facecast.errors import FacecastError

log = logging.getLogger(__name__)

ProviderName = Literal["cpu", "cuda", "tensorrt"]
MemoryStrategy = Literal["strict", "moderate", "tolerant"]
PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


# onnxruntime's element type names -> numpy, for the inputs adapters feed
ONNX_TYPES: dict[str, type] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
}


def fixed_dim(dim: int | str | None) -> int | None:
    """A dimension's size when the model fixes it; None for a symbolic or unknown one."""
    return dim if isinstance(dim, int) and dim > 0 else None


def as_declared(value: np.ndarray, onnx_type: str) -> np.ndarray:
    """``value`` in the element type the model declares for it (unchanged if unknown)."""
    array = np.asarray(value)
    dtype = ONNX_TYPES.get(onnx_type)
    return array if dtype is None else array.astype(dtype, copy=False)


class ModelFileError(FacecastError):
    """A model file that cannot be used: missing, not ONNX, or not the model it claims."""


@dataclass(frozen=True)
class RuntimeOptions:
    providers: tuple[ProviderName, ...] = ("cpu",)
    fp16: bool = False
    memory: MemoryStrategy = "moderate"
    threads: int = 0  # intra-op threads; 0 lets onnxruntime choose


def parse_providers(names: Sequence[str]) -> tuple[ProviderName, ...]:
    """``["cuda", "cpu"]`` or ``["cuda,cpu"]`` as validated provider names, in order."""
    out: list[ProviderName] = []
    for name in (part.strip().lower() for text in names for part in text.split(",")):
        if not name:
            continue
        if name not in PROVIDERS:
            raise FacecastError(
                f"unknown execution provider {name!r}: use {', '.join(PROVIDERS)} (in order)"
            )
        if name not in out:
            out.append(name)  # type: ignore[arg-type]
    return tuple(out) or ("cpu",)


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def resolve_providers(
    wanted: Sequence[ProviderName], fp16: bool = False, available: Sequence[str] | None = None
) -> list[str | tuple[str, dict[str, Any]]]:
    """The onnxruntime provider list for ``wanted``: missing ones dropped (logged once
    each), CPU last, TensorRT options for fp16 and an engine cache."""
    have = set(available if available is not None else available_providers())
    chosen: list[str | tuple[str, dict[str, Any]]] = []
    for name in wanted:
        ort_name = PROVIDERS[name]
        if ort_name not in have:
            rest = [n for n in wanted if n != name and PROVIDERS[n] in have] or ["cpu"]
            log.warning(
                "execution provider %s is not available in this onnxruntime (%s); using %s",
                name,
                ", ".join(sorted(have)) or "none",
                " then ".join(dict.fromkeys([*rest, "cpu"])),
            )
            continue
        if name == "tensorrt":
            chosen.append((ort_name, {"trt_fp16_enable": bool(fp16)}))
        else:
            chosen.append(ort_name)
    if PROVIDERS["cpu"] not in chosen:
        chosen.append(PROVIDERS["cpu"])
    return chosen


def load_onnx(path: Path) -> Any:
    """The parsed ONNX graph (for initializers and signatures), or a ModelFileError that
    says what is wrong with the file."""
    import onnx

    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf raises its own DecodeError; onnx raises several
        raise ModelFileError(f"{path}: not a readable ONNX model ({exc})") from None


class OnnxModel:
    """One ONNX file run through onnxruntime, its session kept per the memory strategy.
    The signature (names, shapes, element types) is read once, when the model is opened,
    which also fails fast on a bad file. Sessions are thread-safe for ``run``."""

    def __init__(self, path: Path, options: RuntimeOptions | None = None) -> None:
        self.path = Path(path)
        self.options = options or RuntimeOptions()
        self._session: Any = None
        self._lock = threading.Lock()
        session = self._ensure()
        self.inputs: list[tuple[str, list[int | str | None]]] = [
            (i.name, list(i.shape)) for i in session.get_inputs()
        ]
        self.outputs: list[tuple[str, list[int | str | None]]] = [
            (o.name, list(o.shape)) for o in session.get_outputs()
        ]
        # element type per input, as onnxruntime names it (``tensor(float16)``...)
        self.input_types: dict[str, str] = {i.name: i.type for i in session.get_inputs()}
        if self.options.memory == "strict":
            self.release()

    @property
    def providers(self) -> list[str]:
        """The providers the session actually runs on (after any fallback)."""
        return list(self._ensure().get_providers())

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list:
        """Outputs for ``feeds``. Adapters speak float32: inputs are cast to what the model
        declares (fp16 exports take float16, CodeFormer's weight a double), and float16
        outputs come back as float32."""
        session = self._ensure()
        feeds = {name: as_declared(v, self.input_types.get(name, "")) for name, v in feeds.items()}
        try:
            results = session.run(outputs, feeds)
            return [
                r.astype(np.float32) if isinstance(r, np.ndarray) and r.dtype == np.float16 else r
                for r in results
            ]
        except Exception as exc:
            raise ModelFileError(f"{self.path.name}: inference failed ({exc})") from None
        finally:
            if self.options.memory == "strict":
                self.release()

    def release(self) -> None:
        """This model is done with its session (the stream ended, or strict memory after a
        call); the next call makes or fetches one again. ``tolerant`` sessions stay in the
        process-wide cache for the next stream."""
        with self._lock:
            self._session = None

    def _ensure(self) -> Any:
        with self._lock:
            if self._session is None:
                if self.options.memory == "tolerant":
                    self._session = _shared_session(self.path, self.options)
                else:
                    self._session = _create_session(self.path, self.options)
            return self._session


# ``tolerant``: one session per file and runtime settings for the whole process, so a stream
# that starts again (or a second stream on the same model) pays no load
_SHARED: dict[tuple[Path, RuntimeOptions], Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared_session(path: Path, options: RuntimeOptions) -> Any:
    key = (path.resolve(), options)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = _create_session(path, options)
        return _SHARED[key]


def _create_session(path: Path, options: RuntimeOptions) -> Any:
    import onnxruntime

    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    settings = onnxruntime.SessionOptions()
    settings.log_severity_level = 3  # onnxruntime's own warnings go to our log, not stderr
    if options.threads:
        settings.intra_op_num_threads = options.threads
    providers = resolve_providers(options.providers, options.fp16)
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=settings, providers=providers)
    except Exception as exc:
        raise ModelFileError(f"{path}: onnxruntime cannot load it ({exc})") from None
