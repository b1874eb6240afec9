"""An input's audio as the outputs carry it, packets untouched: its codec parameters
(``AudioParams``) and the AAC/ADTS facts that remuxing it needs."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction

import av
import av.container

from facecast.errors import MediaError


@dataclass(frozen=True)
class AudioParams:
    """What an output needs to carry the input's audio packets without re-encoding them.

    ``template`` is a tiny NUT file holding the input stream's exact codec parameters
    (extradata, profile, layout, frame size) and one dummy packet; ``open_template()`` reads
    it back as a stream for ``OutputContainer.add_stream_from_template``. PyAV has no way to
    set codec parameters such as extradata on a stream without an encoder attached, and the
    input's own stream cannot be used because its container closes on every reconnect.
    """

    codec: str
    sample_rate: int
    layout: str
    channels: int
    extradata: bytes
    time_base: Fraction
    template: bytes = field(repr=False)

    def open_template(self) -> tuple[av.container.InputContainer, av.AudioStream]:
        """The template container and its audio stream; close the container when done."""
        container = av.open(io.BytesIO(self.template), format="nut")
        try:
            return container, container.streams.audio[0]
        except IndexError:
            container.close()
            raise MediaError("audio template holds no audio stream") from None

    def same_format(self, other: AudioParams | None) -> bool:
        return other is not None and (
            self.codec,
            self.sample_rate,
            self.channels,
            self.extradata,
        ) == (other.codec, other.sample_rate, other.channels, other.extradata)

    @classmethod
    def from_stream(cls, stream: av.AudioStream) -> AudioParams:
        ctx = stream.codec_context
        extradata = bytes(ctx.extradata or b"")
        if ctx.name == "aac" and not extradata:
            # ADTS (MPEG-TS, raw .aac): the configuration travels in every packet's header
            # and the stream has none, but MP4 with empty_moov and live Matroska write it
            # into their header before any packet ("Malformed AAC bitstream" / "Error
            # parsing AAC extradata"): built here from the probed parameters. The sink
            # strips the ADTS headers (aac_adtstoasc, see output_connection.Connection.open).
            extradata = adts_config(ctx) or b""
        buf = io.BytesIO()
        with av.open(buf, "w", format="nut") as out:
            copy = out.add_stream_from_template(stream)
            if extradata:
                copy.codec_context.extradata = extradata
            # A reader needs one packet to accept the file; its content is never decoded
            # by the sink (only the stream parameters are copied).
            dummy = av.Packet(b"\x00" * 8)
            dummy.pts = dummy.dts = 0
            dummy.time_base = stream.time_base
            dummy.stream = copy
            out.mux(dummy)
        return cls(
            codec=ctx.name,
            sample_rate=int(ctx.sample_rate or 0),
            layout=ctx.layout.name if ctx.layout else "",
            channels=ctx.layout.nb_channels if ctx.layout else 0,
            extradata=extradata,
            time_base=Fraction(stream.time_base or Fraction(1, ctx.sample_rate or 48000)),
            template=buf.getvalue(),
        )


# MPEG-4 audio sampling frequency indices (ISO/IEC 14496-3, table 1.18)
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
_AAC_RATES += (7350,)  # index 12, the last one in use
# The object types an ADTS header can name (its 2-bit profile + 1), by FFmpeg's profile name
_ADTS_OBJECT_TYPES = {"Main": 1, "LC": 2, "SSR": 3, "LTP": 4}


def adts_config(ctx: av.AudioCodecContext) -> bytes | None:
    """The AudioSpecificConfig of an ADTS AAC stream, from its probed parameters: what
    ``aac_adtstoasc`` builds from the first packet's header, known before any packet.
    None for what cannot be told apart this way (a rate or layout outside the table)."""
    rate, channels = int(ctx.sample_rate or 0), ctx.layout.nb_channels if ctx.layout else 0
    profile = ctx.profile or "LC"
    if profile in ("HE-AAC", "HE-AACv2"):
        # The ADTS header describes the LC core (half the rate; v2: mono) and leaves SBR
        # and PS implicit, which FFmpeg's probe reports as the decoded result.
        channels = 1 if profile == "HE-AACv2" else channels
        profile, rate = "LC", rate // 2
    object_type = _ADTS_OBJECT_TYPES.get(profile)
    channel_config = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 8: 7}.get(channels)
    if object_type is None or rate not in _AAC_RATES or channel_config is None:
        return None
    # 5 bits object type, 4 bits rate index, 4 bits channels, 3 zero flags (GASpecificConfig)
    value = object_type << 11 | _AAC_RATES.index(rate) << 7 | channel_config << 3
    return value.to_bytes(2, "big")


def is_adts(audio: av.AudioStream) -> bool:
    """AAC with no configuration in the stream (MPEG-TS, raw .aac): ADTS, whose every packet
    carries its own header."""
    ctx = audio.codec_context
    return ctx.name == "aac" and not ctx.extradata


def whole_adts_frames(data: bytes) -> bool:
    """Whether ``data`` is one or more complete ADTS frames: each starts with the sync word
    and its header's frame length (13 bits, header included) lands on the next one or
    exactly on the end."""
    at = 0
    while at < len(data):
        header = data[at : at + 7]
        if len(header) < 7 or header[0] != 0xFF or header[1] & 0xF6 != 0xF0:
            return False  # no sync word (or layer != 0): not the start of a frame
        length = (header[3] & 0x03) << 11 | header[4] << 3 | header[5] >> 5
        if length < 7:
            return False
        at += length
    return at == len(data) and at > 0


__all__ = ["AudioParams", "adts_config", "is_adts", "whole_adts_frames"]
