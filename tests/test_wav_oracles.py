"""Independent readers and writers agree with us, sample for sample.

What write_wav writes is read back exactly by python-soundfile (libsndfile),
scipy.io.wavfile, the stdlib wave module and sox; what those programs write is
read by read_wav exactly as soundfile reads it. The header facts that readers
rely on (EXTENSIBLE above two channels, the fact chunk of float files, aligned
sample data, pad bytes) are checked by a RIFF walker written here, independent
of our C parser.
"""

from __future__ import annotations

import struct
import subprocess
import uuid
import wave
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
import soundfile as sf

from helpers import require_tool
from luna_shm import WavError, read_wav, write_wav

RATE = 22050
FRAMES = 101  # odd: 8-bit mono data gets a pad byte

# (dtype, subtype) of every format we write; None is the data's own subtype.
FORMATS = [
    ("uint8", None),
    ("int16", None),
    ("int32", None),
    ("int32", "PCM_24"),
    ("float32", None),
    ("float64", None),
]
FORMAT_IDS = ["uint8", "int16", "int32", "int32-PCM_24", "float32", "float64"]
CHANNELS = [1, 2, 3, 6]

# Every format and channel count, plus one very wide file of the small types.
MATRIX = [
    pytest.param(dtype, subtype, channels, id=f"{fid}-{channels}ch")
    for (dtype, subtype), fid in zip(FORMATS, FORMAT_IDS, strict=True)
    for channels in CHANNELS + ([300] if dtype in ("uint8", "int16") else [])
]

# python-soundfile reads no uint8: it returns 8-bit files as int16.
SOUNDFILE_DTYPE = {"uint8": "int16", "int16": "int16", "int32": "int32",
                   "float32": "float32", "float64": "float64"}

# What each format is in the file: bits per sample, sox's encoding name.
BITS = {"uint8": 8, "int16": 16, "int32": 32, "float32": 32, "float64": 64}
SOX_ENCODING = {"uint8": "unsigned-integer", "int16": "signed-integer",
                "int32": "signed-integer", "float32": "floating-point",
                "float64": "floating-point"}
SOXI_ENCODING = {"uint8": "Unsigned Integer PCM", "int16": "Signed Integer PCM",
                 "int32": "Signed Integer PCM", "float32": "Floating Point PCM",
                 "float64": "Floating Point PCM"}

WAVE_FORMAT_PCM = 1
WAVE_FORMAT_IEEE_FLOAT = 3
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
KSDATAFORMAT_SUBTYPE = {
    WAVE_FORMAT_PCM: uuid.UUID("00000001-0000-0010-8000-00aa00389b71").bytes_le,
    WAVE_FORMAT_IEEE_FLOAT: uuid.UUID("00000003-0000-0010-8000-00aa00389b71").bytes_le,
}


def samples(dtype: str, frames: int, channels: int, seed: int = 0) -> np.ndarray:
    """Deterministic audio over the type's whole range, extremes included.

    Floats are multiples of 2**-23 (float32) or 2**-31 (float64) in [-1, 1),
    which every reader here, sox with its 32-bit integer pipeline included,
    carries without rounding.
    """
    rng = np.random.default_rng(seed)
    shape = (frames,) if channels == 1 else (frames, channels)
    if dtype == "float32":
        data = (rng.integers(-(2**23), 2**23, shape) / 2**23).astype(np.float32)
        low, high = -1.0, (2**23 - 1) / 2**23
    elif dtype == "float64":
        data = rng.integers(-(2**31), 2**31, shape) / 2**31
        low, high = -1.0, (2**31 - 1) / 2**31
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        low, high = info.min, info.max
    flat = data.reshape(-1)
    if flat.size >= 2:
        flat[0], flat[1] = low, high
    return data


def in_file(data: np.ndarray, subtype: str | None) -> np.ndarray:
    """What a file written from data holds: PCM_24 keeps each int32's top 24 bits."""
    if subtype == "PCM_24":
        return data & np.int32(-256)
    return data


