"""Options more than one command takes, declared once.

``with_engine_options`` adds the engine's options (which model does each job, how the output is
signed, whether sources need consent) to a command and hands the command one
``EngineFlags`` instead of thirteen parameters: ``swap`` and ``stream`` declare none of them
themselves. Typer reads a command's parameters from its signature, so the decorator gives
the wrapper a signature with the options added.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer


def env_option(env: str, *names: str, **settings: Any) -> Any:
    """An option also read from the environment variable ``env`` (the help shows it)."""
    return typer.Option(*names, envvar=env, **settings)


# Which model does each job: shared by swap and stream. None leaves the environment's
# FACECAST_* value, or the embedded default.
ModelsDirFlag = Annotated[
    Path | None,
    typer.Option(
        "--models-dir",
        metavar="DIR",
        help="Folder with your ONNX models [env FACECAST_MODELS_DIR].",
    ),
]


DetectorFlag = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="Face detector: blazeface (embedded, default), scrfd, retinaface, yoloface, "
        "or a file in --models-dir.",
    ),
]


RecogniserFlag = Annotated[
    str | None,
    typer.Option(metavar="NAME", help="Identity model: dlib (embedded, default) or arcface."),
]


SwapperFlag = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="Swapper: mesh (embedded, default), or a learned family from --models-dir: "
        "inswapper, hyperswap, simswap, ghost, blendswap, uniface, hififace (or a file name).",
    ),
]


SwapSizeFlag = Annotated[
    int | None,
    typer.Option(
        metavar="PX",
        help="A learned swapper's face size: 128, 256, 384 or 512; a multiple k of the "
        "model's own (inswapper 128, the others 256) runs it k x k times on sub-pixel "
        "shifts, interleaved: sharper, that many times dearer [env FACECAST_SWAP_SIZE].",
    ),
]


EnhancerFlag = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="Face restorer after the swap: gfpgan (any 512x512 one); off by default.",
    ),
]


ProvidersFlag = Annotated[
    list[str] | None,
    typer.Option(
        "--execution-provider",
        metavar="NAME",
        help="For ONNX models: cpu (default), cuda or tensorrt; repeat for a fallback order.",
    ),
]


Fp16Flag = Annotated[
    bool | None,
    typer.Option("--fp16/--fp32", help="TensorRT half precision [default: fp32]."),
]


MemoryFlag = Annotated[
    str | None,
    typer.Option(
        "--memory-strategy",
        metavar="NAME",
        help="ONNX sessions: strict, moderate (default) or tolerant.",
    ),
]


ReferenceFlag = Annotated[
    list[str] | None,
    typer.Option(
        metavar="PHOTO[=FACE]",
        help="Swap only this person: PHOTO (gets the source face) or PHOTO=FACE. Repeat for "
        "several people; anyone else is left untouched.",
    ),
]


RequireConsentFlag = Annotated[
    bool,
    typer.Option(
        "--require-consent",
        envvar="FACECAST_REQUIRE_CONSENT",
        help="Refuse a source face that matches no person in the consent registry "
        "(facecast consent add); serve checks its profiles' faces too.",
    ),
]
# serve's, and the consent commands': the state folder, the cluster's store, the audit log
StateDirFlag = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar="FACECAST_STATE_DIR",
        metavar="DIR",
        help="serve's state folder: the profile changes made through the API, laid over "
        "--profiles at the next start, and the consent registry [default: "
        "$XDG_STATE_HOME/facecast, else ~/.local/state/facecast].",
    ),
]
StoreFlag = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar="FACECAST_STORE",
        metavar="URL",
        help="Redis URL of the cluster's store, e.g. redis://store:6379/0: needed by serve "
        "--role ingest and worker; the consent registry is kept there instead.",
    ),
]
AuditLogFlag = Annotated[
    Path | None,
    typer.Option(
        "--audit-log",
        envvar="FACECAST_AUDIT_LOG",
        metavar="FILE",
        help="JSON lines of every face change attempt [default: audit.log in the state folder].",
    ),
]


ConsentDirFlag = Annotated[
    Path | None,
    typer.Option(
        "--consent-dir",
        envvar="FACECAST_STATE_DIR",
        metavar="DIR",
        help="Folder of the consent registry: serve's state folder [default: "
        "$XDG_STATE_HOME/facecast, else ~/.local/state/facecast; env FACECAST_STATE_DIR].",
    ),
]


C2paCertFlag = Annotated[
    Path | None,
    typer.Option(
        "--c2pa-cert",
        envvar="FACECAST_C2PA_CERT",
        metavar="PEM",
        help="Certificate chain (PEM, signer first) that signs a file output's C2PA "
        "manifest; with --c2pa-key [default: a local TEST key; env FACECAST_C2PA_CERT].",
    ),
]


C2paKeyFlag = Annotated[
    Path | None,
    typer.Option(
        "--c2pa-key",
        envvar="FACECAST_C2PA_KEY",
        metavar="PEM",
        help="Private key (PEM) of --c2pa-cert [env FACECAST_C2PA_KEY].",
    ),
]


HostFlag = Annotated[
    str,
    typer.Option(metavar="ADDRESS", help="Listen address; loopback only unless a token is set."),
]


@dataclass(frozen=True)
class EngineFlags:
    """The engine options of one command line (``with_engine_options``)."""

    models: dict[str, object]  # the ModelSettings fields given (``MODEL_OPTIONS``)
    c2pa: tuple[Path | None, Path | None]  # certificate chain and key; neither: the TEST key
    require_consent: bool
    consent_dir: Path | None


# The options with_engine_options adds, in the order --help lists them. Which model does each
# job: (option, its Typer type, the ModelSettings field it sets); None (not given) leaves
# the environment's FACECAST_* value, or the embedded default.
MODEL_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("models_dir", ModelsDirFlag, "models_dir"),
    ("detector", DetectorFlag, "detector"),
    ("recogniser", RecogniserFlag, "recogniser"),
    ("swapper", SwapperFlag, "swapper"),
    ("swap_size", SwapSizeFlag, "swap_size"),
    ("enhancer", EnhancerFlag, "enhancer"),
    ("execution_provider", ProvidersFlag, "execution_providers"),
    ("fp16", Fp16Flag, "fp16"),
    ("memory_strategy", MemoryFlag, "memory_strategy"),
)
# how a file output is signed, and whether source faces need consent: (option, type, default)
SIGNING_OPTIONS = (("c2pa_cert", C2paCertFlag, None), ("c2pa_key", C2paKeyFlag, None))
CONSENT_OPTIONS = (
    ("require_consent", RequireConsentFlag, False),
    ("consent_dir", ConsentDirFlag, None),
)
ENGINE_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    *((name, kind, None) for name, kind, _ in MODEL_OPTIONS),
    *SIGNING_OPTIONS,
    *CONSENT_OPTIONS,
)


def engine_flags(values: dict[str, Any]) -> EngineFlags:
    """The options given (None: not given, so the environment or the default decides)."""
    return EngineFlags(
        models={
            field: values[option]
            for option, _, field in MODEL_OPTIONS
            if values[option] is not None
        },
        c2pa=(values["c2pa_cert"], values["c2pa_key"]),
        require_consent=bool(values["require_consent"]),
        consent_dir=values["consent_dir"],
    )


def with_engine_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command(..., engine: EngineFlags)`` as a Typer command taking ENGINE_OPTIONS."""
    signature = inspect.signature(command)
    hints = typing.get_type_hints(command, include_extras=True)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in signature.parameters.values()
        if p.name != "engine"
    ]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)
        for name, kind, default in ENGINE_OPTIONS
    ]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        values = {name: kwargs.pop(name) for name, _, _ in ENGINE_OPTIONS}
        command(**kwargs, engine=engine_flags(values))

    # Typer reads the signature and the resolved annotations, not the wrapped function's
    parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    wrapper.__annotations__["return"] = None
    return wrapper
