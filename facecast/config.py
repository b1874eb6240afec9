"""Settings for the live commands, from flags and the environment.

Environment names: ``FACECAST_*`` for everything, plus the names users of earlier
face-swap stream tools already know (``SOURCE_IMAGE``, ``TARGET_STREAM``, ``OUTPUT_STREAM``).
Flags win over the environment.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Reference = tuple[Path, Path | None]


def parse_reference(value: str | Reference | list) -> Reference:
    """``PHOTO`` (swap the person in PHOTO with the source face) or ``PHOTO=FACE`` (with the
    face in FACE). Already-parsed pairs pass through."""
    if not isinstance(value, str):
        photo, face = value
        return Path(photo), Path(face) if face else None
    photo, _, face = value.partition("=")
    if not photo.strip():
        raise ValueError(f"reference {value!r}: use PHOTO or PHOTO=FACE")
    return Path(photo), Path(face) if face else None


def parse_bitrate(value: str | int | None) -> int | None:
    """``2500000``, ``2500k`` or ``2.5M`` → bits per second."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kKmM]?)\s*", str(value))
    if not match:
        raise ValueError(f"bitrate {value!r}: use bits/s, or a number with k or M (2500k, 2.5M)")
    scale = {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


SWAP_SIZES = (128, 256, 384, 512)


class ModelSettings(BaseSettings):
    """Which model does each job (``swap``, ``stream`` and ``serve`` share these). The
    defaults are the models embedded in the installed packages; the others are ONNX files
    the user puts in ``models_dir`` (nothing is ever downloaded)."""

    # populate_by_name: flags are passed by field name; the environment uses the aliases
    model_config = SettingsConfigDict(env_prefix="FACECAST_", extra="ignore", populate_by_name=True)

    models_dir: Path | None = None
    detector: str = "blazeface"  # or scrfd | retinaface | yoloface, or a file in models_dir
    recogniser: str = "dlib"  # or arcface
    swapper: str = "mesh"  # or a learned family: inswapper, hyperswap, simswap, ghost, ...
    enhancer: str | None = None  # or gfpgan (any 512x512 face restorer)
    # a learned swapper's output size: a multiple k of the model's own (inswapper 128, the
    # others 256) runs it on k x k sub-pixel shifted samplings of a larger crop and interleaves
    # them (sharper, that many times dearer); at or below the model's own, one run
    swap_size: int = 128
    # tried in order, CPU always last; FACECAST_EXECUTION_PROVIDERS='["cuda","cpu"]'
    execution_providers: list[str] = ["cpu"]
    fp16: bool = False  # TensorRT half precision
    memory_strategy: str = "moderate"  # strict | moderate | tolerant

    @field_validator("execution_providers", mode="before")
    @classmethod
    def _providers(cls, value: list[str] | str | None) -> list[str]:
        from facecast.models.runtime import parse_providers

        items = [value] if isinstance(value, str) else list(value or [])
        return list(parse_providers(items))

    @field_validator("swap_size")
    @classmethod
    def _swap_size(cls, value: int) -> int:
        if value not in SWAP_SIZES:
            raise ValueError(f"swap size {value}: use one of {', '.join(map(str, SWAP_SIZES))}")
        return value

    @field_validator("memory_strategy")
    @classmethod
    def _memory(cls, value: str) -> str:
        if value not in ("strict", "moderate", "tolerant"):
            raise ValueError(f"memory strategy {value!r}: use strict, moderate or tolerant")
        return value


class StreamSettings(ModelSettings):
    source_image: Path | None = Field(
        None, validation_alias=AliasChoices("FACECAST_SOURCE_IMAGE", "SOURCE_IMAGE")
    )
    input: str | None = Field(
        None, validation_alias=AliasChoices("FACECAST_INPUT", "TARGET_STREAM")
    )
    output: str | None = Field(
        None, validation_alias=AliasChoices("FACECAST_OUTPUT", "OUTPUT_STREAM")
    )
    # more photos of the source person (the CLI's repeated --source); source_image may also
    # be a folder of them: each face gets the photo nearest its expression
    extra_sources: list[Path] = []
    faces: str = "all"
    # swap only these people (reference mode), each with the source face or their own;
    # FACECAST_REFERENCES takes a JSON list: '["alice.jpg", "bob.jpg=face-b.jpg"]'
    references: list[Reference] = []
    blend: str = "feather"
    label: bool = True
    realtime: bool = False  # pace a file input at its own frame rate
    detect_every: int = 3
    preset: str = "ultrafast"
    keyint: int | None = None  # frames between keyframes; default about one second
    bitrate: int | None = None  # bits per second; default from the frame size
    stall_timeout: float = 5.0  # no input frame for this long: reconnect
    status_interval: float = 10.0  # seconds between status log lines

    @field_validator("references", mode="before")
    @classmethod
    def _references(cls, value: list | None) -> list[Reference]:
        return [parse_reference(item) for item in value or []]

    @field_validator("bitrate", mode="before")
    @classmethod
    def _bitrate(cls, value: str | int | None) -> int | None:
        return parse_bitrate(value)
