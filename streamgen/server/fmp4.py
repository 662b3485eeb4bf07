"""Fragmented MP4 (ISO BMFF) boxes for one H.264 track: init segment, one fragment per chunk, and a reader.

The layout is what FFmpeg's mp4 muxer writes with ``movflags=frag_keyframe+empty_moov+default_base_moof``
plus a fragment flush at every chunk end: ``ftyp`` + an empty ``moov`` (codec config in ``avcC``, a
``trex`` in ``mvex``) once, then ``moof`` + ``mdat`` pairs, a new pair at every keyframe and at every
chunk end, with ``tfdt`` decode times and ``default-base-is-moof`` data offsets. Media Source
Extensions, browsers, ffmpeg/ffplay and VLC play the concatenation ``init + fragments...`` as it grows.

Why not PyAV's muxer directly: a live chunk has to leave the server complete, but FFmpeg's mp4
muxer only writes a fragment when the *next* fragment's first packet arrives, and the explicit
flush (``av_write_frame(ctx, NULL)``) is not exposed by PyAV. So PyAV/libx264 encode, and this
module (about a hundred lines of boxes) packages; the tests demux the result with FFmpeg.

The reader half (:func:`read_avcc`, :func:`fragment_samples`, :func:`samples_to_annexb`) lets a
client decode fragments incrementally with a plain H.264 decoder.

This module is pure byte manipulation: it never encodes, decodes or touches the network.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

TRACK_ID = 1
_IDENTITY_MATRIX = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)
# trun sample_flags (ISO/IEC 14496-12 8.8.3.1): sync samples depend on nothing; others depend on
# earlier samples and are flagged non-sync so players seek to keyframes only.
_SYNC_FLAGS = 0x02000000
_NON_SYNC_FLAGS = 0x01010000


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I", 8 + len(body)) + kind + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def split_annexb(data: bytes) -> list[bytes]:
    """Split an Annex-B byte stream at its start codes (``00 00 01`` / ``00 00 00 01``) into NAL units."""
    nals: list[bytes] = []
    i, n = 0, len(data)
    start = -1
    while i + 2 < n:
        if data[i] == 0 and data[i + 1] == 0 and data[i + 2] == 1:
            if start >= 0:
                nals.append(data[start:i].rstrip(b"\x00"))  # trailing zeros belong to a 4-byte start code
            i += 3
            start = i
        else:
            i += 1
    if start >= 0 and start < n:
        nals.append(data[start:])
    return [nal for nal in nals if nal]


def annexb_to_avcc_sample(data: bytes) -> bytes:
    """One access unit, Annex-B -> 4-byte length-prefixed NAL units (the MP4 sample format)."""
    return b"".join(struct.pack(">I", len(nal)) + nal for nal in split_annexb(data))


def avcc_box(sps: bytes, pps: bytes) -> bytes:
    """``avcC`` (ISO/IEC 14496-15 5.3.3.1) for one SPS and one PPS of 8-bit 4:2:0 video."""
    profile, compat, level = sps[1], sps[2], sps[3]
    body = bytes([1, profile, compat, level, 0xFF, 0xE1]) + struct.pack(">H", len(sps)) + sps
    body += bytes([1]) + struct.pack(">H", len(pps)) + pps
    if profile in (100, 110, 122, 144):  # High profiles carry chroma format and bit depths
        body += bytes([0xFC | 1, 0xF8 | 0, 0xF8 | 0, 0])
    return box(b"avcC", body)


def codec_string(sps: bytes) -> str:
    """RFC 6381 codec string, e.g. ``avc1.64000a`` (profile, constraint flags, level)."""
    return f"avc1.{sps[1]:02x}{sps[2]:02x}{sps[3]:02x}"


def init_segment(width: int, height: int, timescale: int, sps: bytes, pps: bytes) -> bytes:
    """``ftyp`` + ``moov`` with no samples (``empty_moov``) for one H.264 track."""
    ftyp = box(b"ftyp", b"iso5", struct.pack(">I", 512), b"iso5iso6avc1mp41")
    mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIII", 0, 0, 1000, 0), struct.pack(">IH", 0x00010000, 0x0100),
                    bytes(10), _IDENTITY_MATRIX, bytes(24), struct.pack(">I", TRACK_ID + 1))
    tkhd = full_box(b"tkhd", 0, 0x3, struct.pack(">IIIII", 0, 0, TRACK_ID, 0, 0), bytes(8),
                    struct.pack(">hhhH", 0, 0, 0, 0), _IDENTITY_MATRIX, struct.pack(">II", width << 16, height << 16))
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIII", 0, 0, timescale, 0), struct.pack(">HH", 0x55C4, 0))  # 'und'
    hdlr = full_box(b"hdlr", 0, 0, bytes(4), b"vide", bytes(12), b"VideoHandler\x00")
    vmhd = full_box(b"vmhd", 0, 1, bytes(8))
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    avc1 = box(b"avc1", bytes(6), struct.pack(">H", 1), bytes(16), struct.pack(">HH", width, height),
               struct.pack(">II", 0x00480000, 0x00480000), bytes(4), struct.pack(">H", 1), bytes(32),
               struct.pack(">Hh", 0x0018, -1), avcc_box(sps, pps))
    stbl = box(b"stbl", full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
               full_box(b"stts", 0, 0, bytes(4)), full_box(b"stsc", 0, 0, bytes(4)),
               full_box(b"stsz", 0, 0, bytes(8)), full_box(b"stco", 0, 0, bytes(4)))
    trak = box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, box(b"minf", vmhd, dinf, stbl)))
    mvex = box(b"mvex", full_box(b"trex", 0, 0, struct.pack(">IIIII", TRACK_ID, 1, 0, 0, 0)))
    return ftyp + box(b"moov", mvhd, trak, mvex)


@dataclass(frozen=True)
class Sample:
    """One encoded frame: length-prefixed NAL units, its duration (timescale units), keyframe or not."""

    data: bytes
    duration: int
    keyframe: bool


def fragment(sequence_number: int, base_decode_time: int, samples: Sequence[Sample]) -> bytes:
    """One ``moof`` + ``mdat`` holding ``samples`` (decode order == presentation order: no B-frames)."""
    if not samples:
        raise ValueError("a fragment needs at least one sample")
    tfhd = full_box(b"tfhd", 0, 0x020000, struct.pack(">I", TRACK_ID))  # default-base-is-moof
    tfdt = full_box(b"tfdt", 1, 0, struct.pack(">Q", base_decode_time))
    entries = b"".join(struct.pack(">III", s.duration, len(s.data), _SYNC_FLAGS if s.keyframe else _NON_SYNC_FLAGS)
                       for s in samples)
    # trun flags: data-offset, sample-duration, sample-size, sample-flags present.
    trun_flags = 0x000001 | 0x000100 | 0x000200 | 0x000400

    def moof(data_offset: int) -> bytes:
        trun = full_box(b"trun", 0, trun_flags, struct.pack(">Ii", len(samples), data_offset), entries)
        return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence_number)), box(b"traf", tfhd, tfdt, trun))

    size = len(moof(0))  # the offset field has a fixed width, so the size does not depend on its value
    mdat = box(b"mdat", *(s.data for s in samples))
    return moof(size + 8) + mdat


# ---------------------------------------------------------------------------------------- reading


def iter_boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """Top-level boxes of ``data[start:end]`` as ``(type, payload_start, box_end)``."""
    end = len(data) if end is None else end
    i = start
    while i + 8 <= end:
        size = struct.unpack_from(">I", data, i)[0]
        kind = data[i + 4:i + 8]
        header = 8
        if size == 1:
            size = struct.unpack_from(">Q", data, i + 8)[0]
            header = 16
        if size < header or i + size > end:
            raise ValueError(f"malformed MP4 box {kind!r} at offset {i}")
        yield kind, i + header, i + size
        i += size


def _find(data: bytes, path: Sequence[bytes], start: int = 0, end: int | None = None) -> tuple[int, int]:
    for kind, payload, box_end in iter_boxes(data, start, end):
        if kind == path[0]:
            if len(path) == 1:
                return payload, box_end
            skip = {b"stsd": 8, b"avc1": 78}.get(path[0], 0)  # headers before child boxes
            return _find(data, path[1:], payload + skip, box_end)
    raise ValueError(f"MP4 box {b'/'.join(path).decode()} not found")


def read_avcc(init: bytes) -> tuple[bytes, bytes]:
    """(SPS, PPS) from an init segment's ``avcC``."""
    start, _ = _find(init, [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd", b"avc1", b"avcC"])
    sps_len = struct.unpack_from(">H", init, start + 6)[0]
    sps = init[start + 8:start + 8 + sps_len]
    pps_at = start + 8 + sps_len + 1
    pps_len = struct.unpack_from(">H", init, pps_at)[0]
    return sps, init[pps_at + 2:pps_at + 2 + pps_len]


def fragment_samples(data: bytes) -> list[bytes]:
    """The samples (length-prefixed NAL units) of every ``moof`` + ``mdat`` pair in ``data``, in order."""
    samples: list[bytes] = []
    moof_start = -1
    sizes: list[int] = []
    data_offset = 0
    for kind, payload, box_end in iter_boxes(data):
        if kind == b"moof":
            moof_start = payload - 8
            trun, _ = _find(data, [b"traf", b"trun"], payload, box_end)
            flags = struct.unpack_from(">I", data, trun)[0] & 0xFFFFFF
            count = struct.unpack_from(">I", data, trun + 4)[0]
            pos = trun + 8
            data_offset = 0
            if flags & 0x1:
                data_offset = struct.unpack_from(">i", data, pos)[0]
                pos += 4
            if flags & 0x4:
                pos += 4
            fields = [bit for bit in (0x100, 0x200, 0x400, 0x800) if flags & bit]
            sizes = []
            for _ in range(count):
                values = dict(zip(fields, struct.unpack_from(f">{len(fields)}I", data, pos), strict=True))
                if 0x200 not in values:
                    raise ValueError("trun without per-sample sizes is not supported")
                sizes.append(values[0x200])
                pos += 4 * len(fields)
        elif kind == b"mdat":
            if moof_start < 0:
                raise ValueError("mdat without a preceding moof")
            at = moof_start + data_offset
            for size in sizes:
                samples.append(data[at:at + size])
                at += size
            moof_start = -1
    return samples


def samples_to_annexb(samples: Sequence[bytes]) -> bytes:
    """Length-prefixed samples -> one Annex-B byte stream (for an H.264 decoder)."""
    out = bytearray()
    for sample in samples:
        i = 0
        while i + 4 <= len(sample):
            n = struct.unpack_from(">I", sample, i)[0]
            out += b"\x00\x00\x00\x01" + sample[i + 4:i + 4 + n]
            i += 4 + n
    return bytes(out)
