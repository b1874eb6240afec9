"""The file runners: an image or a video file in, the swapped file out, through one
``SwapEngine``; a stop event (SIGINT/SIGTERM) ends a run between frames and leaves no
partial output."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import av

from facecast.engine.pipeline import EngineOptions, FrameResult, SwapEngine, output_mark
from facecast.engine.timing import StageClock
from facecast.errors import MediaError
from facecast.media.frame import Frame
from facecast.media.image_io import read_image, write_image
from facecast.media.kind import detect_kind
from facecast.media.sink import VideoFileSink, VideoQuality
from facecast.media.source import VideoFileSource
from facecast.swap.sources import source_photos

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    """What a run did, frame by frame, for logs, metrics and the bench."""

    frames: int = 0
    frames_swapped: int = 0
    frames_without_face: int = 0
    # frames that showed faces of which the selection picked none (index:N past the count)
    frames_none_chosen: int = 0
    most_faces: int = 0  # the most faces seen in one frame, to say what index:N can be
    faces_swapped: int = 0
    clock: StageClock = field(default_factory=StageClock)

    def count(self, result: FrameResult) -> None:
        self.frames += 1
        self.faces_swapped += result.swapped
        self.most_faces = max(self.most_faces, result.faces)
        if result.swapped:
            self.frames_swapped += 1
        elif result.faces == 0:
            self.frames_without_face += 1
        if result.faces and not result.chosen:
            self.frames_none_chosen += 1


ProgressCallback = Callable[[int, int | None], None]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Frames in flight between file stages: enough to keep both cores busy, small enough that
# memory stays flat on long files (a 4K frame is 25 MB).
FILE_QUEUE_DEPTH = 6
# Video files: detection every few frames, meshes followed in between (see FaceAnalyser).
FILE_DETECT_EVERY = 3


class Stopped(Exception):
    """The run was asked to stop (its ``stop`` event, set by SIGINT/SIGTERM) before the
    output was complete; nothing was written."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Stopped


def swap_file(
    source: Path | list[Path],
    target: Path,
    output: Path,
    options: EngineOptions | None = None,
    progress: ProgressCallback | None = None,
    quality: VideoQuality | None = None,
    stop: threading.Event | None = None,
) -> RunStats:
    """Swap ``source``'s face into an image or a video file (chosen by content). Several
    source photos (or a folder of them) are several photos of one person: each face gets the
    one nearest its expression.
    ``quality``: how a video output is encoded (images ignore it). ``stop``: once set, the
    run ends within a frame with ``Stopped`` and leaves no output, not even a partial one."""
    options = options or EngineOptions()
    if not output.parent.is_dir():
        raise MediaError(f"{output}: cannot write there, folder {output.parent} does not exist")
    if same_file(target, output):
        raise MediaError(f"{output}: that is the target itself; write the result elsewhere")
    kind = detect_kind(target)
    log.debug("%s: %s target; models %s", target, kind, options.models.describe())
    if kind == "image":
        stats = swap_image_file(source, target, output, options, stop)
    else:
        stats = swap_video_file(source, target, output, options, progress, quality, stop)
    clock = stats.clock
    log.debug(
        "ms per call: %s",
        ", ".join(f"{name} {clock.mean_ms(name):.1f}" for name in sorted(clock.calls)),
    )
    return stats


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links and relative spellings included)."""
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def _engine_for(source: Path | list[Path], options: EngineOptions) -> SwapEngine:
    engine = SwapEngine(options)
    photos = source_photos(source if isinstance(source, list) else [source])
    engine.load_sources([(read_image(photo), str(photo)) for photo in photos])
    for reference, face in options.references:
        engine.add_reference(read_image(reference), read_image(face), name=str(reference))
    return engine


def swap_image_file(
    source: Path | list[Path],
    target: Path,
    output: Path,
    options: EngineOptions,
    stop: threading.Event | None = None,
) -> RunStats:
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise MediaError(f"{output}: an image target needs a .png or .jpg output")
    engine = _engine_for(source, replace(options, tiles=True, log_index_misses=False))
    image = read_image(target)
    stats = RunStats()
    stats.count(engine.process(image, stats.clock))
    if stats.frames_none_chosen and options.selection.mode == "index":
        # an image has one frame: writing it unchanged would hide the mistake
        raise MediaError(
            f"{target}: --faces {options.selection} chooses no face, the image shows "
            f"{stats.most_faces} (index:0 to index:{stats.most_faces - 1}); nothing written"
        )
    _check(stop)
    write_image(output, image, output_mark(source, options))
    return stats


class _Done:
    """End-of-stream marker passed down the stage queues (with the error, if any)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def _reader(
    items: Iterator[Frame | av.Packet],
    out: queue.Queue,
    clock: StageClock,
    cancel: threading.Event,
) -> None:
    """Decode into ``out`` until the file ends or ``cancel`` is set (the run failed or
    was stopped: the rest of the file is not decoded only to be thrown away)."""
    try:
        while not cancel.is_set():
            start = time.perf_counter()
            item = next(items, None)
            if isinstance(item, Frame):
                clock.add("decode", time.perf_counter() - start)
            if item is None:
                break
            out.put(item)
        out.put(_Done())
    except BaseException as exc:  # handed to the main thread, which raises it
        out.put(_Done(exc))