def as_soundfile_reads(luna: np.ndarray) -> np.ndarray:
    """Our array as soundfile returns the same file: 8-bit comes back as int16 (x - 128) << 8."""
    if luna.dtype == np.uint8:
        return ((luna.astype(np.int16) - 128) << 8).astype(np.int16)
    return luna


def packed_bytes(expected: np.ndarray, subtype: str | None) -> bytes:
    """The sample bytes of the file: little-endian, 24-bit samples packed in 3 bytes."""
    little = expected.astype(expected.dtype.newbyteorder("<"))
    if subtype == "PCM_24":
        return little.reshape(-1).view(np.uint8).reshape(-1, 4)[:, 1:].tobytes()
    return little.tobytes()


def riff_chunks(raw: bytes) -> list[tuple[bytes, int, int]]:
    """(id, body offset, body size) of every chunk after 'RIFF' size 'WAVE'."""
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE"
    chunks = []
    offset = 12
    while offset + 8 <= len(raw):
        size = int.from_bytes(raw[offset + 4 : offset + 8], "little")
        chunks.append((raw[offset : offset + 4], offset + 8, size))
        offset += 8 + size + (size & 1)
    assert offset == len(raw), "chunks do not end exactly at the end of the file"
    return chunks


def chunk(raw: bytes, name: bytes) -> tuple[int, int]:
    """(body offset, body size) of the one chunk called name."""
    found = [(offset, size) for cid, offset, size in riff_chunks(raw) if cid == name]
    assert len(found) == 1, f"expected one {name!r} chunk, found {len(found)}"
    return found[0]


def sox_samples(path: Path | str, dtype: str, *, bits: int | None = None) -> np.ndarray:
    """The samples sox decodes from path, as raw little-endian values of dtype."""
    sox = require_tool("sox")
    bits = bits or BITS[dtype]
    done = subprocess.run(
        [sox, "-D", str(path), "-t", "raw", "-e", SOX_ENCODING[dtype], "-b", str(bits), "-L", "-"],
        capture_output=True, check=True, timeout=60,
    )
    return np.frombuffer(done.stdout, dtype=np.dtype(dtype).newbyteorder("<"))


def soxi(path: Path | str, flag: str) -> str:
    sox = require_tool("sox")
    done = subprocess.run([sox, "--i", flag, str(path)], capture_output=True, text=True,
                          check=True, timeout=60)
    return done.stdout.strip()


def written(ram: Path, dtype: str, subtype: str | None, channels: int,
            frames: int = FRAMES) -> tuple[Path, np.ndarray]:
    """Write test audio with write_wav; return the path and what the file should hold."""
    data = samples(dtype, frames, channels)
    path = ram / f"ours_{dtype}_{subtype}_{channels}.wav"
    write_wav(path, data, RATE, subtype=subtype)
    return path, in_file(data, subtype)


# ---- what we write, read by others ----------------------------------------------------


@pytest.mark.parametrize(("dtype", "subtype", "channels"), MATRIX)
def test_soundfile_reads_every_format_we_write_sample_exact(ram, dtype, subtype, channels):
    path, expected = written(ram, dtype, subtype, channels)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.frames) == (RATE, channels, FRAMES)
    assert info.subtype == (subtype or {"uint8": "PCM_U8", "int16": "PCM_16", "int32": "PCM_32",
                                        "float32": "FLOAT", "float64": "DOUBLE"}[dtype])
    back, rate = sf.read(str(path), dtype=SOUNDFILE_DTYPE[dtype])
    assert rate == RATE
    np.testing.assert_array_equal(back, as_soundfile_reads(expected), strict=True)


@pytest.mark.parametrize(("dtype", "subtype", "channels"), MATRIX)
def test_scipy_reads_every_format_we_write_sample_exact(ram, dtype, subtype, channels):
    path, expected = written(ram, dtype, subtype, channels)
    rate, back = scipy.io.wavfile.read(path)
    assert rate == RATE
    # scipy returns 24-bit samples as int32 with the sample in the top 24 bits, like us.
    np.testing.assert_array_equal(back, expected, strict=True)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize(("dtype", "subtype", "width"),
                         [("uint8", None, 1), ("int16", None, 2), ("int32", "PCM_24", 3),
                          ("int32", None, 4)], ids=["8bit", "16bit", "24bit", "32bit"])
