"""`facecast stream`, `facecast probe` and `facecast verify`: live streams."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from facecast.cli.base import (
    EXAMPLES,
    app,
    fail,
    in_words,
    one_line_errors,
    warn,
)
from facecast.cli.files import (
    check_consent,
    sign_output,
)
from facecast.cli.options import (
    EngineFlags,
    ReferenceFlag,
    with_engine_options,
)
from facecast.errors import FacecastError


@app.command()
@with_engine_options
def stream(
    source: Annotated[
        list[Path] | None,
        typer.Option(
            "--source",
            "-s",
            metavar="PHOTO",
            help="Face photo [env SOURCE_IMAGE]; repeat it, or name a folder, for several "
            "photos of the person.",
        ),
    ] = None,
    input_url: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            metavar="URL",
            help="rtmp://, udp://, an .sdp file (RTP), .m3u8, srt://, whip-listen://HOST:PORT/"
            "PATH, /dev/videoN, gst:... or a file [env TARGET_STREAM].",
        ),
    ] = None,
    output_url: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="URL",
            help="rtmp://, udp://, rtp://, srt://, gst:... or a file [env OUTPUT_STREAM].",
        ),
    ] = None,
    faces: Annotated[
        str | None,
        typer.Option(metavar="WHICH", help="Which faces: all (default), largest or index:N."),
    ] = None,
    reference: ReferenceFlag = None,
    blend: Annotated[
        str | None, typer.Option(metavar="MODE", help="feather (default) or poisson.")
    ] = None,
    label: Annotated[
        bool | None,
        typer.Option(
            "--label/--no-label", help="Draw the visible 'AI-generated' label [default: label]."
        ),
    ] = None,
    realtime: Annotated[
        bool | None,
        typer.Option(
            "--realtime/--as-fast",
            help="Pace a file input at its frame rate, or read it flat out [default: as-fast].",
        ),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(metavar="NAME", help="x264 preset [default: ultrafast].")
    ] = None,
    keyint: Annotated[
        int | None,
        typer.Option(metavar="N", help="Frames between keyframes [default: about 1 s]."),
    ] = None,
    bitrate: Annotated[
        str | None,
        typer.Option(
            metavar="RATE", help="Video bitrate, e.g. 2500k [default: from the frame size]."
        ),
    ] = None,
    stall_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS", help="Reconnect after this long without a frame [default: 5]."
        ),
    ] = None,
    engine: EngineFlags | None = None,
) -> None:
    """Swap faces in a live stream and publish it, until stopped.

    Runs until SIGINT or SIGTERM, reconnecting a lost input or output. References also
    come from FACECAST_REFERENCES (a JSON list).
    """
    from facecast.config import StreamSettings
    from facecast.live.pipeline import run_stream
    from facecast.models.choice import ModelChoice

    flags = {
        "source_image": source[0] if source else None,
        "extra_sources": source[1:] if source else None,
        "input": input_url,
        "output": output_url,
        "faces": faces,
        "references": reference,
        "blend": blend,
        "label": label,
        "realtime": realtime,
        "preset": preset,
        "keyint": keyint,
        "bitrate": bitrate,
        "stall_timeout": stall_timeout,
    }
    assert engine is not None  # given by with_engine_options
    flags.update(engine.models)
    try:
        settings = StreamSettings(**{k: v for k, v in flags.items() if v is not None})
        ignored = ModelChoice.from_settings(settings).ignored_runtime()
    except (ValueError, FacecastError) as exc:
        raise fail(in_words(exc)) from None
    missing = [
        f"{flag} (or {env})"
        for flag, env, value in (
            ("--source", "SOURCE_IMAGE", settings.source_image),
            ("--input", "TARGET_STREAM", settings.input),
            ("--output", "OUTPUT_STREAM", settings.output),
        )
        if not value
    ]
    if missing:
        raise fail("missing " + ", ".join(missing))
    if engine.require_consent:
        assert settings.source_image is not None
        faces = [face for _, face in settings.references if face is not None]
        check_consent(engine.consent_dir, [settings.source_image, *settings.extra_sources, *faces])
    if ignored:
        warn(ignored)
    from facecast.media import gst
    from facecast.media.live_sink import plan_output
    from facecast.safety.provenance import load_signing_key

    assert settings.output is not None
    with one_line_errors():
        # a file output is signed once whole (C2PA); a live one carries the SEI mark only
        plan = None if gst.is_gst(settings.output) else plan_output(settings.output)
        output_file = Path(plan.target) if plan is not None and plan.kind == "file" else None
        signing = load_signing_key(*engine.c2pa) if output_file else None
        run_stream(settings)
    if output_file is not None and signing is not None and output_file.is_file():
        sign_output(output_file, signing)


@app.command()
def probe(
    publish: Annotated[
        str, typer.Option(metavar="URL", help="Where to publish the stamped test stream.")
    ],
    read: Annotated[str, typer.Option(metavar="URL", help="The swapped stream to read back.")],
    seconds: Annotated[
        float, typer.Option(metavar="SECONDS", help="How long to measure, after the warm-up.")
    ] = 20.0,
    fps: Annotated[
        float, typer.Option(metavar="RATE", help="Frame rate of the test stream.")
    ] = 30.0,
    size: Annotated[
        str, typer.Option(metavar="WxH", help="Frame size of the test stream.")
    ] = "1280x720",
    face: Annotated[
        Path, typer.Option(metavar="PHOTO", help="Face photo shown in the test stream.")
    ] = EXAMPLES / "obama.jpg",
    warmup: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="Seconds after the first stamp that are left out."),
    ] = 2.0,
) -> None:
    """Glass-to-glass latency of a running stream: p50/p95/p99.

    Publishes a stamped test stream, reads the swapped one back and prints the latency
    figures as JSON.
    """
    import json

    from facecast.live.probe import LatencyProbe, load_probe_face

    try:
        width, height = (int(v) for v in size.lower().split("x"))
        photo = load_probe_face(face)
    except ValueError:
        raise fail(f"size {size!r}: use WIDTHxHEIGHT, e.g. 1280x720") from None
    except FacecastError as exc:
        raise fail(str(exc)) from None
    prober = LatencyProbe(publish, read, photo, (width, height), fps, warmup=warmup)
    result = prober.run(seconds + warmup)
    summary = result.summary()
    print(json.dumps(summary))
    if not result.latencies_ms:
        raise fail(f"no stamped frame came back from {read} in {seconds:.0f} s")


@app.command()
def verify(
    target: Annotated[
        str,
        # described in the docstring: Typer lists an argument with a type tag (<str>)
        typer.Argument(metavar="FILE|URL", show_default=False, hidden=True),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of one line each.")
    ] = False,
    seconds: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="A live stream: read it for at most this long."),
    ] = 10.0,
    keyframes: Annotated[
        int,
        typer.Option(metavar="N", help="Keyframes to check for the in-band mark (0: all)."),
    ] = 5,
) -> None:
    """Look for facecast's marks: in-band (SEI), container tags and C2PA.

    FILE|URL is an image or video file, or a live stream (rtmp://, udp://, srt://...).

    Prints one line per mark. Exit code 0 if any mark is found, 1 if none.
    """
    import json

    from facecast.safety.provenance import verify as find_marks

    if seconds <= 0:
        raise fail(f"--seconds {seconds:g}: must be positive")
    if keyframes < 0:
        raise fail(f"--keyframes {keyframes}: use 0 (all) or more")
    with one_line_errors():
        found = find_marks(target, seconds=seconds, keyframes=keyframes or None)
    if as_json:
        print(json.dumps(found.as_json()))
    else:
        for line in found.lines():
            print(line)
    if not found.found:
        raise typer.Exit(code=1)
