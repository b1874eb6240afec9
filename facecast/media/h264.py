"""H.264 framing for low-delay MPEG-TS (see ``output_plan._TS`` for why)."""

from __future__ import annotations

import av

# Access unit delimiter NAL, primary_pic_type 7 (any slice type), Annex B start code.
AUD = b"\x00\x00\x00\x01\x09\xf0"


def with_trailing_aud(packet: av.Packet) -> av.Packet:
    """``packet`` with an access unit delimiter appended: a reader's parser sees the next
    access unit begin and hands this frame on without waiting for the next one."""
    framed = av.Packet(bytes(packet) + AUD)
    framed.pts, framed.dts, framed.time_base = packet.pts, packet.dts, packet.time_base
    framed.stream = packet.stream
    framed.is_keyframe = packet.is_keyframe
    return framed


def is_lone_aud(packet: av.Packet) -> bool:
    """The delimiter that ends a low-delay stream: nothing to decode in it."""
    return packet.size == len(AUD) and bytes(packet) == AUD