def test_stdlib_wave_reads_the_pcm_formats_we_write_byte_exact(ram, dtype, subtype, width,
                                                               channels):
    path, expected = written(ram, dtype, subtype, channels)
    with wave.open(str(path), "rb") as reader:
        assert reader.getnchannels() == channels
        assert reader.getsampwidth() == width
        assert reader.getframerate() == RATE
        assert reader.getnframes() == FRAMES
        frames = reader.readframes(FRAMES + 10)
    assert frames == packed_bytes(expected, subtype)


@pytest.mark.parametrize(("dtype", "subtype", "channels"), MATRIX)
def test_sox_reports_the_header_of_every_format_we_write(ram, dtype, subtype, channels):
    path, _ = written(ram, dtype, subtype, channels)
    assert soxi(path, "-r") == str(RATE)
    assert soxi(path, "-c") == str(channels)
    assert soxi(path, "-s") == str(FRAMES)
    assert soxi(path, "-b") == str(24 if subtype == "PCM_24" else BITS[dtype])
    assert soxi(path, "-e") == SOXI_ENCODING[dtype]


@pytest.mark.parametrize(("dtype", "subtype", "channels"), MATRIX)
def test_sox_decodes_every_format_we_write_to_the_same_samples(ram, dtype, subtype, channels):
    path, expected = written(ram, dtype, subtype, channels)
    # 24-bit samples are asked for as 32-bit: sox puts them in the top 24 bits.
    decoded = sox_samples(path, dtype)
    assert decoded.tobytes() == packed_bytes(expected, None)


# ---- what others write, read by us ------------------------------------------------------


def assert_reads_like_soundfile(path: Path, channels: int) -> np.ndarray:
    """read_wav (both modes) returns what soundfile returns for path; returns our array."""
    reference, sf_rate = sf.read(str(path), dtype="float64")  # only for the type probe below
    info = sf.info(str(path))
    sf_dtype = {"PCM_U8": "int16", "PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32",
                "FLOAT": "float32", "DOUBLE": "float64"}[info.subtype]
    expected, _ = sf.read(str(path), dtype=sf_dtype)
    for mmap in (True, False):
        ours, rate = read_wav(path, mmap=mmap)
        assert rate == sf_rate == info.samplerate
        assert ours.shape == expected.shape == ((info.frames,) if channels == 1
                                                else (info.frames, channels))
        np.testing.assert_array_equal(as_soundfile_reads(ours), expected, strict=True)
    assert np.ptp(reference) > 0, "the test audio is silent: the comparison proves nothing"
    return ours


SOUNDFILE_WRITES = [
    # (subtype, numpy dtype handed to soundfile, what our array comes back as)
    ("PCM_U8", "int16", "uint8"),
    ("PCM_16", "int16", "int16"),
    ("PCM_24", "int32", "int32"),
    ("PCM_32", "int32", "int32"),
    ("FLOAT", "float32", "float32"),
    ("DOUBLE", "float64", "float64"),
]


@pytest.mark.parametrize("container", ["WAV", "WAVEX"])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize(("subtype", "given", "ours"), SOUNDFILE_WRITES,
                         ids=[s[0] for s in SOUNDFILE_WRITES])
def test_read_wav_reads_soundfile_files_exactly_as_soundfile_does(tmp_path, subtype, given, ours,
                                                                   channels, container):
    data = samples(given, FRAMES, channels, seed=1)
    path = tmp_path / "soundfile.wav"
    sf.write(str(path), data, RATE, subtype=subtype, format=container)
    back = assert_reads_like_soundfile(path, channels)
    assert back.dtype == np.dtype(ours)
    if subtype in ("PCM_16", "PCM_32", "FLOAT", "DOUBLE"):
        np.testing.assert_array_equal(back, data)
    elif subtype == "PCM_24":
        np.testing.assert_array_equal(back, in_file(data, "PCM_24"))


