import av
import numpy as np

from facecast.live.probe_pattern import draw_timestamp, read_timestamp

from .conftest import load


def test_stamp_survives_h264_round_trip(tmp_path):
    """Stamps on a real photo, encoded with libx264 ultrafast at a low bitrate and decoded,
    read back exactly."""
    base = load("obama-720p.jpg")
    values = [0, 1, 123456, 2**31 + 5, 4_000_000_000]
    path = tmp_path / "stamped.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        stream.bit_rate = 800_000
        for value in values:
            image = draw_timestamp(base.copy(), value)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with av.open(str(path)) as container:
        decoded = [read_timestamp(f.to_ndarray(format="bgr24")) for f in container.decode(video=0)]
    assert decoded == values


def test_unstamped_or_damaged_frames_read_as_none():
    image = load("obama-720p.jpg")
    assert read_timestamp(image) is None
    stamped = draw_timestamp(image.copy(), 987654)
    assert read_timestamp(stamped) == 987654
    damaged = stamped.copy()
    cell = 1280 // 80
    damaged[cell : 2 * cell, cell : 4 * cell] = 255 - damaged[cell : 2 * cell, cell : 4 * cell]
    assert read_timestamp(damaged) is None
    assert read_timestamp(np.full((360, 640, 3), 128, np.uint8)) is None
