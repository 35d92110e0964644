#!/usr/bin/env python3
"""Build the known-answer WAV files of the parser tests, byte by byte.

Every file is assembled here with ``struct`` and every header field carries a
comment, so a reader can check each byte against the RIFF/WAVE specification
without trusting any WAV library (ours included). Run it from the repository
root after changing a fixture, and commit what it writes::

    .venv/bin/python tests/generate_wavs.py

It writes, deterministically (no clock, no OS randomness):

- ``tests/data/<name>.wav``: files a real writer produces, which must be read;
- ``tests/data/bad_<name>.wav``: malformed files, which must raise ``WavError``;
- ``tests/data/expected.json``: the known answers: for each good file its rate,
  channels, dtype, frames, data offset and the SHA-256 of the samples exactly
  as ``read_wav`` returns them (C order, little-endian; 24-bit samples as int32
  with the sample in the top 24 bits); for each bad file a regular expression
  that the ``WavError`` message must match;
- ``tests/data/corpus/``: the fuzzing seed corpus: ``seed_*`` copies of every
  file above and ``mut_*`` mutations of them. Files named ``crash-*`` there are
  regressions found by the fuzzer (``make fuzz``) and are never touched here.

tests/test_wav_parser.py rebuilds everything into a temporary directory and
checks that the committed files are exactly what this script makes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

# wFormatTag values (mmreg.h)
PCM = 0x0001
ADPCM = 0x0002  # Microsoft ADPCM
IEEE_FLOAT = 0x0003
ALAW = 0x0006
MULAW = 0x0007
EXTENSIBLE = 0xFFFE

# A KSDATAFORMAT_SUBTYPE_* GUID is {XXXXXXXX-0000-0010-8000-00AA00389B71}: its
# first 4 bytes (Data1, little-endian) hold a wFormatTag, the other 12 are fixed.
KSDATAFORMAT_TAIL = bytes.fromhex("0000" "1000" "800000aa00389b71")
# KSDATAFORMAT_SUBTYPE_AMBISONIC_B_FORMAT_PCM {00000001-0721-11D3-8644-C8C1CA000000}:
# a real GUID whose Data1 is 1, like PCM's, that we do not read.
AMBISONIC_B_FORMAT_PCM_GUID = struct.pack("<IHH", 1, 0x0721, 0x11D3) + bytes.fromhex(
    "8644c8c1ca000000")

# dwChannelMask speaker bits (ksmedia.h)
SPEAKER_FRONT_LEFT = 0x1
SPEAKER_FRONT_RIGHT = 0x2
SPEAKER_FRONT_CENTER = 0x4
SPEAKER_LOW_FREQUENCY = 0x8
SPEAKER_BACK_LEFT = 0x10
SPEAKER_BACK_RIGHT = 0x20
MASK_MONO = SPEAKER_FRONT_CENTER
MASK_STEREO = SPEAKER_FRONT_LEFT | SPEAKER_FRONT_RIGHT
MASK_QUAD = MASK_STEREO | SPEAKER_BACK_LEFT | SPEAKER_BACK_RIGHT
MASK_5_1 = MASK_QUAD | SPEAKER_FRONT_CENTER | SPEAKER_LOW_FREQUENCY


# ---- little-endian fields -----------------------------------------------------------------------


def u16(value: int) -> bytes:
    return struct.pack("<H", value)


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def be16(value: int) -> bytes:
    return struct.pack(">H", value)


def be32(value: int) -> bytes:
    return struct.pack(">I", value)


# ---- deterministic sample values ----------------------------------------------------------------


def lcg(seed: int) -> Iterator[int]:
    """Endless 32-bit pseudo-random words (Knuth's MMIX LCG, top half): same on every Python."""
    state = (seed * 0x9E3779B97F4A7C15 + 1) % 2**64
    while True:
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        yield state >> 32


@dataclass
class Samples:
    """Interleaved samples: their bytes in the file and as read_wav returns them."""

    raw: bytes  # what goes into the data chunk
    returned: bytes  # read_wav's array, C order, little-endian
    frames: int
    channels: int
    dtype: str  # numpy name of read_wav's dtype


def pcm(bits: int, frames: int, channels: int, seed: int, valid_bits: int | None = None) -> Samples:
    """PCM samples of a container of `bits`, starting with the extreme values.

    With valid_bits < bits, the low (bits - valid_bits) bits of each sample are
    zero, as WAVE_FORMAT_EXTENSIBLE requires of a writer.
    """
    count = frames * channels
    valid = bits if valid_bits is None else valid_bits
    words = lcg(seed)
    raw = bytearray()
    returned = bytearray()
    for i in range(count):
        if bits == 8:  # unsigned, 128 is silence
            value = (0, 255, 128, 1, 254)[i] if i < 5 else next(words) & 0xFF
            raw += struct.pack("<B", value)
            returned += struct.pack("<B", value)
            continue
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        value = (low, high, 0, -1, 1)[i] if i < 5 else (next(words) % 2**bits) + low
        value &= ~((1 << (bits - valid)) - 1)  # zero the bits below the valid ones
        if bits == 16:
            raw += struct.pack("<h", value)
            returned += struct.pack("<h", value)
        elif bits == 24:  # 3 bytes in the file, int32 << 8 in memory
            raw += struct.pack("<i", value)[:3]
            returned += struct.pack("<i", value << 8)
        elif bits == 32:
            raw += struct.pack("<i", value)
            returned += struct.pack("<i", value)
        else:
            raise ValueError(bits)
    dtype = {8: "uint8", 16: "int16", 24: "int32", 32: "int32"}[bits]
    return Samples(bytes(raw), bytes(returned), frames, channels, dtype)


def ieee_float(bits: int, frames: int, channels: int, seed: int) -> Samples:
    """Float samples: full scale, zero, a value over full scale, then exact binary fractions."""
    fmt = {32: "<f", 64: "<d"}[bits]
    words = lcg(seed)
    raw = bytearray()
    for i in range(frames * channels):
        if i < 5:
            value = (1.0, -1.0, 0.0, 1.75, -0.5)[i]
        else:  # k / 2**15 - 1 (float32) or k / 2**31 - 1 (float64): stored exactly
            scale = 2**15 if bits == 32 else 2**31
            value = (next(words) % (2 * scale)) / scale - 1.0
        raw += struct.pack(fmt, value)
    return Samples(bytes(raw), bytes(raw), frames, channels, {32: "float32", 64: "float64"}[bits])


# ---- chunks -------------------------------------------------------------------------------------


def chunk(ckid: bytes, body: bytes, *, size: int | None = None, pad: bool = True) -> bytes:
    """A RIFF chunk: ckID, ckSize, the body, and a pad byte when the body is odd-sized."""
    assert len(ckid) == 4
    return (
        ckid  # ckID: four ASCII characters
        + u32(len(body) if size is None else size)  # ckSize: bytes of body, pad byte excluded
        + body
        + (b"\0" if pad and len(body) % 2 else b"")  # pad byte: chunks start at even offsets
    )


@dataclass
class Built:
    """A file and where the body of each chunk id first starts in it."""

    blob: bytes
    body_at: dict[bytes, int] = field(default_factory=dict)


def riff(*chunks: bytes, size: int | None = None, magic: bytes = b"RIFF",
         form: bytes = b"WAVE", trailing: bytes = b"") -> Built:
    """A RIFF file: 'RIFF', the size of everything after the size field, 'WAVE', chunks."""
    body = form + b"".join(chunks)
    blob = (
        magic  # 'RIFF' (little-endian RIFF)
        + u32(len(body) if size is None else size)  # RIFF ckSize: file length - 8
        + body  # 'WAVE' form type, then the chunks
        + trailing  # bytes after the RIFF chunk (not part of it)
    )
    built = Built(blob)
    offset = 12
    for piece in chunks:
        built.body_at.setdefault(piece[:4], offset + 8)
        offset += len(piece)
    return built


def fmt(tag: int, channels: int, rate: int, bits: int, *, block_align: int | None = None,
        byte_rate: int | None = None, cb_size: int | None = None, size: int | None = None,
        extra: bytes = b"") -> bytes:
    """A 'fmt ' chunk: WAVEFORMAT fields, optionally cbSize (WAVEFORMATEX) and more."""
    if block_align is None:
        block_align = channels * ((bits + 7) // 8)
    if byte_rate is None:
        byte_rate = rate * block_align
    body = (
        u16(tag)  # wFormatTag: 1 PCM, 3 IEEE float, 0xFFFE EXTENSIBLE, others compressed
        + u16(channels)  # nChannels: interleaved channels per frame
        + u32(rate)  # nSamplesPerSec: frames per second
        + u32(byte_rate)  # nAvgBytesPerSec: nSamplesPerSec * nBlockAlign
        + u16(block_align)  # nBlockAlign: bytes per frame, nChannels * container bytes
        + u16(bits)  # wBitsPerSample: bits of one sample's container
    )
    if cb_size is not None:
        body += u16(cb_size)  # cbSize: bytes of format extension that follow
    return chunk(b"fmt ", body + extra, size=size)


def fmt_extensible(subformat: int, channels: int, rate: int, bits: int, *,
                   valid_bits: int | None = None, channel_mask: int = 0, cb_size: int = 22,
                   block_align: int | None = None, guid: bytes | None = None,
                   size: int | None = None) -> bytes:
    """A 40-byte WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk (WAVEFORMATEXTENSIBLE)."""
    if guid is None:
        guid = (
            u32(subformat)  # SubFormat GUID Data1: the wFormatTag of the samples
            + KSDATAFORMAT_TAIL  # SubFormat GUID Data2-4: -0000-0010-8000-00AA00389B71
        )
    extension = (
        u16(bits if valid_bits is None else valid_bits)  # wValidBitsPerSample: signal bits
        + u32(channel_mask)  # dwChannelMask: speaker of each channel, 0 = unspecified
        + guid  # SubFormat: KSDATAFORMAT_SUBTYPE_PCM / _IEEE_FLOAT
    )
    return fmt(EXTENSIBLE, channels, rate, bits, block_align=block_align, cb_size=cb_size,
               size=size, extra=extension)


def fact(frames: int) -> bytes:
    return chunk(b"fact", u32(frames))  # dwSampleLength: frames in the file


def data(samples: Samples | bytes, *, size: int | None = None, pad: bool = True) -> bytes:
    raw = samples.raw if isinstance(samples, Samples) else samples
    return chunk(b"data", raw, size=size, pad=pad)  # interleaved frames, channel 0 first


def info_list(**tags: str) -> bytes:
    """A 'LIST' chunk of form type 'INFO' with zero-terminated text subchunks."""
    body = b"INFO"  # list type
    for tag, text in tags.items():
        body += chunk(tag.encode("ascii"), text.encode("ascii") + b"\0")  # e.g. INAM: title
    return chunk(b"LIST", body)


def bext(description: str) -> bytes:
    """A Broadcast Wave 'bext' chunk (EBU Tech 3285 v2), 602 bytes + coding history."""
    body = (
        description.encode("ascii").ljust(256, b"\0")  # Description
        + b"luna_shm tests".ljust(32, b"\0")  # Originator
        + b"LUNA0001".ljust(32, b"\0")  # OriginatorReference
        + b"2024-01-02"  # OriginationDate yyyy-mm-dd
        + b"03-04-05"  # OriginationTime hh-mm-ss
        + u32(48000)  # TimeReferenceLow: first sample's count since midnight
        + u32(0)  # TimeReferenceHigh
        + u16(2)  # Version
        + bytes(64)  # UMID
        + u16(0x7FFF)  # LoudnessValue (0x7FFF: not set)
        + u16(0x7FFF)  # LoudnessRange
        + u16(0x7FFF)  # MaxTruePeakLevel
        + u16(0x7FFF)  # MaxMomentaryLoudness
        + u16(0x7FFF)  # MaxShortTermLoudness
        + bytes(180)  # Reserved
        + b"A=PCM,F=48000,W=16,M=mono,T=luna\r\n"  # CodingHistory (odd length: padded)
    )
    return chunk(b"bext", body)


def cue(*positions: int) -> bytes:
    """A 'cue ' chunk with one cue point per sample position."""
    body = u32(len(positions))  # dwCuePoints
    for number, position in enumerate(positions, 1):
        body += (
            u32(number)  # dwName: cue point id
            + u32(position)  # dwPosition: sample position in play order
            + b"data"  # fccChunk: the chunk the point is in
            + u32(0)  # dwChunkStart: 0 without a 'wavl' list
            + u32(0)  # dwBlockStart: 0 for uncompressed data
            + u32(position)  # dwSampleOffset: frame in the data chunk
        )
    return chunk(b"cue ", body)


def adtl_labels(**labels: str) -> bytes:
    """A 'LIST' chunk of type 'adtl' holding 'labl' texts for cue points 1, 2, ..."""
    body = b"adtl"  # list type: associated data
    for number, text in enumerate(labels.values(), 1):
        body += chunk(b"labl", u32(number) + text.encode("ascii") + b"\0")  # dwName, text
    return chunk(b"LIST", body)


def peak(channels: int) -> bytes:
    """A 'PEAK' chunk as libsndfile writes for float files."""
    body = u32(1) + u32(0)  # dwVersion, dwTimeStamp
    for channel in range(channels):
        body += struct.pack("<f", 1.75) + u32(channel)  # peak value, its frame position
    return chunk(b"PEAK", body)


# ---- the fixtures -------------------------------------------------------------------------------


@dataclass
class Fixture:
    name: str
    what: str
    blob: bytes
    facts: dict[str, object]  # expected.json entry

    @property
    def filename(self) -> str:
        return f"{self.name}.wav"


GOOD: list[Callable[[], Fixture]] = []
BAD: list[Callable[[], Fixture]] = []


def good(name: str, what: str, built: Built, samples: Samples, *, rate: int, fmt_tag: int,
         bits: int, extensible: bool = False, soundfile: str = "same") -> Fixture:
    """A file that must be read, with its known answers.

    samples are the whole frames read_wav must return (a partial frame at the
    end of a data chunk is not among them). soundfile says whether
    libsndfile (python-soundfile) reads the same samples: "same", or why not.
    """
    block_align = samples.channels * bits // 8
    facts = {
        "what": what,
        "samplerate": rate,
        "channels": samples.channels,
        "dtype": samples.dtype,
        "format": fmt_tag,
        "bits": bits,
        "block_align": block_align,
        "extensible": extensible,
        "frames": samples.frames,
        "data_offset": built.body_at[b"data"],
        "data_bytes": samples.frames * block_align,
        "file_size": len(built.blob),
        "sha256": hashlib.sha256(samples.returned).hexdigest(),
        "soundfile": soundfile,
    }
    return Fixture(name, what, built.blob, facts)


def bad(name: str, what: str, blob: bytes | Built, error: str) -> Fixture:
    """A malformed file; error is a regular expression the WavError message must match."""
    raw = blob.blob if isinstance(blob, Built) else blob
    return Fixture(f"bad_{name}", what, raw, {"what": what, "error": error})


def register(table: list[Callable[[], Fixture]]) -> Callable[[Callable[[], Fixture]],
                                                                Callable[[], Fixture]]:
    def add(func: Callable[[], Fixture]) -> Callable[[], Fixture]:
        table.append(func)
        return func
    return add


# -- plain PCM and IEEE float, the canonical 44-byte (or 46/58-byte) headers --

def _plain_pcm(bits: int, channels: int, rate: int, frames: int, seed: int) -> Fixture:
    s = pcm(bits, frames, channels, seed)
    name = f"pcm{bits}_{'mono' if channels == 1 else 'stereo'}"
    built = riff(
        fmt(PCM, channels=channels, rate=rate, bits=bits),  # 16-byte WAVEFORMAT
        data(s),
    )
    return good(name, f"{bits}-bit PCM, {channels} channel(s), canonical 44-byte header",
                built, s, rate=rate, fmt_tag=PCM, bits=bits)


for _bits, _channels, _rate, _frames, _seed in [
    (8, 1, 8000, 32, 1), (8, 2, 11025, 24, 2), (16, 1, 16000, 48, 3), (16, 2, 44100, 40, 4),
    (24, 1, 48000, 32, 5), (24, 2, 96000, 24, 6), (32, 1, 44100, 24, 7), (32, 2, 22050, 20, 8),
]:
    GOOD.append(lambda b=_bits, c=_channels, r=_rate, f=_frames, s=_seed: _plain_pcm(b, c, r, f, s))


@register(GOOD)
def pcm16_three_channels_plain() -> Fixture:
    s = pcm(16, 16, 3, seed=9)
    built = riff(fmt(PCM, channels=3, rate=32000, bits=16), data(s))
    return good("pcm16_three_channels_plain",
                "3 channels with a plain PCM fmt (older writers do not use EXTENSIBLE)",
                built, s, rate=32000, fmt_tag=PCM, bits=16)


@register(GOOD)
def pcm16_fmt18_cbsize0() -> Fixture:
    s = pcm(16, 20, 1, seed=10)
    built = riff(fmt(PCM, channels=1, rate=22050, bits=16, cb_size=0), data(s))  # fmt size 18
    return good("pcm16_fmt18_cbsize0", "PCM with an 18-byte WAVEFORMATEX fmt (cbSize 0)",
                built, s, rate=22050, fmt_tag=PCM, bits=16)


@register(GOOD)
def pcm8_samplerate_1() -> Fixture:
    s = pcm(8, 6, 1, seed=11)
    built = riff(fmt(PCM, channels=1, rate=1, bits=8), data(s))
    return good("pcm8_samplerate_1", "the smallest sample rate, 1 Hz", built, s, rate=1,
                fmt_tag=PCM, bits=8)


@register(GOOD)
def pcm16_samplerate_384000() -> Fixture:
    s = pcm(16, 24, 2, seed=12)
    built = riff(fmt(PCM, channels=2, rate=384000, bits=16), data(s))
    return good("pcm16_samplerate_384000", "a high studio rate, 384 kHz", built, s,
                rate=384000, fmt_tag=PCM, bits=16)


@register(GOOD)
def float32_mono_fact() -> Fixture:
    s = ieee_float(32, 24, 1, seed=20)
    built = riff(
        fmt(IEEE_FLOAT, channels=1, rate=48000, bits=32, cb_size=0),  # 18-byte fmt
        fact(s.frames),
        data(s),
    )
    return good("float32_mono_fact", "32-bit float with an 18-byte fmt and a fact chunk",
                built, s, rate=48000, fmt_tag=IEEE_FLOAT, bits=32)


@register(GOOD)
def float32_stereo_no_fact() -> Fixture:
    s = ieee_float(32, 16, 2, seed=21)
    built = riff(fmt(IEEE_FLOAT, channels=2, rate=44100, bits=32), data(s))  # 16-byte fmt
    return good("float32_stereo_no_fact",
                "32-bit float, 16-byte fmt and no fact chunk (as older writers do)",
                built, s, rate=44100, fmt_tag=IEEE_FLOAT, bits=32)


@register(GOOD)
def float64_mono_fact() -> Fixture:
    s = ieee_float(64, 16, 1, seed=22)
    built = riff(fmt(IEEE_FLOAT, channels=1, rate=96000, bits=64, cb_size=0), fact(s.frames),
                 data(s))
    return good("float64_mono_fact", "64-bit float with a fact chunk", built, s, rate=96000,
                fmt_tag=IEEE_FLOAT, bits=64)


@register(GOOD)
def float64_stereo_no_fact() -> Fixture:
    s = ieee_float(64, 12, 2, seed=23)
    built = riff(fmt(IEEE_FLOAT, channels=2, rate=8000, bits=64, cb_size=0), data(s))
    return good("float64_stereo_no_fact", "64-bit float without a fact chunk", built, s,
                rate=8000, fmt_tag=IEEE_FLOAT, bits=64)


@register(GOOD)
def float32_stereo_fact_peak() -> Fixture:
    s = ieee_float(32, 16, 2, seed=24)
    built = riff(fmt(IEEE_FLOAT, channels=2, rate=44100, bits=32, cb_size=0), fact(s.frames),
                 peak(2), data(s))
    return good("float32_stereo_fact_peak", "float as libsndfile writes it: fact and PEAK",
                built, s, rate=44100, fmt_tag=IEEE_FLOAT, bits=32)


# -- WAVE_FORMAT_EXTENSIBLE --

@register(GOOD)
def ext_pcm16_stereo() -> Fixture:
    s = pcm(16, 20, 2, seed=30)
    built = riff(fmt_extensible(PCM, channels=2, rate=44100, bits=16, channel_mask=MASK_STEREO),
                 data(s))
    return good("ext_pcm16_stereo", "EXTENSIBLE 16-bit PCM stereo", built, s, rate=44100,
                fmt_tag=PCM, bits=16, extensible=True)


@register(GOOD)
def ext_pcm24_valid20_stereo_fact() -> Fixture:
    s = pcm(24, 16, 2, seed=31, valid_bits=20)
    built = riff(fmt_extensible(PCM, channels=2, rate=48000, bits=24, valid_bits=20,
                                channel_mask=MASK_STEREO),
                 fact(s.frames),  # sox writes fact for EXTENSIBLE PCM too
                 data(s))
    return good("ext_pcm24_valid20_stereo_fact",
                "EXTENSIBLE PCM: 20 valid bits in 24-bit containers, with fact",
                built, s, rate=48000, fmt_tag=PCM, bits=24, extensible=True)


@register(GOOD)
def ext_pcm32_valid24_mono() -> Fixture:
    s = pcm(32, 16, 1, seed=32, valid_bits=24)
    built = riff(fmt_extensible(PCM, channels=1, rate=96000, bits=32, valid_bits=24,
                                channel_mask=MASK_MONO), data(s))
    return good("ext_pcm32_valid24_mono",
                "EXTENSIBLE PCM: 24 valid bits in 32-bit containers", built, s, rate=96000,
                fmt_tag=PCM, bits=32, extensible=True)


@register(GOOD)
def ext_float32_quad_fact() -> Fixture:
    s = ieee_float(32, 8, 4, seed=33)
    built = riff(fmt_extensible(IEEE_FLOAT, channels=4, rate=48000, bits=32,
                                channel_mask=MASK_QUAD), fact(s.frames), data(s))
    return good("ext_float32_quad_fact", "EXTENSIBLE float32, 4 channels, fact", built, s,
                rate=48000, fmt_tag=IEEE_FLOAT, bits=32, extensible=True)


@register(GOOD)
def ext_float64_mono() -> Fixture:
    s = ieee_float(64, 10, 1, seed=34)
    built = riff(fmt_extensible(IEEE_FLOAT, channels=1, rate=44100, bits=64,
                                channel_mask=MASK_MONO), data(s))
    return good("ext_float64_mono", "EXTENSIBLE float64 mono without fact", built, s,
                rate=44100, fmt_tag=IEEE_FLOAT, bits=64, extensible=True)


@register(GOOD)
def ext_pcm16_5_1() -> Fixture:
    s = pcm(16, 8, 6, seed=35)
    built = riff(fmt_extensible(PCM, channels=6, rate=48000, bits=16, channel_mask=MASK_5_1),
                 data(s))
    return good("ext_pcm16_5_1", "EXTENSIBLE 16-bit PCM 5.1 (6 channels)", built, s,
                rate=48000, fmt_tag=PCM, bits=16, extensible=True)


@register(GOOD)
def ext_pcm16_300_channels_no_mask() -> Fixture:
    s = pcm(16, 2, 300, seed=36)
    built = riff(fmt_extensible(PCM, channels=300, rate=16000, bits=16, channel_mask=0),
                 data(s))
    return good("ext_pcm16_300_channels_no_mask",
                "EXTENSIBLE, 300 channels, channel mask 0 (unspecified)", built, s,
                rate=16000, fmt_tag=PCM, bits=16, extensible=True)


# -- other chunks, any order, odd sizes --

@register(GOOD)
def list_info_between_fmt_and_data() -> Fixture:
    s = pcm(16, 16, 1, seed=40)
    built = riff(fmt(PCM, channels=1, rate=16000, bits=16),
                 info_list(INAM="luna", IART="tests", ISFT="generate_wavs.py"),  # odd texts
                 data(s))
    return good("list_info_between_fmt_and_data", "LIST/INFO between fmt and data", built,
                s, rate=16000, fmt_tag=PCM, bits=16)


@register(GOOD)
def list_info_before_fmt() -> Fixture:
    s = pcm(16, 16, 2, seed=41)
    built = riff(info_list(ICMT="metadata first"), fmt(PCM, channels=2, rate=44100, bits=16),
                 data(s))
    return good("list_info_before_fmt", "LIST/INFO before the fmt chunk", built, s,
                rate=44100, fmt_tag=PCM, bits=16)


@register(GOOD)
def junk_before_fmt() -> Fixture:
    s = pcm(24, 12, 2, seed=42)
    built = riff(chunk(b"JUNK", bytes(28)),  # room for an RF64 ds64 chunk (EBU Tech 3306)
                 fmt(PCM, channels=2, rate=48000, bits=24), data(s))
    return good("junk_before_fmt", "a 28-byte JUNK chunk before fmt (RF64-ready writers)",
                built, s, rate=48000, fmt_tag=PCM, bits=24)


@register(GOOD)
def bext_broadcast_wave() -> Fixture:
    s = pcm(16, 16, 1, seed=43)
    built = riff(bext("luna_shm fixture"), fmt(PCM, channels=1, rate=48000, bits=16),
                 data(s))
    return good("bext_broadcast_wave", "Broadcast Wave: bext (odd size, padded), fmt, data",
                built, s, rate=48000, fmt_tag=PCM, bits=16)


@register(GOOD)
def cue_before_data() -> Fixture:
    s = pcm(16, 24, 1, seed=44)
    built = riff(fmt(PCM, channels=1, rate=8000, bits=16), cue(0, 10), data(s))
    return good("cue_before_data", "a cue chunk between fmt and data", built, s, rate=8000,
                fmt_tag=PCM, bits=16)


@register(GOOD)
def cue_and_labels_after_data() -> Fixture:
    s = pcm(16, 24, 2, seed=45)
    built = riff(fmt(PCM, channels=2, rate=44100, bits=16), data(s), cue(3, 17),
                 adtl_labels(a="start", b="end!"))
    return good("cue_and_labels_after_data", "cue and LIST/adtl labels after data", built, s,
                rate=44100, fmt_tag=PCM, bits=16)


@register(GOOD)
def fmt_after_data() -> Fixture:
    s = pcm(16, 20, 1, seed=46)
    built = riff(data(s), fmt(PCM, channels=1, rate=22050, bits=16))
    return good("fmt_after_data", "the data chunk before the fmt chunk (any order is legal)",
                built, s, rate=22050, fmt_tag=PCM, bits=16,
                soundfile="libsndfile 1.2 stops at the data chunk: \"No 'data' chunk marker\"")


@register(GOOD)
def odd_sized_chunks_with_pad_bytes() -> Fixture:
    s = pcm(16, 16, 2, seed=47)
    built = riff(chunk(b"odd ", b"abc"),  # 3-byte body + pad byte
                 fmt(PCM, channels=2, rate=32000, bits=16),
                 chunk(b"afsp", b"note=1\0"),  # 7-byte body + pad byte
                 data(s))
    return good("odd_sized_chunks_with_pad_bytes",
                "odd-sized chunks before and after fmt, each with its pad byte", built, s,
                rate=32000, fmt_tag=PCM, bits=16)


@register(GOOD)
def odd_data_size_pad_then_list() -> Fixture:
    s = pcm(8, 33, 1, seed=48)
    built = riff(fmt(PCM, channels=1, rate=8000, bits=8), data(s),  # 33 bytes + pad byte
                 info_list(INAM="after the data"))
    return good("odd_data_size_pad_then_list",
                "odd data size, its pad byte, then a LIST chunk after the data", built, s,
                rate=8000, fmt_tag=PCM, bits=8)


@register(GOOD)
def float32_list_fact_after_data() -> Fixture:
    s = ieee_float(32, 12, 1, seed=49)
    built = riff(fmt(IEEE_FLOAT, channels=1, rate=16000, bits=32, cb_size=0), data(s),
                 fact(s.frames), info_list(ISFT="late fact"))
    return good("float32_list_fact_after_data", "float with fact and LIST after the data",
                built, s, rate=16000, fmt_tag=IEEE_FLOAT, bits=32)


@register(GOOD)
def fllr_filler_data_at_4096() -> Fixture:
    s = pcm(16, 16, 2, seed=60)
    built = riff(fmt(PCM, channels=2, rate=44100, bits=16),
                 chunk(b"FLLR", bytes(4044)),  # Apple CoreAudio filler: data starts at 4096
                 data(s))
    assert built.body_at[b"data"] == 4096
    return good("fllr_filler_data_at_4096",
                "a FLLR filler chunk (Apple CoreAudio) that puts the data at offset 4096",
                built, s, rate=44100, fmt_tag=PCM, bits=16)


@register(GOOD)
def ixml_before_fmt_across_4k() -> Fixture:
    s = pcm(24, 8, 1, seed=61)
    xml = b'<?xml version="1.0"?><BWFXML><PROJECT>luna</PROJECT></BWFXML>'
    built = riff(chunk(b"iXML", xml.ljust(4072, b" ")),  # field recorder metadata
                 fmt(PCM, channels=1, rate=48000, bits=24),  # its header spans offset 4096
                 data(s))
    assert built.body_at[b"fmt "] - 8 == 4092
    return good("ixml_before_fmt_across_4k",
                "a 4 KiB iXML chunk before fmt, so that the fmt chunk header crosses "
                "offset 4096", built, s, rate=48000, fmt_tag=PCM, bits=24)


# -- sizes of unfinished streams, partial frames, trailing bytes --

@register(GOOD)
def data_size_ffffffff_riff_size_exact() -> Fixture:
    s = pcm(16, 24, 1, seed=50)
    built = riff(fmt(PCM, channels=1, rate=16000, bits=16), data(s, size=0xFFFFFFFF))
    return good("data_size_ffffffff_riff_size_exact",
                "data size 0xFFFFFFFF (unknown): the data runs to the end of the file",
                built, s, rate=16000, fmt_tag=PCM, bits=16)


@register(GOOD)
def data_and_riff_size_ffffffff_partial_frame() -> Fixture:
    s = pcm(16, 20, 2, seed=51)
    tail = b"\x01\x02"  # half a frame: the stream was cut mid-frame
    built = riff(fmt(PCM, channels=2, rate=44100, bits=16),
                 data(s.raw + tail, size=0xFFFFFFFF), size=0xFFFFFFFF)
    return good("data_and_riff_size_ffffffff_partial_frame",
                "RIFF and data sizes 0xFFFFFFFF (ffmpeg to a pipe), a half frame at the end",
                built, s, rate=44100, fmt_tag=PCM, bits=16)


@register(GOOD)
def data_size_0_riff_size_0() -> Fixture:
    s = pcm(16, 24, 1, seed=52)
    built = riff(fmt(PCM, channels=1, rate=16000, bits=16), data(s, size=0), size=0)
    return good("data_size_0_riff_size_0",
                "RIFF and data sizes 0 (header never updated): data runs to the end",
                built, s, rate=16000, fmt_tag=PCM, bits=16,
                soundfile="libsndfile takes the data size 0 literally and reads 0 frames")


@register(GOOD)
def data_size_0_riff_size_ffffffff() -> Fixture:
    s = ieee_float(32, 12, 2, seed=53)
    built = riff(fmt(IEEE_FLOAT, channels=2, rate=48000, bits=32, cb_size=0),
                 fact(0), data(s, size=0), size=0xFFFFFFFF)
    return good("data_size_0_riff_size_ffffffff",
                "RIFF size 0xFFFFFFFF and data size 0: an unfinished stream", built, s,
                rate=48000, fmt_tag=IEEE_FLOAT, bits=32,
                soundfile="libsndfile takes the data size 0 literally and reads 0 frames")


@register(GOOD)
def trailing_garbage_byte_after_riff() -> Fixture:
    s = pcm(16, 20, 1, seed=54)
    built = riff(fmt(PCM, channels=1, rate=16000, bits=16), data(s), trailing=b"\x7f")
    return good("trailing_garbage_byte_after_riff", "one stray byte after the RIFF chunk",
                built, s, rate=16000, fmt_tag=PCM, bits=16)


@register(GOOD)
def partial_frame_even_size_ignored() -> Fixture:
    s = pcm(16, 20, 2, seed=55)
    built = riff(fmt(PCM, channels=2, rate=44100, bits=16), data(s.raw + b"\x11\x22"))
    return good("partial_frame_even_size_ignored",
                "data size 4n+2 with 4-byte frames: the half frame is ignored", built, s,
                rate=44100, fmt_tag=PCM, bits=16)


@register(GOOD)
def partial_frame_odd_size_padded_ignored() -> Fixture:
    s = pcm(24, 10, 2, seed=56)
    built = riff(fmt(PCM, channels=2, rate=48000, bits=24),
                 data(s.raw + b"\x01\x02\x03"),  # 6n+3 bytes, odd: a pad byte follows
                 info_list(INAM="x"))
    return good("partial_frame_odd_size_padded_ignored",
                "data size 6n+3 with 6-byte frames, pad byte, LIST after: partial frame "
                "ignored", built, s, rate=48000, fmt_tag=PCM, bits=24)


@register(GOOD)
def empty_data_chunk() -> Fixture:
    s = pcm(16, 0, 1, seed=57)
    built = riff(fmt(PCM, channels=1, rate=16000, bits=16), data(s))
    return good("empty_data_chunk", "a finished file with no frames", built, s, rate=16000,
                fmt_tag=PCM, bits=16)


@register(GOOD)
def sox_pipe_unspecified_length() -> Fixture:
    s = pcm(16, 24, 1, seed=58)
    unspecified = 0x7FFFF000 // 2 * 2  # sox MS_UNSPEC rounded down to whole blocks
    built = riff(fmt(PCM, channels=1, rate=8000, bits=16), data(s, size=unspecified),
                 size=4 + 24 + 8 + unspecified)  # sox's wRiffLength for that data length
    return good("sox_pipe_unspecified_length",
                "sox writing to a pipe: data size 0x7FFFF000 ('unspecified', sox and "
                "libsndfile read to the end of the file)", built, s, rate=8000, fmt_tag=PCM,
                bits=16)


# ---- malformed files ----------------------------------------------------------------------------

_S16 = pcm(16, 8, 1, seed=90)


def _fmt16() -> bytes:
    return fmt(PCM, channels=1, rate=16000, bits=16)


BAD_MAKERS: list[Callable[[], Fixture]] = [
    lambda: bad("empty", "a zero-length file", b"", r"too short for a RIFF/WAVE header"),
    lambda: bad("too_short", "11 bytes: shorter than 'RIFF' size 'WAVE'",
                b"RIFF" + u32(3) + b"WAV", r"too short for a RIFF/WAVE header"),
    lambda: bad("riff_header_only", "'RIFF' size 'WAVE' and no chunk at all",
                riff(), r"no fmt chunk"),
    lambda: bad("rifx_big_endian", "a big-endian RIFX file (sox -B writes these)",
                b"RIFX"  # big-endian RIFF
                + be32(4 + 24 + 8 + 16)  # RIFX ckSize, big-endian like every field below
                + b"WAVE"  # form type
                + b"fmt " + be32(16)  # fmt chunk id and size
                + be16(PCM)  # wFormatTag
                + be16(1)  # nChannels
                + be32(16000)  # nSamplesPerSec
                + be32(32000)  # nAvgBytesPerSec
                + be16(2)  # nBlockAlign
                + be16(16)  # wBitsPerSample
                + b"data" + be32(16)  # data chunk id and size
                + bytes(16),  # 8 frames of silence
                r"big-endian RIFX"),
    lambda: bad("rf64", "an RF64 file (EBU Tech 3306) with its ds64 chunk",
                riff(chunk(b"ds64", struct.pack(
                         "<QQQI",
                         72,  # riffSize (64-bit): the real RIFF size
                         16,  # dataSize (64-bit): the real data size
                         8,  # sampleCount (64-bit): frames
                         0)),  # tableLength: no other 64-bit chunk sizes
                     _fmt16(),
                     data(_S16, size=0xFFFFFFFF),  # -1: see ds64's dataSize
                     magic=b"RF64", size=0xFFFFFFFF),  # -1: see ds64's riffSize
                r"RF64"),
    lambda: bad("not_riff_aiff", "an AIFF file ('FORM' ... 'AIFF')",
                b"FORM" + be32(4) + b"AIFF", r"not a RIFF file"),
    lambda: bad("not_riff_text", "a text file", b"hello, this is not audio at all\n",
                r"not a RIFF file"),
    lambda: bad("not_wave_avi", "a RIFF file of form 'AVI '",
                riff(chunk(b"LIST", b"hdrl"), form=b"AVI "), r"not a WAVE file"),
    lambda: bad("no_fmt_chunk", "a data chunk and no fmt chunk",
                riff(chunk(b"LIST", b"INFO"), data(_S16)), r"no fmt chunk"),
    lambda: bad("no_data_chunk", "fmt and LIST, no data chunk",
                riff(_fmt16(), info_list(INAM="no audio")), r"no data chunk"),
    lambda: bad("fmt_too_short", "a 14-byte fmt chunk (WAVEFORMAT without wBitsPerSample)",
                riff(chunk(b"fmt ", u16(PCM) + u16(1) + u32(16000) + u32(32000) + u16(2)),
                     data(_S16)),
                r"fmt chunk is shorter than 16 bytes"),
    lambda: bad("fmt_runs_past_eof", "the file ends in the middle of the fmt chunk",
                riff(_fmt16()).blob[:12 + 8 + 10], r"fmt chunk runs past the end of the file"),
    lambda: bad("truncated_chunk_header", "fmt, then 5 bytes of a chunk header, then EOF",
                riff(_fmt16()).blob + b"LIST\x10", r"truncated chunk header"),
    lambda: bad("data_runs_past_eof", "data size 1000 with 16 bytes present (a cut file)",
                riff(_fmt16(), data(_S16, size=1000)), r"data chunk runs past the end"),
    lambda: bad("zero_channels", "nChannels 0",
                riff(fmt(PCM, channels=0, rate=16000, bits=16, block_align=2), data(_S16)),
                r"0 channels"),
    lambda: bad("zero_samplerate", "nSamplesPerSec 0",
                riff(fmt(PCM, channels=1, rate=0, bits=16), data(_S16)),
                r"sample rate of 0"),
    lambda: bad("block_align_zero", "nBlockAlign 0",
                riff(fmt(PCM, channels=1, rate=16000, bits=16, block_align=0), data(_S16)),
                r"block align is not a whole number of bytes per channel"),
    lambda: bad("block_align_not_multiple_of_channels", "stereo with nBlockAlign 3",
                riff(fmt(PCM, channels=2, rate=16000, bits=16, block_align=3), data(_S16)),
                r"block align is not a whole number of bytes per channel"),
    lambda: bad("block_align_disagrees_with_bits", "16 bits but 4 bytes per sample",
                riff(fmt(PCM, channels=2, rate=16000, bits=16, block_align=8), data(_S16)),
                r"bits per sample disagree with the block align"),
    lambda: bad("pcm_64_bit", "64-bit integer PCM",
                riff(fmt(PCM, channels=1, rate=16000, bits=64), data(_S16)),
                r"PCM samples must be 1 to 4 bytes wide"),
    lambda: bad("float_16_bit", "16-bit IEEE float (half precision)",
                riff(fmt(IEEE_FLOAT, channels=1, rate=16000, bits=16, cb_size=0),
                     data(_S16)),
                r"float samples must be 32 or 64 bits wide"),
    lambda: bad("adpcm", "Microsoft ADPCM (format tag 2)",
                riff(fmt(ADPCM, channels=1, rate=8000, bits=4, block_align=256,
                         byte_rate=4096, cb_size=32,
                         extra=u16(500)  # wSamplesPerBlock
                         + u16(7)  # wNumCoef
                         + struct.pack("<14h", 256, 0, 512, -256, 0, 0, 192, 64, 240, 0,
                                       460, -208, 392, -232)),  # aCoef: the standard 7 pairs
                     fact(500), data(bytes(256))),
                r"unsupported encoding"),
    lambda: bad("alaw", "A-law (format tag 6)",
                riff(fmt(ALAW, channels=1, rate=8000, bits=8, cb_size=0), fact(16),
                     data(bytes(16))),
                r"unsupported encoding"),
    lambda: bad("mulaw", "mu-law (format tag 7)",
                riff(fmt(MULAW, channels=1, rate=8000, bits=8, cb_size=0), fact(16),
                     data(bytes(16))),
                r"unsupported encoding"),
    lambda: bad("extensible_mulaw_subformat", "EXTENSIBLE with KSDATAFORMAT_SUBTYPE_MULAW",
                riff(fmt_extensible(MULAW, channels=1, rate=8000, bits=8,
                                    channel_mask=MASK_MONO), data(bytes(16))),
                r"unsupported encoding"),
    lambda: bad("extensible_unknown_guid", "EXTENSIBLE with the ambisonic B-format GUID",
                riff(fmt_extensible(PCM, channels=4, rate=48000, bits=16,
                                    guid=AMBISONIC_B_FORMAT_PCM_GUID), data(bytes(32))),
                r"unknown WAVE_FORMAT_EXTENSIBLE subformat GUID"),
    lambda: bad("extensible_fmt_18_bytes", "format tag 0xFFFE in an 18-byte fmt chunk",
                riff(fmt(EXTENSIBLE, channels=1, rate=16000, bits=16, cb_size=0),
                     data(_S16)),
                r"WAVE_FORMAT_EXTENSIBLE fmt chunk is too short"),
    lambda: bad("extensible_cbsize_0", "a 40-byte EXTENSIBLE fmt whose cbSize says 0",
                riff(fmt_extensible(PCM, channels=1, rate=16000, bits=16, cb_size=0),
                     data(_S16)),
                r"WAVE_FORMAT_EXTENSIBLE fmt chunk is too short"),
    lambda: bad("extensible_bits_disagree", "EXTENSIBLE, 24-bit containers in 4-byte slots",
                riff(fmt_extensible(PCM, channels=1, rate=16000, bits=24, block_align=4),
                     data(_S16)),
                r"bits per sample disagree with the block align"),
    lambda: bad("two_fmt_chunks", "two fmt chunks before the data",
                riff(_fmt16(), fmt(PCM, channels=2, rate=8000, bits=8), data(_S16)),
                r"more than one fmt chunk"),
    lambda: bad("unknown_length_data_before_fmt",
                "data of size 0xFFFFFFFF (to the end of the file) before any fmt chunk",
                riff(data(_S16, size=0xFFFFFFFF), _fmt16()),
                r"data of unknown length comes before the fmt chunk"),
]
BAD.extend(BAD_MAKERS)


# ---- mutations for the seed corpus --------------------------------------------------------------

INTERESTING_U32 = (0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)


def size_field_offsets(blob: bytes) -> list[int]:
    """Offsets of the RIFF size and of each chunk's size, walking the chunks as written."""
    offsets = [4] if len(blob) >= 8 else []
    at = 12
    while at + 8 <= len(blob):
        offsets.append(at + 4)
        size = struct.unpack_from("<I", blob, at + 4)[0]
        at += 8 + size + (size & 1)
    return offsets


def mutations(blob: bytes, seed: int, count: int) -> list[bytes]:
    """count deterministic mutants of blob: cuts, size-field lies, byte and word changes."""
    words = lcg(seed)
    sizes = size_field_offsets(blob)
    header_end = min(len(blob), 96)
    out = []
    for _ in range(count):
        mutant = bytearray(blob)
        kind = next(words) % 4
        if kind == 0 and mutant:  # cut anywhere
            del mutant[next(words) % len(mutant):]
        elif kind == 1 and sizes:  # a size field says something else
            where = sizes[next(words) % len(sizes)]
            choice = next(words) % (len(INTERESTING_U32) + 1)
            value = INTERESTING_U32[choice] if choice < len(INTERESTING_U32) else next(words)
            mutant[where:where + 4] = u32(value)
        elif kind == 2 and header_end:  # a few header bytes change
            for _ in range(1 + next(words) % 3):
                mutant[next(words) % header_end] = next(words) & 0xFF
        elif header_end >= 2:  # a 16-bit header field becomes 0 or 0xFFFF
            where = (next(words) % (header_end // 2)) * 2
            mutant[where:where + 2] = u16(0xFFFF if next(words) & 1 else 0)
        out.append(bytes(mutant))
    return out


# ---- output -------------------------------------------------------------------------------------


def fixtures() -> list[Fixture]:
    return [make() for make in GOOD] + [make() for make in BAD]


def corpus(all_fixtures: list[Fixture]) -> dict[str, bytes]:
    files = {f"seed_{f.name}": f.blob for f in all_fixtures}
    for number, fixture in enumerate(all_fixtures):
        if fixture.name.startswith("bad_") or len(fixture.blob) > 1024:
            continue
        for k, mutant in enumerate(mutations(fixture.blob, seed=1000 + number, count=3)):
            files[f"mut_{fixture.name}_{k}"] = mutant
    return files


def expected_table(all_fixtures: list[Fixture]) -> dict[str, object]:
    return {
        "comment": "Known answers for tests/data/*.wav, written by tests/generate_wavs.py. "
                   "sha256 is of the samples as read_wav returns them (C order, "
                   "little-endian; 24-bit as int32 with the sample in the top 24 bits).",
        "good": {f.name: f.facts for f in all_fixtures if not f.name.startswith("bad_")},
        "bad": {f.name: f.facts for f in all_fixtures if f.name.startswith("bad_")},
    }


def write_all(out_dir: Path) -> None:
    """Write the fixtures, expected.json and the corpus into out_dir (layout of tests/data)."""
    all_fixtures = fixtures()
    names = [f.name for f in all_fixtures]
    assert len(set(names)) == len(names), "duplicate fixture names"
    corpus_dir = out_dir / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    # Remove what an earlier run made (renamed fixtures), never the fuzzer's crash-* files.
    for old in [*out_dir.glob("*.wav"), *corpus_dir.glob("seed_*"), *corpus_dir.glob("mut_*")]:
        old.unlink()
    for fixture in all_fixtures:
        (out_dir / fixture.filename).write_bytes(fixture.blob)
    (out_dir / "expected.json").write_text(
        json.dumps(expected_table(all_fixtures), indent=1, sort_keys=True) + "\n")
    for name, blob in corpus(all_fixtures).items():
        (corpus_dir / name).write_bytes(blob)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR,
                        help="directory to write into (default: tests/data)")
    args = parser.parse_args(argv)
    write_all(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