def test_read_wav_skips_the_list_chunk_that_soundfile_writes_for_metadata(tmp_path):
    data = samples("int16", 7, 2, seed=2)
    path = tmp_path / "tagged.wav"
    with sf.SoundFile(str(path), "w", RATE, 2, "PCM_16") as out:
        out.title = "hello"
        out.comment = "odd"  # an odd-sized string: the LIST chunk has pad bytes
        out.write(data)
    assert b"LIST" in [cid for cid, _, _ in riff_chunks(path.read_bytes())]
    np.testing.assert_array_equal(assert_reads_like_soundfile(path, 2), data)


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32", "float64"])
def test_read_wav_reads_scipy_files_exactly_as_soundfile_does(tmp_path, dtype, channels):
    data = samples(dtype, FRAMES, channels, seed=3)
    path = tmp_path / "scipy.wav"
    scipy.io.wavfile.write(path, RATE, data)
    back = assert_reads_like_soundfile(path, channels)
    np.testing.assert_array_equal(back, data, strict=True)


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_reads_stdlib_wave_files_exactly_as_soundfile_does(tmp_path, width, channels):
    rng = np.random.default_rng(4)
    raw = rng.integers(0, 256, FRAMES * channels * width, dtype=np.uint8).tobytes()
    path = tmp_path / "wave.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(RATE)
        out.writeframes(raw)
    back = assert_reads_like_soundfile(path, channels)
    if width == 3:
        expected = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        padded = np.zeros((expected.shape[0], 4), np.uint8)
        padded[:, 1:] = expected
        assert back.tobytes() == padded.tobytes()
    else:
        assert back.tobytes() == raw


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize(("bits", "encoding"),
                         [(8, "unsigned-integer"), (16, "signed-integer"), (24, "signed-integer"),
                          (32, "signed-integer"), (32, "floating-point"), (64, "floating-point")],
                         ids=["u8", "s16", "s24", "s32", "f32", "f64"])
def test_read_wav_reads_sox_synthesised_files_exactly_as_soundfile_does(tmp_path, bits, encoding,
                                                                        channels):
    sox = require_tool("sox")
    path = tmp_path / "sox.wav"
    subprocess.run(
        [sox, "-n", "-r", "8000", "-c", str(channels), "-b", str(bits), "-e", encoding, str(path),
         "synth", "0.1", "sine", "440", "square", "300", "sawtooth", "700", "vol", "0.8"],
        check=True, capture_output=True, timeout=60,
    )
    back = assert_reads_like_soundfile(path, channels)
    assert back.shape[0] == 800


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize(("bits", "encoding"),
                         [(8, "unsigned-integer"), (16, "signed-integer"), (24, "signed-integer"),
                          (32, "signed-integer"), (32, "floating-point"), (64, "floating-point")],
                         ids=["u8", "s16", "s24", "s32", "f32", "f64"])
def test_read_wav_reads_what_sox_streams_into_a_pipe_exactly_as_soundfile_does(
        tmp_path, bits, encoding, channels):
    # sox cannot seek back in a pipe: its header keeps the "unspecified" data size, 0x7ffff000
    # rounded down to whole frames, and readers take the data to the end of the file.
    sox = require_tool("sox")
    done = subprocess.run(
        [sox, "-n", "-r", "8000", "-c", str(channels), "-b", str(bits), "-e", encoding,
         "-t", "wav", "-", "synth", "0.1", "sine", "440", "square", "300", "vol", "0.8"],
        check=True, capture_output=True, timeout=60,
    )
    path = tmp_path / "sox_pipe.wav"
    path.write_bytes(done.stdout)
    at = done.stdout.index(b"data")
    size = int.from_bytes(done.stdout[at + 4 : at + 8], "little")
    frame = channels * bits // 8
    assert size == 0x7FFFF000 // frame * frame, "sox wrote a finished header: no pipe test"
    back = assert_reads_like_soundfile(path, channels)
    assert back.shape[0] == 800


