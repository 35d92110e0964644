"""Bad input gets a clear error naming the bad value, and leaves nothing behind."""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import socket
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import LIBRARY_PATH, assert_child_ok, run_in_private_shm
from luna_shm import (
    AudioPool,
    WavError,
    WavWriter,
    create_wav_buffer,
    formats,
    get_temp_audio_path,
    iter_unused_temp_audio,
    read_wav,
    write_wav,
)
from luna_shm._lowlevel import wav_header, wav_header_size

RATE = 8000


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run code in a child python (a hang becomes a TimeoutExpired failure, not a stuck run)."""
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---- write_wav: data, samplerate, subtype -------------------------------------------------

BAD_DATA = [
    pytest.param(np.zeros((4, 2, 2), np.int16), ValueError, r"got 3-D shape \(4, 2, 2\)", id="3-D"),
    pytest.param(np.int16(5), ValueError, r"got 0-D shape \(\)", id="0-D-scalar"),
    pytest.param(np.zeros((), np.float32), ValueError, r"got 0-D shape \(\)", id="0-D-array"),
    pytest.param(np.zeros(8, bool), TypeError, "unsupported sample dtype bool", id="bool"),
    pytest.param(np.zeros(8, np.complex64), TypeError, "unsupported sample dtype complex64",
                 id="complex64"),
    pytest.param(np.zeros(8, np.complex128), TypeError, "unsupported sample dtype complex128",
                 id="complex128"),
    pytest.param(np.array([1, "a", None], object), TypeError, "unsupported sample dtype object",
                 id="object"),
    pytest.param(np.zeros(8, np.int64), TypeError, "unsupported sample dtype int64", id="int64"),
    pytest.param(np.zeros(8, np.uint64), TypeError, "unsupported sample dtype uint64", id="uint64"),
    pytest.param(np.zeros(8, np.float16), TypeError, "unsupported sample dtype float16",
                 id="float16"),
    pytest.param(np.zeros(8, np.int8), TypeError, "unsupported sample dtype int8", id="int8"),
    pytest.param(np.zeros(8, np.uint16), TypeError, "unsupported sample dtype uint16", id="uint16"),
    pytest.param(np.array(["a", "b"]), TypeError, "unsupported sample dtype <U1", id="str"),
    pytest.param(np.zeros(8, "datetime64[s]"), TypeError, r"unsupported sample dtype datetime64",
                 id="datetime"),
    pytest.param(np.zeros((1, 40000), np.int16), ValueError,
                 "40000 channels of 16-bit samples make a frame of 80000 bytes",
                 id="frame-too-wide-for-block-align"),
    pytest.param(np.zeros((1, 65536), np.uint8), ValueError,
                 r"data has 65536 channels \(shape \(1, 65536\)\): a WAV holds at most 65535",
                 id="65536-channels"),
    pytest.param(np.zeros((5, 0), np.int16), ValueError,
                 r"data has 0 channels \(shape \(5, 0\)\): a WAV needs at least one",
                 id="zero-channels"),
]


@pytest.mark.parametrize("to_temp", [False, True], ids=["named-path", "temp-path"])
@pytest.mark.parametrize(("data", "error", "message"), BAD_DATA)
def test_write_wav_rejects_data_a_wav_cannot_hold_and_creates_no_file(ram, data, error, message,
                                                                      to_temp):
    path = None if to_temp else ram / "out.wav"
    with pytest.raises(error, match=message):
        write_wav(path, data, RATE)
    assert os.listdir(ram) == []


@pytest.mark.parametrize(("samplerate", "error", "message"), [
    (0, ValueError, "samplerate must be between 1 and 4294967295, got 0"),
    (-1, ValueError, "got -1"),
    (2**32, ValueError, "got 4294967296"),
    (-(2**70), ValueError, f"got {-(2**70)}"),
    (44100.5, TypeError, "samplerate must be an int, got 44100.5"),
    (44100.0, TypeError, "samplerate must be an int, got 44100.0"),
    (True, TypeError, "samplerate must be an int, got True"),
    ("44100", TypeError, "samplerate must be an int, got '44100'"),
    (None, TypeError, "samplerate must be an int, got None"),
])
def test_write_wav_rejects_a_bad_samplerate_naming_it(ram, samplerate, error, message):
    with pytest.raises(error, match=message):
        write_wav(ram / "out.wav", np.zeros(4, np.int16), samplerate)
    assert os.listdir(ram) == []


@pytest.mark.parametrize("samplerate", [np.uint32(2**32 - 1), np.int64(1), np.int16(8000)],
                         ids=["uint32-max", "int64-1", "int16"])
def test_write_wav_accepts_numpy_integer_samplerates_at_the_limits(ram, samplerate):
    write_wav(ram / "out.wav", np.zeros(4, np.uint8), samplerate)
    assert read_wav(ram / "out.wav")[1] == int(samplerate)


def test_messages_count_one_channel_in_the_singular(ram):
    with pytest.raises(ValueError, match="samplerate 4294967295 with 1 channel of 16-bit "
                                         "samples overflows the WAV byte-rate field"):
        write_wav(ram / "out.wav", np.zeros(2, np.int16), 2**32 - 1)
    assert os.listdir(ram) == []


def test_write_wav_rejects_a_byte_rate_that_overflows_its_32_bit_field(ram):
    with pytest.raises(ValueError, match="samplerate 4294967295 with 8 channels of 64-bit "
                                         "samples overflows the WAV byte-rate field"):
        write_wav(ram / "out.wav", np.zeros((2, 8)), 2**32 - 1)
    assert os.listdir(ram) == []


@pytest.mark.parametrize("subtype", ["PCM_12", "VORBIS", "ULAW", "", 16, b"PCM_16"])
def test_write_wav_rejects_an_unknown_subtype_naming_it(ram, subtype):
    with pytest.raises(ValueError, match=re.escape(f"unknown subtype {subtype!r}")):
        write_wav(ram / "out.wav", np.zeros(4, np.int16), RATE, subtype=subtype)
    assert os.listdir(ram) == []


def test_write_wav_names_a_huge_unknown_subtype_by_its_length(ram):
    with pytest.raises(ValueError, match=r"^unknown subtype str of length 500000: use one of "):
        write_wav(ram / "out.wav", np.zeros(4, np.int16), RATE, subtype="X" * 500_000)
    assert os.listdir(ram) == []


@pytest.mark.parametrize(("dtype", "subtype"), [
    ("int16", "PCM_24"), ("int16", "FLOAT"), ("float64", "FLOAT"), ("float32", "DOUBLE"),
    ("uint8", "PCM_16"), ("int32", "DOUBLE"), ("int32", "PCM_16"), ("int16", "PCM_U8"),
])
def test_write_wav_rejects_a_subtype_that_does_not_match_the_data(ram, dtype, subtype):
    with pytest.raises(ValueError, match=f"subtype '{subtype}' stores .* but data is {dtype}"):
        write_wav(ram / "out.wav", np.zeros(4, dtype), RATE, subtype=subtype)
    assert os.listdir(ram) == []


def test_subtype_names_are_matched_case_insensitively(ram):
    write_wav(ram / "out.wav", np.array([1 << 8, -(1 << 8)], np.int32), RATE, subtype="pcm_24")
    assert (ram / "out.wav").stat().st_size == 44 + 6


@pytest.mark.parametrize("shape", [(2**31 + 1,), (2**30 + 1, 2)], ids=["mono", "stereo"])
def test_write_wav_rejects_data_over_4_gib_without_touching_or_writing_it(ram, shape):
    # A read-only mapping of a sparse file: 4 GiB of samples that take no memory at all.
    nbytes = int(np.prod(shape)) * 2
    sparse = ram / "sparse.raw"
    with open(sparse, "wb") as handle:
        handle.truncate(nbytes)
    huge = np.memmap(sparse, dtype=np.int16, mode="r", shape=shape)
    try:
        assert huge.flags.c_contiguous and huge.nbytes == nbytes
        with pytest.raises(ValueError, match=f"data too large for a WAV file: {nbytes} bytes"):
            write_wav(ram / "huge.wav", huge, RATE)
        with pytest.raises(ValueError, match="data too large"):
            write_wav(None, huge, RATE, atomic=True)
    finally:
        del huge
        gc.collect()
    assert os.listdir(ram) == ["sparse.raw"]
    assert os.stat(sparse).st_blocks == 0, "the samples were touched"


@pytest.mark.parametrize(("path", "error", "message"), [
    (b"/dev/shm/x.wav", TypeError, "path must be str"),
    ("bad\0name.wav", ValueError, "path contains a NUL byte"),
    (42, TypeError, "path must be str, os.PathLike\\[str\\] or None, got 42"),
])
def test_write_wav_rejects_a_path_of_the_wrong_kind(ram, path, error, message):
    with pytest.raises(error, match=message):
        write_wav(path, np.zeros(4, np.int16), RATE)


@pytest.mark.parametrize("to_temp", [False, True], ids=["named-path", "temp-path"])
@pytest.mark.parametrize(("data", "got"), [
    pytest.param([1, 2, 3], "a list of Python ints, which numpy makes int64", id="list-of-ints"),
    pytest.param((1, 2), "a tuple of Python ints, which numpy makes int64", id="tuple-of-ints"),
    pytest.param([True, False], "a list of Python bools, which numpy makes bool", id="bools"),
    pytest.param(7, "7, which numpy makes int64", id="int-scalar"),
])
def test_write_wav_of_python_values_numpy_makes_int64_of_says_so_and_what_to_pass(
        ram, data, got, to_temp):
    path = None if to_temp else ram / "out.wav"
    with pytest.raises(TypeError, match=re.escape(
            f"data must be a numpy array of uint8, int16, int32, float32 or float64 samples, "
            f"got {got}: pass e.g. np.asarray(data, dtype=np.int16)")):
        write_wav(path, data, RATE)
    assert os.listdir(ram) == []


RAW_PCM = np.array([1000, -1000, 2000], np.int16).tobytes()


@pytest.mark.parametrize("raw", [RAW_PCM, bytearray(RAW_PCM), memoryview(RAW_PCM)],
                         ids=["bytes", "bytearray", "memoryview"])
def test_raw_bytes_are_refused_by_every_writer_not_written_as_8_bit_samples(ram, raw):
    # numpy makes uint8 samples of a bytearray: three int16 samples became six of noise
    message = re.escape(f"got raw bytes ({type(raw).__name__} of 6 bytes): say what they "
                        "hold with np.frombuffer(data, dtype=np.int16)")
    with pytest.raises(TypeError, match=message):
        write_wav(ram / "out.wav", raw, RATE)
    with AudioPool(slots=1, max_bytes=4096) as pool, pytest.raises(TypeError, match=message):
        pool.write_wav(raw, RATE)
    with WavWriter(ram / "s.wav", RATE, 1, "uint8") as writer:
        with pytest.raises(TypeError, match=message):
            writer.write(raw)
        assert writer.frames == 0
    assert sorted(os.listdir(ram)) == ["s.wav"]
    # a memoryview that says its type is samples of that type
    typed = memoryview(np.array([1000, -1000], np.int16))
    assert read_wav(write_wav(ram / "typed.wav", typed, RATE))[0].tolist() == [1000, -1000]


def test_write_wav_of_none_or_a_ragged_list_names_it(ram):
    with pytest.raises(TypeError, match=r"data must be a numpy array of .* samples, got None$"):
        write_wav(ram / "out.wav", None, RATE)
    with pytest.raises(ValueError, match=re.escape("data ([[1.0, 2.0], [3.0]]) is not an array "
                                                   "of samples")):
        write_wav(ram / "out.wav", [[1.0, 2.0], [3.0]], RATE)
    assert os.listdir(ram) == []


HUGE_INT = 10**5000  # its repr alone raises ValueError (more than 4300 digits)


@pytest.mark.parametrize(("samplerate", "error"), [
    (HUGE_INT, ValueError), (-HUGE_INT, ValueError), ("x" * 500_000, TypeError),
    (b"\0" * 500_000, TypeError),
], ids=["huge-int", "huge-negative-int", "long-str", "long-bytes"])
def test_a_huge_argument_is_named_by_its_type_and_size_not_its_whole_value(ram, samplerate,
                                                                          error):
    with pytest.raises(error, match=r"^samplerate must be") as caught:
        write_wav(ram / "out.wav", np.zeros(4, np.int16), samplerate)
    assert len(str(caught.value)) < 200
    assert re.search(r"int of 16610 bits|str of length 500000|bytes of length 500000",
                     str(caught.value))
    with pytest.raises(error, match=r"^frames must be|^frames=an int of 16610 bits is too long"):
        create_wav_buffer(samplerate, RATE)
    assert os.listdir(ram) == []


# ---- create_wav_buffer and WavWriter arguments ---------------------------------------------


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(frames=-1), ValueError, "frames must be >= 0, got -1"),
    (dict(frames=1.5), TypeError, "frames must be an int, got 1.5"),
    (dict(frames=True), TypeError, "frames must be an int, got True"),
    (dict(samplerate=0), ValueError, "samplerate must be between 1 and .* got 0"),
    (dict(samplerate=2**32), ValueError, "got 4294967296"),
    (dict(samplerate=44100.5), TypeError, "got 44100.5"),
    (dict(channels=0), ValueError, "channels must be between 1 and 65535, got 0"),
    (dict(channels=65536), ValueError, "got 65536"),
    (dict(channels=2.0), TypeError, "channels must be an int, got 2.0"),
    (dict(channels=40000), ValueError, "40000 channels of 16-bit samples"),
    (dict(dtype="int64"), TypeError, "dtype must be one of .*, got 'int64'$"),
    (dict(dtype="float16"), TypeError, "dtype must be one of .*, got 'float16'$"),
    (dict(dtype=bool), TypeError, r"got <class 'bool'> \(numpy bool\)$"),
    (dict(dtype="no such type"), TypeError, "got 'no such type'$"),
    (dict(dtype=None), TypeError,
     "^dtype must be one of uint8, int16, int32, float32 or float64, got None$"),
    (dict(dtype="int"), TypeError, r"got 'int' \(numpy int64\)$"),
    (dict(frames=2**31, channels=2), ValueError,
     "frames=2147483648 is too long for a WAV file: with 2 channels of 16-bit samples it "
     r"holds at most 1073741814 frames \(4 GiB; RF64 is not supported\)"),
    (dict(frames=2**62, channels=4, dtype="float64"), ValueError,
     f"frames={2**62} is too long for a WAV file: .* at most 134217725 frames"),
    (dict(frames=2**64), ValueError, f"frames={2**64} is too long for a WAV file"),
    (dict(frames=2**31 - 18), ValueError, "at most 2147483629 frames"),
])
@pytest.mark.parametrize("anonymous", [False, True], ids=["named", "anonymous"])
def test_create_wav_buffer_rejects_bad_arguments_before_creating_anything(ram, kwargs, error,
                                                                         message, anonymous):
    arguments = dict(frames=10, samplerate=RATE, channels=1, dtype="int16") | kwargs
    with pytest.raises(error, match=message):
        create_wav_buffer(**arguments, anonymous=anonymous)
    assert os.listdir(ram) == []


FLAG_CALLS = {
    "create_wav_buffer(anonymous)": lambda ram, flag: create_wav_buffer(10, RATE, anonymous=flag),
    "AudioPool(anonymous)": lambda ram, flag: AudioPool(1, 4096, anonymous=flag),
    "write_wav(atomic)": lambda ram, flag: write_wav(None, np.zeros(4, np.int16), RATE,
                                                     atomic=flag),
    "read_wav(mmap)": lambda ram, flag: read_wav(write_wav(ram / "r.wav", np.zeros(4, np.int16),
                                                           RATE), mmap=flag),
    "read_wav(always_2d)": lambda ram, flag: read_wav(
        write_wav(ram / "r.wav", np.zeros(4, np.int16), RATE), always_2d=flag),
    "get_temp_audio_path(create)": lambda ram, flag: get_temp_audio_path(create=flag),
    "iter_unused_temp_audio(remove)": lambda ram, flag: list(iter_unused_temp_audio(remove=flag)),
}


@pytest.mark.parametrize("flag", ["no", "False", 0, 1, None, [True]], ids=repr)
@pytest.mark.parametrize("call", list(FLAG_CALLS))
def test_a_flag_that_is_not_a_bool_is_refused_naming_it_not_taken_for_its_truth(ram, call, flag):
    # anonymous="no" made an anonymous buffer, mmap="false" a mapping: truthiness does the
    # opposite of what such a caller meant.
    name = call[call.index("(") + 1:-1]
    unused = ram / "luna_audio_unused.wav"  # remove="no" must not remove it
    unused.write_bytes(b"")
    with pytest.raises(TypeError, match=rf"^{name} must be True or False, got "):
        FLAG_CALLS[call](ram, flag)
    assert set(os.listdir(ram)) - {"r.wav"} == {unused.name}
    made = FLAG_CALLS[call](ram, np.bool_(False))  # numpy's bool is a bool
    if hasattr(made, "close"):
        made.close()


def test_an_anonymous_buffer_with_a_path_is_refused(ram):
    with pytest.raises(ValueError, match="an anonymous buffer has no path"):
        create_wav_buffer(10, RATE, path=ram / "x.wav", anonymous=True)
    assert os.listdir(ram) == []


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(samplerate=0), ValueError, "got 0"),
    (dict(channels=0), ValueError, "got 0"),
    (dict(dtype="int64"), TypeError, "dtype must be one of .*, got 'int64'"),
    (dict(dtype=None), TypeError, "dtype must be one of .*, got None"),
    (dict(channels=40000), ValueError, "40000 channels"),
])
def test_wavwriter_rejects_bad_arguments_before_creating_anything(ram, kwargs, error, message):
    arguments = dict(path=ram / "s.wav", samplerate=RATE, channels=1, dtype="int16") | kwargs
    with pytest.raises(error, match=message):
        WavWriter(**arguments)
    assert os.listdir(ram) == []


# ---- read_wav: what is not a WAV ---------------------------------------------------------


def test_read_wav_of_a_missing_file_raises_file_not_found_with_errno_and_filename(ram):
    missing = ram / "missing.wav"
    with pytest.raises(FileNotFoundError) as caught:
        read_wav(missing)
    assert caught.value.errno == errno.ENOENT
    assert caught.value.filename == str(missing)


def test_read_wav_below_a_regular_file_raises_not_a_directory(ram):
    (ram / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError) as caught:
        read_wav(ram / "file" / "x.wav")
    assert caught.value.errno == errno.ENOTDIR
    assert caught.value.filename == str(ram / "file" / "x.wav")


def test_read_wav_of_a_directory_raises_is_a_directory_with_errno_and_filename(ram):
    with pytest.raises(IsADirectoryError) as caught:
        read_wav(ram)
    assert caught.value.errno == errno.EISDIR
    assert caught.value.filename == str(ram)


def test_read_wav_of_a_fifo_raises_a_wav_error_at_once_instead_of_waiting_for_a_writer(ram):
    fifo = ram / "pipe.wav"
    os.mkfifo(fifo)
    done = run_python(f"""
        from luna_shm import WavError, read_wav
        try:
            read_wav({str(fifo)!r})
        except WavError as exc:
            print(exc)
    """)
    assert assert_child_ok(done).strip() == f"{fifo}: not a regular file"


@pytest.mark.parametrize("mmap", [True, False], ids=["view", "copy"])
def test_read_wav_of_a_socket_is_a_wav_error_naming_it_not_enxio(ram, mmap):
    path = ram / "socket.wav"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        with pytest.raises(WavError) as caught:
            read_wav(path, mmap=mmap)
    assert str(caught.value) == f"{path}: not a regular file"


def test_create_wav_buffer_takes_exactly_as_many_frames_as_a_wav_header_can_describe():
    for dtype in ("uint8", "int16", "int32", "float32", "float64"):
        for channels in (1, 2, 3, 7):
            spec = formats.spec_for(formats.natural_subtype(np.dtype(dtype)), RATE, channels)
            limit = formats.max_frames(spec)
            block = channels * np.dtype(dtype).itemsize
            assert len(wav_header(spec, limit * block)) == wav_header_size(spec)
            with pytest.raises(OSError) as caught:
                wav_header(spec, (limit + 1) * block)
            assert caught.value.errno == errno.EFBIG
            formats.check_frames_fit(np.int64(limit), spec)  # numpy integers are fine
            with pytest.raises(ValueError, match=f"frames={limit + 1} is too long"):
                formats.check_frames_fit(limit + 1, spec)


@pytest.mark.parametrize(("path", "allowed"), [
    (b"RIFF" + bytes(500_000), "str or os.PathLike\\[str\\]"),
    (bytearray(500_000), "str or os.PathLike\\[str\\]"),
    (np.zeros(500_000, np.int16), "str or os.PathLike\\[str\\]"),
    (None, "str or os.PathLike\\[str\\]"),
], ids=["wav-bytes", "bytearray", "array", "none"])
def test_read_wav_of_something_not_a_path_names_its_type_and_size_not_its_content(path, allowed):
    for mmap in (True, False):
        with pytest.raises(TypeError, match=f"^path must be {allowed}, got ") as caught:
            read_wav(path, mmap=mmap)
        assert len(str(caught.value)) < 200


def test_write_wav_to_a_long_bytes_path_or_a_long_path_with_a_nul_names_it_briefly(ram):
    with pytest.raises(TypeError, match=r"got bytes of length 500004 .WAV bytes in memory are "
                                        r"not a path"):
        write_wav(b"RIFF" + bytes(500_000), np.zeros(4, np.int16), RATE)
    long_path = str(ram) + "/" + "\0" * 500_000
    with pytest.raises(ValueError, match=f"^path contains a NUL byte: str of length "
                                         f"{len(long_path)}$"):
        write_wav(long_path, np.zeros(4, np.int16), RATE)
    assert os.listdir(ram) == []


def _a_file_shorter_than_its_size() -> str:
    """A /sys file that holds less than stat says (sysfs says 4096); skip when none is."""
    for path in ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/profiling",
                 "/sys/devices/system/cpu/online", "/sys/kernel/uevent_seqnum",
                 "/sys/power/state"):
        try:
            with open(path, "rb") as handle:
                if 0 < len(handle.read()) < os.fstat(handle.fileno()).st_size:
                    return path
        except OSError:
            continue
    pytest.skip("no readable /sys file that holds less than its size says here")


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
def test_read_wav_of_a_proc_or_sys_file_raises_a_wav_error_naming_it(mmap):
    sys_file = _a_file_shorter_than_its_size()
    with pytest.raises(WavError, match=f"^{re.escape(sys_file)}: file ended before its size"):
        read_wav(sys_file, mmap=mmap)
    with pytest.raises(WavError, match=r"^/proc/self/status: file is too short"):
        read_wav("/proc/self/status", mmap=mmap)


def valid_wav(ram: Path) -> bytes:
    """A small valid stereo 16-bit WAV: 44-byte header, 10 frames."""
    path = write_wav(ram / "valid.wav", np.arange(20, dtype=np.int16).reshape(10, 2), RATE)
    raw = Path(path).read_bytes()
    os.unlink(path)
    assert len(raw) == 84 and raw[36:40] == b"data"
    return raw


def set_u16(raw: bytes, offset: int, value: int) -> bytes:
    return raw[:offset] + struct.pack("<H", value) + raw[offset + 2 :]


def set_u32(raw: bytes, offset: int, value: int) -> bytes:
    return raw[:offset] + struct.pack("<I", value) + raw[offset + 4 :]


def extensible(raw: bytes, guid: str = "01000000" "0000" "1000" "800000aa00389b71") -> bytes:
    """The valid WAV with its fmt chunk rewritten as WAVE_FORMAT_EXTENSIBLE (PCM GUID)."""
    fmt = (struct.pack("<HHIIHHHHI", 0xFFFE, 2, RATE, RATE * 4, 4, 16, 22, 16, 3)
           + bytes.fromhex(guid))
    body = b"WAVE" + b"fmt " + struct.pack("<I", 40) + fmt + raw[36:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


MALFORMED = [
    ("empty", lambda w: b"", "file is too short for a RIFF/WAVE header"),
    ("text", lambda w: b"this is a text file, not audio\n" * 4,
     r"not a RIFF file \(no 'RIFF' at offset 0\)"),
    ("riff-but-avi", lambda w: w[:8] + b"AVI " + w[12:], "RIFF file is not a WAVE file"),
    ("rf64", lambda w: b"RF64" + w[4:], r"RF64 files are not supported, whatever their size"),
    ("rifx", lambda w: b"RIFX" + w[4:], "big-endian RIFX files are not supported"),
    ("cut-after-wave", lambda w: w[:12], "no fmt chunk"),
    ("cut-in-fmt-header", lambda w: w[:16], "truncated chunk header"),
    ("cut-in-fmt-body", lambda w: w[:30], "fmt chunk runs past the end of the file"),
    ("cut-before-data", lambda w: w[:36], "no data chunk"),
    # A 100-byte LIST chunk between fmt and data, the file cut inside it: a truncated
    # file, not one without audio (the message said "no data chunk").
    ("cut-in-a-list-before-data",
     lambda w: (w[:36] + b"LIST" + struct.pack("<I", 100) + b"INFO" + bytes(96) + w[36:])[:90],
     r"file ends inside a chunk before the data chunk \(truncated WAV\)$"),
    ("cut-in-a-list-before-fmt",
     lambda w: (w[:12] + b"LIST" + struct.pack("<I", 100) + b"INFO" + bytes(96) + w[12:])[:50],
     r"file ends inside a chunk before the fmt chunk \(truncated WAV\)$"),
    # A last chunk of odd size without its pad byte is no cut: the audio is missing.
    ("odd-list-unpadded-at-the-end", lambda w: w[:36] + b"LIST" + struct.pack("<I", 5) + b"INFOx",
     "no data chunk$"),
    ("cut-in-data-header", lambda w: w[:40], "truncated chunk header"),
    ("cut-in-data", lambda w: w[:60],
     r"data chunk runs past the end of the file \(truncated WAV\)"),
    ("fmt-too-short", lambda w: set_u32(w, 16, 14), "fmt chunk is shorter than 16 bytes"),
    ("zero-channels", lambda w: set_u16(w, 22, 0), "fmt chunk says 0 channels"),
    ("zero-rate", lambda w: set_u32(w, 24, 0), "fmt chunk says a sample rate of 0"),
    ("zero-block-align", lambda w: set_u16(w, 32, 0), "block align is not a whole number"),
    ("odd-block-align", lambda w: set_u16(w, 32, 3), "block align is not a whole number"),
    ("bits-disagree", lambda w: set_u16(w, 34, 8), "bits per sample disagree with the block align"),
    ("pcm-too-wide", lambda w: set_u16(set_u16(w, 32, 12), 34, 48),
     "PCM samples must be 1 to 4 bytes wide"),
    ("float-16-bit", lambda w: set_u16(w, 20, 3), "float samples must be 32 or 64 bits wide"),
    ("mp3-tag", lambda w: set_u16(w, 20, 0x55), "unsupported encoding"),
    ("two-fmt-chunks", lambda w: w[:36] + w[12:36] + w[36:], "more than one fmt chunk"),
    ("endless-data-before-fmt",
     lambda w: w[:12] + b"data" + struct.pack("<I", 0xFFFFFFFF) + w[40:],
     "data of unknown length comes before the fmt chunk"),
    ("extensible-unknown-guid",
     lambda w: extensible(w, guid="01000000" "0000" "1000" "800000aa00389b72"),
     "unknown WAVE_FORMAT_EXTENSIBLE subformat GUID"),
    ("extensible-mp3-subformat",
     lambda w: extensible(w, guid="55000000" "0000" "1000" "800000aa00389b71"),
     "unsupported encoding"),
    ("extensible-too-short", lambda w: set_u16(extensible(w), 36, 0),
     "WAVE_FORMAT_EXTENSIBLE fmt chunk is too short"),
]


@pytest.mark.parametrize("mmap_mode", [True, False], ids=["mmap", "copy"])
@pytest.mark.parametrize(("make", "message"), [pytest.param(m, msg, id=name)
                                               for name, m, msg in MALFORMED])
def test_read_wav_rejects_a_malformed_wav_with_a_wav_error_that_says_what_is_wrong(
        ram, make, message, mmap_mode):
    path = ram / "bad.wav"
    path.write_bytes(make(valid_wav(ram)))
    with pytest.raises(WavError, match=message) as caught:
        read_wav(path, mmap=mmap_mode)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith(f"{path}: ")


def test_the_extensible_rewrite_used_above_is_itself_a_valid_wav(ram):
    # Guards the malformed cases built from it: unchanged, it reads fine.
    path = ram / "ok.wav"
    path.write_bytes(extensible(valid_wav(ram)))
    data, rate = read_wav(path)
    assert rate == RATE
    np.testing.assert_array_equal(data, np.arange(20, dtype=np.int16).reshape(10, 2))


# ---- writing where we must not -----------------------------------------------------------


def write_with_wav_buffer(path: Path) -> None:
    with create_wav_buffer(10, RATE, path=path):
        pass


def write_with_wavwriter(path: Path) -> None:
    with WavWriter(path, RATE) as writer:
        writer.write(np.zeros(10, np.int16))


WRITERS = [
    pytest.param(lambda p: write_wav(p, np.zeros(10, np.int16), RATE), id="write_wav"),
    pytest.param(write_with_wav_buffer, id="create_wav_buffer"),
    pytest.param(write_with_wavwriter, id="WavWriter"),
]


@pytest.mark.parametrize("target_exists", [True, False], ids=["to-a-file", "dangling"])
@pytest.mark.parametrize("write", WRITERS)
def test_writing_through_a_symlink_is_refused_with_eloop_and_the_target_is_untouched(
        ram, tmp_path, write, target_exists):
    target = tmp_path / "precious.txt"
    if target_exists:
        target.write_bytes(b"do not touch")
    link = ram / "link.wav"
    link.symlink_to(target)
    with pytest.raises(OSError) as caught:
        write(link)
    assert caught.value.errno == errno.ELOOP
    assert caught.value.filename == str(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    if target_exists:
        assert target.read_bytes() == b"do not touch"
    else:
        assert not target.exists()


def test_an_atomic_write_replaces_a_symlink_itself_and_never_its_target(ram, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"do not touch")
    link = ram / "link.wav"
    link.symlink_to(target)
    write_wav(link, np.ones(10, np.int16), RATE, atomic=True)
    assert target.read_bytes() == b"do not touch"
    assert not link.is_symlink()
    np.testing.assert_array_equal(read_wav(link)[0], np.ones(10, np.int16))


@pytest.mark.parametrize("write", WRITERS)
def test_writing_onto_a_directory_raises_is_a_directory(ram, write):
    (ram / "dir.wav").mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        write(ram / "dir.wav")
    assert caught.value.errno == errno.EISDIR
    assert caught.value.filename == str(ram / "dir.wav")
    assert os.listdir(ram / "dir.wav") == []


def test_writing_onto_a_fifo_fails_at_once_instead_of_waiting_for_a_reader(ram):
    fifo = ram / "pipe.wav"
    os.mkfifo(fifo)
    done = run_python(f"""
        import numpy as np
        from luna_shm import write_wav
        try:
            write_wav({str(fifo)!r}, np.zeros(10, np.int16), 8000)
        except OSError as exc:
            print(exc.errno, exc.filename)
    """)
    number, filename = assert_child_ok(done).split()
    assert int(number) in (errno.ENXIO, errno.EINVAL)
    assert filename == str(fifo)


def _make_fifo(path: Path) -> None:
    os.mkfifo(path)


def _make_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))


def _make_device(path: Path) -> None:
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of our own
    except PermissionError:
        pytest.skip("cannot make a device node here (needs CAP_MKNOD)")


@pytest.mark.parametrize("write", [
    *WRITERS,
    pytest.param(lambda p: write_wav(p, np.zeros(10, np.int16), RATE, atomic=True),
                 id="write_wav-atomic"),
])
@pytest.mark.parametrize("make", [_make_fifo, _make_socket, _make_device],
                         ids=["fifo", "socket", "device"])
def test_writing_onto_a_fifo_socket_or_device_is_refused_and_leaves_it_there(
        ram, make, write) -> None:
    # A player's FIFO, a daemon's listening socket, /dev/null itself (as root): an
    # atomic write renamed its WAV over them, removing a live file that is not ours;
    # the others refused them with a bare EINVAL, ENXIO or EACCES.
    path = ram / "special.wav"
    make(path)
    kind = stat.S_IFMT(os.lstat(path).st_mode)
    with pytest.raises(OSError, match="not a regular file") as caught:
        write(path)
    assert caught.value.errno == errno.EINVAL
    assert caught.value.filename == str(path)
    assert stat.S_IFMT(os.lstat(path).st_mode) == kind
    assert os.listdir(ram) == ["special.wav"]


@pytest.mark.parametrize("make", [_make_fifo, _make_socket, _make_device],
                         ids=["fifo", "socket", "device"])
def test_a_failed_write_never_removes_a_fifo_socket_or_device_at_one_of_our_temp_names(
        private_dirs, make) -> None:
    # path = get_temp_audio_path(); os.mkfifo(path): a player reads the FIFO. write_wav
    # refuses it, and then removed it as "an empty temp file of ours" (size 0).
    path = Path(get_temp_audio_path())
    make(path)
    kind = stat.S_IFMT(os.lstat(path).st_mode)
    with pytest.raises(OSError, match="not a regular file") as caught:
        write_wav(path, np.zeros(10, np.int16), RATE)
    assert caught.value.filename == str(path)
    assert stat.S_IFMT(os.lstat(path).st_mode) == kind


# ---- failures part-way: a real full RAM disk, a real file size limit ----------------------

FAILING_WRITES = """
import errno, json, os, resource, signal
import numpy as np
from luna_shm import write_wav