def _worker(
    work: Callable[[object], object], inbox: queue.Queue, outbox: queue.Queue | None, errors: list
) -> None:
    """One file stage on its own thread: each item of ``inbox`` through ``work`` into
    ``outbox`` (if any), until ``_Done``, which is passed on. A failure is kept in
    ``errors`` for the main thread, and the rest of ``inbox`` is drained so the stage
    before never blocks on a full queue."""
    try:
        while not isinstance(item := inbox.get(), _Done):
            out = work(item)
            if outbox is not None:
                outbox.put(out)
    except BaseException as exc:
        errors.append(exc)
        while not isinstance(inbox.get(), _Done):
            pass
    finally:
        if outbox is not None:
            outbox.put(_Done())


def swap_video_file(
    source: Path | list[Path],
    target: Path,
    output: Path,
    options: EngineOptions,
    progress: ProgressCallback | None = None,
    quality: VideoQuality | None = None,
    stop: threading.Event | None = None,
) -> RunStats:
    """Every frame, in order, through decode ∥ analyse ∥ swap ∥ encode on four threads
    joined by bounded queues (file mode: nothing is dropped, a full queue just waits). The
    analysis of a frame runs while the one before is swapped: each stage is one thread, and
    the two halves of the engine are its largest. Audio packets travel the same queues
    untouched, so the sink muxes them in container order.
    ``stop``: checked between frames; once set, ``Stopped`` and the output is discarded."""
    detect_every = options.detect_every if options.detect_every > 1 else FILE_DETECT_EVERY
    engine = _engine_for(
        source,
        replace(options, detect_every=detect_every, temporal=True, log_index_misses=False),
    )
    _check(stop)  # a stop while the models loaded: no output file is begun
    stats = RunStats()
    clock = stats.clock
    started = time.perf_counter()
    with VideoFileSource(target) as src:
        if engine.temporal is not None:
            engine.temporal.fps = float(src.fps)  # the smoothing's time base
        total = src.frame_count or None
        mark = output_mark(source, options)

        def render(item: object) -> object:
            if isinstance(item, tuple):  # (frame, plan): swap it; audio passes as it is
                frame, plan = item
                stats.count(engine.render_frame(frame, plan, clock))
                if progress:
                    progress(stats.frames, total)
                return frame
            return item

        def write(item: object) -> None:
            if isinstance(item, Frame):
                start = time.perf_counter()
                sink.write(item)
                clock.add("encode", time.perf_counter() - start)
            else:
                sink.write_audio(item)  # type: ignore[arg-type]

        with VideoFileSink.for_source(output, src, mark=mark, quality=quality) as sink:
            decoded: queue.Queue = queue.Queue(FILE_QUEUE_DEPTH)
            to_render: queue.Queue = queue.Queue(FILE_QUEUE_DEPTH)
            to_encode: queue.Queue = queue.Queue(FILE_QUEUE_DEPTH)
            stage_errors: list[BaseException] = []
            cancel = threading.Event()
            reader = threading.Thread(
                target=_reader,
                args=(src.demux(), decoded, clock, cancel),
                name="decode",
                daemon=True,
            )
            stages = [
                threading.Thread(
                    target=_worker,
                    args=(render, to_render, to_encode, stage_errors),
                    name="swap",
                    daemon=True,
                ),
                threading.Thread(
                    target=_worker,
                    args=(write, to_encode, None, stage_errors),
                    name="encode",
                    daemon=True,
                ),
            ]
            reader.start()
            for stage in stages:
                stage.start()
            error: BaseException | None = None
            try:
                while not isinstance(item := decoded.get(), _Done):
                    _check(stop)
                    if stage_errors:  # the swap or the output failed: stop now
                        raise stage_errors[0]
                    if isinstance(item, Frame):
                        item = (item, engine.analyse(item.image, clock, item.seconds))
                    to_render.put(item)
                error = item.error
            except BaseException as exc:
                error = exc
                cancel.set()
                # drain the reader so its thread can finish (and see ``cancel``)
                while reader.is_alive() and not isinstance(decoded.get(), _Done):
                    pass
            finally:
                to_render.put(_Done())
                for stage in stages:
                    stage.join()
                reader.join()
            error = error or (stage_errors[0] if stage_errors else None)
            if error is not None:
                raise error
            if stats.frames == 0:
                raise MediaError(f"{target}: no video frame could be decoded")
            _check(stop)  # stopped after the last frame: still nothing is written
    clock.add("wall", time.perf_counter() - started)
    engine.close()
    if stats.frames_without_face:
        log.info(
            "%d of %d frames had no face and passed through unchanged",
            stats.frames_without_face,
            stats.frames,
        )
    return stats