def test_read_wav_reads_what_espeak_ng_streams_to_stdout_exactly_as_soundfile_does(tmp_path):
    espeak = require_tool("espeak-ng")
    done = subprocess.run([espeak, "--stdout", "a sentence spoken into a pipe"],
                          check=True, capture_output=True, timeout=60)
    path = tmp_path / "espeak_stdout.wav"
    path.write_bytes(done.stdout)
    assert done.stdout[40:44] == (0x7FFFF000).to_bytes(4, "little")  # its unfinished header
    back = assert_reads_like_soundfile(path, 1)
    assert back.shape[0] == (len(done.stdout) - 44) // 2


@pytest.mark.parametrize("subtype", ["ULAW", "ALAW", "IMA_ADPCM", "MS_ADPCM", "GSM610"])
def test_read_wav_refuses_compressed_encodings_with_a_wav_error_that_names_them(tmp_path, subtype):
    path = tmp_path / "compressed.wav"
    sf.write(str(path), samples("int16", 800, 1), 8000, subtype=subtype)
    with pytest.raises(WavError, match=r"unsupported encoding: only PCM and IEEE float"):
        read_wav(path)


def test_read_wav_refuses_big_endian_rifx_files_written_by_soundfile(tmp_path):
    path = tmp_path / "rifx.wav"
    sf.write(str(path), samples("int16", 10, 1), 8000, subtype="PCM_16", endian="BIG")
    assert path.read_bytes()[:4] == b"RIFX"
    with pytest.raises(WavError, match="big-endian RIFX"):
        read_wav(path)


# ---- header facts, checked by our own RIFF walker ----------------------------------------


def fmt_fields(raw: bytes) -> dict[str, int | bytes]:
    offset, size = chunk(raw, b"fmt ")
    tag, channels, rate, byte_rate, align, bits = struct.unpack_from("<HHIIHH", raw, offset)
    fields: dict[str, int | bytes] = dict(tag=tag, channels=channels, rate=rate,
                                          byte_rate=byte_rate, align=align, bits=bits, size=size)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        cb_size, valid_bits, mask = struct.unpack_from("<HHI", raw, offset + 16)
        fields.update(cb_size=cb_size, valid_bits=valid_bits, mask=mask,
                      guid=raw[offset + 24 : offset + 40])
    return fields


@pytest.mark.parametrize(("dtype", "subtype", "channels"),
                         [p for p in MATRIX if p.values[2] > 2])
def test_files_with_more_than_two_channels_are_extensible_with_the_right_guid_and_mask(
        ram, dtype, subtype, channels):
    path, _ = written(ram, dtype, subtype, channels)
    fields = fmt_fields(path.read_bytes())
    bits = 24 if subtype == "PCM_24" else BITS[dtype]
    is_float = dtype.startswith("float")
    assert fields["tag"] == WAVE_FORMAT_EXTENSIBLE
    assert fields["size"] == 40 and fields["cb_size"] == 22
    assert fields["valid_bits"] == bits == fields["bits"]
    assert fields["guid"] == KSDATAFORMAT_SUBTYPE[WAVE_FORMAT_IEEE_FLOAT if is_float
                                                  else WAVE_FORMAT_PCM]
    # The default speaker layout, as libsndfile's (next test): 6 is 5.1; 3 and 300 have
    # no usual layout, "unspecified".
    assert fields["mask"] == {3: 0, 6: 0x3F, 300: 0}[channels]
    assert fields["align"] == channels * bits // 8
    assert fields["byte_rate"] == RATE * channels * bits // 8