def attempt(path, **kwargs):
    try:
        write_wav(path, np.ones(500_000, np.int16), 8000, **kwargs)  # 1 MB of audio
    except OSError as exc:
        return {"errno": exc.errno, "filename": exc.filename, "message": str(exc),
                "listing": sorted(os.listdir(os.path.dirname(path)))}
    return {"errno": 0}

if os.environ["LIMIT"] == "fsize":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
report = {"new": attempt("/dev/shm/new.wav"),
          "atomic-new": attempt("/dev/shm/atomic.wav", atomic=True)}
small = np.arange(100, dtype=np.int16)
write_wav("/dev/shm/old.wav", small, 8000)
old = open("/dev/shm/old.wav", "rb").read()
report["atomic-over-old"] = attempt("/dev/shm/old.wav", atomic=True)
report["atomic-over-old"]["old-intact"] = open("/dev/shm/old.wav", "rb").read() == old
report["plain-over-old"] = attempt("/dev/shm/old.wav")
report["plain-over-old"]["old-intact"] = open("/dev/shm/old.wav", "rb").read() == old
report["plain-over-old"]["listing"] = sorted(os.listdir("/dev/shm"))
os.unlink("/dev/shm/old.wav")
report["left"] = os.listdir("/dev/shm")
print(json.dumps(report))
"""


@pytest.mark.parametrize(("limit", "shm_size", "code"),
                         [("ramdisk", "64k", errno.ENOSPC), ("fsize", "4m", errno.EFBIG)],
                         ids=["ENOSPC-full-ram-disk", "EFBIG-file-size-limit"])
def test_a_write_that_fails_part_way_removes_its_file_and_names_it(limit, shm_size, code):
    done = run_in_private_shm(FAILING_WRITES, shm_size=shm_size, env={"LIMIT": limit})
    report = json.loads(assert_child_ok(done))
    for case, path in (("new", "/dev/shm/new.wav"), ("atomic-new", "/dev/shm/atomic.wav"),
                       ("atomic-over-old", "/dev/shm/old.wav")):
        result = report[case]
        assert result["errno"] == code, (case, result)
        assert result["filename"] == path
        assert path in result["message"] and os.strerror(code) in result["message"]
    assert report["new"]["listing"] == [] and report["atomic-new"]["listing"] == []
    # An atomic write that fails leaves the old file as it was, and nothing else.
    assert report["atomic-over-old"]["listing"] == ["old.wav"]
    assert report["atomic-over-old"]["old-intact"]
    # A plain write over a file with content replaces it through a new file, so a
    # failure leaves the old file exactly as it was, and nothing else.
    assert report["plain-over-old"]["errno"] == code
    assert report["plain-over-old"]["old-intact"]
    assert report["plain-over-old"]["listing"] == ["old.wav"]
    assert report["left"] == []


def test_a_full_ram_disk_error_explains_how_to_give_the_container_more_memory():
    done = run_in_private_shm("""
        import numpy as np
        from luna_shm import write_wav
        try:
            write_wav("/dev/shm/x.wav", np.ones(500_000, np.int16), 8000)
        except OSError as exc:
            print(exc)
    """, shm_size="64k")
    out = assert_child_ok(done)
    assert "No space left on device" in out and "--shm-size" in out and "/dev/shm/x.wav" in out


@pytest.mark.parametrize("make", ["buffer", "writer"])
def test_a_bytes_path_for_a_buffer_or_writer_is_named_briefly(ram, make) -> None:
    from luna_shm import WavWriter, create_wav_buffer

    huge = b"x" * 500_000
    with pytest.raises(TypeError, match="got bytes of length 500000") as info:
        if make == "buffer":
            create_wav_buffer(10, 16000, path=huge)  # type: ignore[arg-type]
        else:
            WavWriter(huge, 16000)  # type: ignore[arg-type]
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("make", ["buffer", "writer"])
def test_a_path_that_is_not_a_path_at_all_is_a_type_error_naming_it(ram, make) -> None:
    from luna_shm import WavWriter, create_wav_buffer

    with pytest.raises(TypeError, match=r"path must be str, os.PathLike\[str\] or None, got 5"):
        if make == "buffer":
            create_wav_buffer(10, 16000, path=5)  # type: ignore[arg-type]
        else:
            WavWriter(5, 16000)  # type: ignore[arg-type]


@pytest.mark.parametrize("what", ["suffix", "prefix"])
def test_a_suffix_or_prefix_too_long_for_a_file_name_is_a_value_error_giving_its_length(
        ram, what) -> None:
    from luna_shm import get_temp_audio_path

    with pytest.raises(ValueError, match=f"{what} is too long for a file name: 500000 bytes"):
        get_temp_audio_path(**{what: "x" * 500_000})


def test_sizes_are_refused_before_a_strided_view_is_copied(ram):
    # A broadcast view takes no memory; making it contiguous would. Found in review: a pool
    # of 1000-byte slots copied 100 MB before refusing it, and a 4.4 GB view ended in a
    # MemoryError instead of the 4 GiB ValueError. In a child whose address space is
    # limited to 2 GiB, so that a regression fails instead of filling the machine's RAM.
    result = run_python(f"""
        import resource, tracemalloc
        import numpy as np
        from luna_shm import AudioPool, WavWriter, write_wav
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        def refused(call):
            tracemalloc.start()
            try:
                call()
            except ValueError as exc:
                message = str(exc)
            else:
                message = "accepted"
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return message, peak
        huge = np.broadcast_to(np.int16(1), (2_200_000_000,))
        big = np.broadcast_to(np.int16(1), (50_000_000,))
        with AudioPool(slots=1, max_bytes=1000) as pool:
            cases = dict(
                write_wav=lambda: write_wav({str(ram / "w.wav")!r}, huge, 16000),
                pool=lambda: pool.write_wav(big, 16000),
                pool_huge=lambda: pool.write_wav(huge, 16000),
            )
            with WavWriter({str(ram / "s.wav")!r}, 16000) as writer:
                cases["writer"] = lambda: writer.write(huge)
                for name, call in cases.items():
                    message, peak = refused(call)
                    print(name, peak < (1 << 20), message)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout
    for line in lines:
        name, small, message = line.split(" ", 2)
        assert small == "True", line
        expected = ("do not fit a slot of this pool" if name == "pool"
                    else "data too large for a WAV file")
        assert expected in message, line
    assert sorted(os.listdir(ram)) == ["s.wav"]