@pytest.mark.parametrize("channels", range(3, 11))
def test_the_speaker_mask_of_a_multichannel_file_is_libsndfiles(ram, channels: int) -> None:
    # Found in review: the first n positions were named, so a quad file said 3.1 and a
    # player would send its fourth channel to the subwoofer (libsndfile and sox: quad).
    data = np.zeros((4, channels), np.int16)
    ours = write_wav(str(ram / "ours.wav"), data, RATE)
    theirs = str(ram / "theirs.wav")
    sf.write(theirs, data, RATE, format="WAVEX", subtype="PCM_16")
    assert (fmt_fields(Path(ours).read_bytes())["mask"]
            == fmt_fields(Path(theirs).read_bytes())["mask"])


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize(("dtype", "subtype"), FORMATS, ids=FORMAT_IDS)
def test_files_with_up_to_two_channels_use_the_plain_pcm_or_float_header(ram, dtype, subtype,
                                                                         channels):
    path, _ = written(ram, dtype, subtype, channels)
    fields = fmt_fields(path.read_bytes())
    is_float = dtype.startswith("float")
    assert fields["tag"] == (WAVE_FORMAT_IEEE_FLOAT if is_float else WAVE_FORMAT_PCM)
    assert fields["channels"] == channels and fields["rate"] == RATE
    assert fields["bits"] == (24 if subtype == "PCM_24" else BITS[dtype])


@pytest.mark.parametrize("frames", [0, 1, FRAMES])
@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_float_files_carry_a_fact_chunk_holding_the_frame_count(ram, dtype, channels, frames):
    path, _ = written(ram, dtype, None, channels, frames)
    raw = path.read_bytes()
    offset, size = chunk(raw, b"fact")
    assert size == 4
    assert int.from_bytes(raw[offset : offset + 4], "little") == frames
    assert chunk(raw, b"fact")[0] < chunk(raw, b"data")[0]


@pytest.mark.parametrize(("dtype", "subtype", "channels"), MATRIX)
def test_sample_data_starts_at_an_offset_aligned_for_the_sample_type(ram, dtype, subtype,
                                                                     channels):
    path, expected = written(ram, dtype, subtype, channels)
    raw = path.read_bytes()
    offset, size = chunk(raw, b"data")
    width = 3 if subtype == "PCM_24" else np.dtype(dtype).itemsize
    assert offset % (1 if width == 3 else width) == 0
    assert size == FRAMES * channels * width
    assert raw[offset : offset + size] == packed_bytes(expected, subtype)
    assert int.from_bytes(raw[4:8], "little") == len(raw) - 8
    # And the mapped array we hand out is therefore aligned too.
    if subtype != "PCM_24":
        assert read_wav(path)[0].flags.aligned


@pytest.mark.parametrize(("dtype", "channels", "frames"),
                         [("uint8", 1, 1), ("uint8", 1, 101), ("uint8", 3, 5), ("uint8", 1, 0),
                          ("int16", 1, 3)])
def test_odd_data_sizes_are_followed_by_a_zero_pad_byte(ram, dtype, channels, frames):
    path, expected = written(ram, dtype, None, channels, frames)
    raw = path.read_bytes()
    offset, size = chunk(raw, b"data")
    assert size == expected.nbytes
    if size % 2:
        assert len(raw) == offset + size + 1 and raw[-1] == 0
    else:
        assert len(raw) == offset + size
    assert int.from_bytes(raw[4:8], "little") == len(raw) - 8


def _pcm16_mono_header(riff_size: int, data_size: int) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", data_size))


@pytest.mark.parametrize("tail", [
    b"LIST" + struct.pack("<I", 4) + b"INFO",
    b"id3 " + struct.pack("<I", 10) + b"ID3\x04\x00\x00\x00\x00\x00\x00",
], ids=["LIST", "id3"])
def test_an_empty_data_chunk_followed_by_a_chunk_the_riff_size_omits_reads_no_frames(
        tmp_path: Path, tail: bytes) -> None:
    # A 0-frame WAV whose RIFF size ends at the data chunk, then a chunk a tagger added
    # without fixing the RIFF size: its bytes are a chunk, not samples of a stream.
    path = tmp_path / "empty.wav"
    path.write_bytes(_pcm16_mono_header(36, 0) + tail)
    expected, _ = sf.read(path, dtype="int16")
    assert len(expected) == len(scipy.io.wavfile.read(path)[1]) == 0
    data, rate = read_wav(path)
    assert (rate, len(data)) == (16000, 0)
