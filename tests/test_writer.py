"""WavWriter: a WAV that grows chunk by chunk and is a valid WAV of what is there after each."""

from __future__ import annotations

import errno
import gc
import json
import os
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile
import soundfile as sf

from helpers import (
    LIBRARY_PATH,
    SOUNDFILE_DTYPE,
    SOX_ENCODING,
    as_soundfile_reads,
    assert_child_ok,
    require_tool,
    run_in_private_shm,
    samples,
)
from luna_shm import WavWriter, read_wav

RATE = 16000
DTYPES = ["uint8", "int16", "int32", "float32", "float64"]
CHUNK_FRAMES = [1, 7, 0, 100, 33, 256]  # odd sizes, an empty chunk, a larger one
HEADER = 44 + 16  # a PCM header and the writer's stream-state chunk ("JUNK" "lsst" "live")

def chunks(dtype: str, channels: int) -> list[np.ndarray]:
    return [samples(dtype, n, channels, seed=i) for i, n in enumerate(CHUNK_FRAMES)]


def read_by_soundfile(path: str, dtype: str, channels: int) -> np.ndarray:
    back, rate = sf.read(path, dtype=SOUNDFILE_DTYPE[dtype])
    assert rate == RATE
    return back


def read_by_scipy(path: str, dtype: str, channels: int) -> np.ndarray:
    rate, back = scipy.io.wavfile.read(path)
    assert rate == RATE
    return as_soundfile_reads(back.copy())


def read_by_read_wav(path: str, dtype: str, channels: int) -> np.ndarray:
    back, rate = read_wav(path, mmap=False)
    assert rate == RATE
    return as_soundfile_reads(back)


def read_by_sox(path: str, dtype: str, channels: int) -> np.ndarray:
    sox = require_tool("sox")
    done = subprocess.run(
        [sox, "-D", path, "-t", "raw", "-e", SOX_ENCODING[dtype],
         "-b", str(np.dtype(dtype).itemsize * 8), "-L", "-"],
        capture_output=True, check=True, timeout=60,
    )
    flat = np.frombuffer(done.stdout, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    return as_soundfile_reads(flat if channels == 1 else flat.reshape(-1, channels))


def read_by_wave(path: str, dtype: str, channels: int) -> np.ndarray:
    with wave.open(path, "rb") as reader:
        assert reader.getframerate() == RATE and reader.getnchannels() == channels
        raw = reader.readframes(reader.getnframes() + 100)
    flat = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    return as_soundfile_reads(flat if channels == 1 else flat.reshape(-1, channels))


READERS = [
    pytest.param(read_by_soundfile, DTYPES, [1, 2, 3], id="soundfile"),
    pytest.param(read_by_scipy, DTYPES, [1, 2, 3], id="scipy"),
    pytest.param(read_by_read_wav, DTYPES, [1, 2, 3], id="read_wav"),
    pytest.param(read_by_sox, DTYPES, [1, 2, 3], id="sox"),
    # The stdlib wave module reads plain PCM (no float, no EXTENSIBLE).
    pytest.param(read_by_wave, ["uint8", "int16", "int32"], [1, 2], id="wave"),
]

MID_STREAM = [
    pytest.param(reader, dtype, channels, id=f"{param.id}-{dtype}-{channels}ch")
    for param in READERS
    for reader, dtypes, channel_counts in [param.values]
    for dtype in dtypes
    for channels in channel_counts
]


@pytest.mark.parametrize(("reader", "dtype", "channels"), MID_STREAM)
def test_after_every_write_readers_see_a_valid_wav_of_exactly_the_frames_so_far(
        ram, reader, dtype, channels):
    path = ram / "stream.wav"
    written: list[np.ndarray] = []
    with WavWriter(path, RATE, channels, dtype) as writer:
        so_far = reader(str(path), dtype, channels)  # a header alone: zero frames
        assert len(so_far) == 0
        for chunk in chunks(dtype, channels):
            writer.write(chunk)
            written.append(chunk)
            expected = np.concatenate(written)
            assert writer.frames == len(expected)
            np.testing.assert_array_equal(reader(str(path), dtype, channels),
                                          as_soundfile_reads(expected), strict=True)


@pytest.mark.parametrize("channels", [1, 3])
def test_the_file_after_close_holds_all_chunks_in_order(ram, channels):
    path = ram / "stream.wav"
    parts = chunks("float32", channels)
    with WavWriter(path, RATE, channels, "float32") as writer:
        for part in parts:
            writer.write(part)
    back, _ = read_wav(path)
    np.testing.assert_array_equal(back, np.concatenate(parts), strict=True)
    assert sf.info(str(path)).frames == sum(CHUNK_FRAMES)
    # the writer still says what it wrote (it said 0 once closed, before)
    assert writer.frames == sum(CHUNK_FRAMES)
    assert f"{sum(CHUNK_FRAMES)} frames written" in repr(writer)


def test_an_aborted_writer_still_counts_the_frames_the_file_keeps(ram):
    path = ram / "stream.wav"
    writer = WavWriter(path, RATE)
    writer.write(np.zeros(100, np.int16))
    writer.abort()
    assert writer.frames == 100 == sf.info(str(path)).frames


def test_odd_sized_8_bit_mono_chunks_keep_a_pad_byte_and_exact_sizes(ram):
    path = ram / "odd.wav"
    total = 0
    with WavWriter(path, RATE, 1, "uint8") as writer:
        for size in (3, 5, 1, 7, 2, 0, 9):
            chunk = np.full(size, 200 + size, np.uint8)
            writer.write(chunk)
            total += size
            raw = path.read_bytes()
            # A plain 44-byte header plus the 16-byte stream-state chunk before "data".
            assert raw[52:56] == b"data"
            assert int.from_bytes(raw[56:60], "little") == total
            assert len(raw) == HEADER + total + (total & 1)
            assert int.from_bytes(raw[4:8], "little") == len(raw) - 8
            if total & 1:
                assert raw[-1] == 0
            assert sf.info(str(path)).frames == total
    assert read_wav(path)[0].tolist() == [203] * 3 + [205] * 5 + [201] + [207] * 7 + [202] * 2 \
        + [209] * 9


@pytest.mark.parametrize("before", [0, 1, 2], ids=["first", "after-odd", "after-even"])
@pytest.mark.parametrize("channels", [1, 2])
def test_an_empty_chunk_appends_nothing_and_is_not_an_error(ram, before, channels):
    path = ram / "s.wav"
    shape = (0,) if channels == 1 else (0, channels)
    with WavWriter(path, RATE, channels, "uint8") as writer:
        writer.write(samples("uint8", before, channels))
        size = path.stat().st_size
        writer.write(np.zeros(shape, np.uint8))
        assert writer.frames == before and path.stat().st_size == size
        writer.write(samples("uint8", 3, channels, seed=5))
    expected = np.concatenate([samples("uint8", before, channels),
                               samples("uint8", 3, channels, seed=5)])
    np.testing.assert_array_equal(read_wav(path)[0], expected, strict=True)


def test_float_streams_keep_their_fact_chunk_frame_count_current(ram):
    path = ram / "float.wav"
    with WavWriter(path, RATE, 2, "float64") as writer:
        for frames in (5, 11, 0, 3):
            writer.write(np.zeros((frames, 2)))
            raw = path.read_bytes()
            fact = raw.index(b"fact")
            assert int.from_bytes(raw[fact + 8 : fact + 12], "little") == writer.frames


# ---- chunks of the wrong kind ----------------------------------------------------------------


@pytest.mark.parametrize(("writer_dtype", "chunk", "message"), [
    ("int16", np.zeros(4, np.float32), "chunk dtype float32 does not match the writer's int16"),
    ("float32", np.zeros(4, np.float64), "chunk dtype float64 does not match the writer's float32"),
    ("uint8", np.zeros(4, np.int16), "chunk dtype int16 does not match the writer's uint8"),
    ("int32", np.zeros(4, np.int64), "unsupported sample dtype int64"),
    ("int16", np.zeros(4, bool), "chunk has unsupported sample dtype bool"),
    ("int16", "abc", "chunk must be a numpy array of .* samples, got 'abc'"),
])
def test_a_chunk_of_another_dtype_is_a_type_error_and_changes_nothing(ram, writer_dtype, chunk,
                                                                      message):
    path = ram / "s.wav"
    with WavWriter(path, RATE, 1, writer_dtype) as writer:
        writer.write(np.ones(3, writer_dtype))
        before = path.read_bytes()
        with pytest.raises(TypeError, match=message):
            writer.write(chunk)
        assert path.read_bytes() == before and writer.frames == 3


@pytest.mark.parametrize(("channels", "chunk", "message"), [
    (2, np.zeros(4, np.int16), r"chunk has 1 channel \(shape \(4,\)\); the writer has 2"),
    (1, np.zeros((4, 2), np.int16),
     r"chunk has 2 channels \(shape \(4, 2\)\); the writer has 1"),
    (3, np.zeros((4, 2), np.int16), r"chunk has 2 channels"),
    (1, np.zeros((4, 0), np.int16),
     r"chunk has 0 channels \(shape \(4, 0\)\): a WAV needs at least one"),
    (2, np.zeros((2, 2, 2), np.int16),
     r"chunk must have shape \(frames,\) or \(frames, channels\), got 3-D shape \(2, 2, 2\)"),
    (1, np.int16(3), r"got 0-D shape \(\)"),
    (1, np.array(3, np.int16), r"got 0-D shape \(\)"),  # a 0-d array of the writer's dtype
])
def test_a_chunk_with_the_wrong_channel_count_is_a_value_error_and_changes_nothing(
        ram, channels, chunk, message):
    path = ram / "s.wav"
    with WavWriter(path, RATE, channels) as writer:
        before = path.read_bytes()
        with pytest.raises(ValueError, match=message):
            writer.write(chunk)
        assert path.read_bytes() == before and writer.frames == 0


def test_big_endian_strided_and_single_column_chunks_are_written_as_their_values(ram):
    path = ram / "s.wav"
    base = samples("int16", 40, 2)
    parts = [base.astype(">i2"), base[::2], np.asfortranarray(base)]
    with WavWriter(path, RATE, 2) as writer:
        for part in parts:
            writer.write(part)
    with WavWriter(ram / "mono.wav", RATE, 1) as writer:
        writer.write(base[:, :1])  # (frames, 1) is mono
    np.testing.assert_array_equal(read_wav(path)[0],
                                  np.concatenate([p.astype("<i2") for p in parts]))
    np.testing.assert_array_equal(read_wav(ram / "mono.wav")[0], base[:, 0])


# ---- paths, life cycle, leaks -------------------------------------------------------------


def test_a_writer_without_a_path_streams_into_a_new_file_in_the_private_ram_dir(private_dirs):
    with WavWriter(None, RATE) as writer:
        writer.write(np.arange(10, dtype=np.int16))
    assert writer.path.startswith(private_dirs.ram + "/luna_audio_")
    assert writer.path.endswith(".wav")
    assert os.listdir(private_dirs.ram) == [os.path.basename(writer.path)]
    np.testing.assert_array_equal(read_wav(writer.path)[0], np.arange(10, dtype=np.int16))


@pytest.mark.parametrize("kind", [str, Path], ids=["str", "Path"])
def test_a_writer_accepts_str_and_path_and_replaces_an_existing_file(ram, kind):
    target = ram / "s.wav"
    target.write_bytes(b"old content " * 1000)
    with WavWriter(kind(target), RATE) as writer:
        assert writer.path == str(target)
        writer.write(np.arange(5, dtype=np.int16))
    assert target.stat().st_size == HEADER + 10
    np.testing.assert_array_equal(read_wav(target)[0], np.arange(5, dtype=np.int16))


def test_close_is_idempotent_and_a_closed_writer_refuses_to_write(ram):
    writer = WavWriter(ram / "s.wav", RATE)
    writer.write(np.ones(4, np.int16))
    writer.close()
    writer.close()
    assert writer.closed
    with pytest.raises(ValueError, match="I/O operation on closed WavWriter"):
        writer.write(np.ones(4, np.int16))
    with pytest.raises(ValueError, match="I/O operation on closed WavWriter"):
        writer.fileno()
    assert sf.info(str(ram / "s.wav")).frames == 4


def test_the_context_manager_closes_the_writer_and_keeps_the_file_on_error(ram):
    with pytest.raises(RuntimeError, match="synthesis failed"), \
            WavWriter(ram / "s.wav", RATE) as writer:
        writer.write(np.ones(4, np.int16))
        raise RuntimeError("synthesis failed")
    assert writer.closed
    assert sf.info(str(ram / "s.wav")).frames == 4


def test_a_leaked_open_writer_warns_resource_warning(ram):
    with pytest.warns(ResourceWarning, match="unclosed WavWriter"):
        writer = WavWriter(ram / "s.wav", RATE)
        writer.write(np.ones(4, np.int16))
        del writer
        gc.collect()
    assert sf.info(str(ram / "s.wav")).frames == 4


# ---- a write that fails mid-stream ---------------------------------------------------------

FAILING_STREAM = """
import json, os, resource, signal
import numpy as np
import soundfile as sf
from luna_shm import WavWriter

if os.environ["LIMIT"] == "fsize":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_001, 50_001))
path = "/dev/shm/stream.wav"
writer = WavWriter(path, 8000, 1, "int16")
written, error = 0, None
for i in range(1000):
    chunk = np.full(1001, i, np.int16)  # odd-sized chunks of 2002 bytes
    try:
        writer.write(chunk)
    except OSError as exc:
        error = {"errno": exc.errno, "filename": exc.filename}
        break
    written += 1
frames_reported = writer.frames
writer.close()
data, rate = sf.read(path, dtype="int16")
print(json.dumps({"error": error, "written": written, "frames_reported": frames_reported,
                  "frames": len(data), "rate": rate, "size": os.path.getsize(path),
                  "ok": bool((data == np.repeat(np.arange(written), 1001)).all())}))
"""


@pytest.mark.parametrize(("limit", "shm_size", "code"),
                         [("ramdisk", "64k", errno.ENOSPC), ("fsize", "4m", errno.EFBIG)],
                         ids=["ENOSPC-full-ram-disk", "EFBIG-file-size-limit"])
def test_a_write_that_fails_mid_stream_leaves_a_valid_wav_of_the_chunks_before(limit, shm_size,
                                                                                code):
    done = run_in_private_shm(FAILING_STREAM, shm_size=shm_size, env={"LIMIT": limit})
    report = json.loads(assert_child_ok(done))
    assert report["error"] == {"errno": code, "filename": "/dev/shm/stream.wav"}
    assert report["written"] >= 2
    assert report["frames"] == report["frames_reported"] == report["written"] * 1001
    assert report["ok"] and report["rate"] == 8000
    data_bytes = report["written"] * 2002
    assert report["size"] == HEADER + data_bytes


def test_a_failed_chunk_after_an_odd_data_size_leaves_the_file_byte_for_byte_as_before():
    # 3 bytes of 8-bit audio end with a pad byte, where the next chunk starts. A chunk that
    # does not fit (ENOSPC) went over that pad byte first; the cut after the failure kept
    # it: the pad held 0xAB, not 0.
    done = run_in_private_shm("""
        import json
        import numpy as np
        from luna_shm import WavWriter
        writer = WavWriter("/dev/shm/odd.wav", 8000, 1, "uint8")
        writer.write(np.full(3, 0x55, np.uint8))
        before = open(writer.path, "rb").read()
        try:
            writer.write(np.full(4 << 20, 0xAB, np.uint8))
        except OSError as exc:
            error = exc.errno
        after = open(writer.path, "rb").read()
        writer.close()
        print(json.dumps({"error": error, "pad": before[-1], "same": before == after}))
    """, shm_size="1m")
    assert json.loads(assert_child_ok(done)) == {"error": errno.ENOSPC, "pad": 0, "same": True}


def test_a_writer_closed_after_a_failed_chunk_lets_go_of_its_file_lock_at_once():
    # Found in review: the failed write kept its exception in a local of its own frame (a
    # cycle through the traceback), and with it the stream's header mapping, which holds
    # the open file: after close() the flock stayed until a garbage collection, so
    # followers and cleanups took the closed stream for a live one.
    done = run_in_private_shm("""
        import fcntl, gc, json, os
        import numpy as np
        from luna_shm import WavWriter
        gc.disable()
        writer = WavWriter("/dev/shm/failed.wav", 8000, 1, "int16")
        writer.write(np.ones(100, np.int16))
        try:
            writer.write(np.ones(1 << 20, np.int16))
        except OSError as exc:
            error = exc.errno
        writer.close()
        fd = os.open("/dev/shm/failed.wav", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        print(json.dumps({"error": error, "free": free}))
    """, shm_size="1m")
    assert json.loads(assert_child_ok(done)) == {"error": errno.ENOSPC, "free": True}


# ---- threads sharing one writer --------------------------------------------------------------

CHUNK = 480  # 20 ms at 24 kHz


def test_four_threads_sharing_a_writer_lose_no_chunk_and_the_header_counts_them_all(ram):
    threads_count, rounds = 4, 400
    path = ram / "shared.wav"
    errors: list[BaseException] = []
    start = threading.Barrier(threads_count)
    with WavWriter(path, 24000) as writer:

        def work(index: int) -> None:
            try:
                start.wait()
                for i in range(rounds):
                    writer.write(np.full(CHUNK, index * rounds + i, np.int16))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a writing thread hung"
        assert errors == []
        assert writer.frames == threads_count * rounds * CHUNK
    data, _ = read_wav(path, mmap=False)
    assert sf.info(str(path)).frames == len(data) == threads_count * rounds * CHUNK
    blocks = data.reshape(-1, CHUNK)
    assert (blocks == blocks[:, :1]).all(), "two chunks were interleaved or overwritten"
    assert sorted(blocks[:, 0].tolist()) == list(range(threads_count * rounds))


def test_close_while_other_threads_write_keeps_every_chunk_whole_and_refuses_later_writes(ram):
    path = ram / "closing.wav"
    written: list[int] = []
    refused: list[str] = []
    unexpected: list[BaseException] = []
    writer = WavWriter(path, 24000)
    go = threading.Barrier(4)

    def work(index: int) -> None:
        go.wait()
        for i in range(100_000):
            value = index * 100_000 + i
            try:
                writer.write(np.full(CHUNK, value % 30000, np.int16))
            except ValueError as exc:
                refused.append(str(exc))
                return
            except BaseException as exc:  # reported below
                unexpected.append(exc)
                return
            written.append(value % 30000)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    go.wait()
    while len(written) < 300 and any(t.is_alive() for t in threads):
        threading.Event().wait(0.001)
    writer.close()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert unexpected == []
    assert refused == ["I/O operation on closed WavWriter"] * 3
    data, _ = read_wav(path, mmap=False)
    blocks = data.reshape(-1, CHUNK)
    assert (blocks == blocks[:, :1]).all()
    assert sorted(blocks[:, 0].tolist()) == sorted(written)


CUT_UNDER_THE_WRITER = """
import errno
import os
import sys
import numpy as np
from luna_shm import WavWriter
path = sys.argv[1]
writer = WavWriter(path, 24000)
writer.write(np.ones(480, np.int16))
# Another program cuts the file while the writer has its header mapped.
os.truncate(path, 0) if sys.argv[2] == "os.truncate" else os.system(f"truncate -s 0 '{path}'")
if sys.argv[3] == "read":
    # Something reads the cut header page (here: the writer's own mapping): a SIGBUS the
    # guard turns into zeros.
    assert writer._stream._header.view[0] == 0
# The next write's samples go in, but its sizes cannot reach the file.
try:
    writer.write(np.ones(480, np.int16))
except OSError as exc:
    print(exc.errno == errno.ESTALE, exc.filename == path, exc.strerror)
writer.close()
"""


@pytest.mark.parametrize(("cutter", "then"), [("os.truncate", "read"), ("truncate(1)", "read"),
                                            ("truncate(1)", "no-read")])
def test_a_write_after_the_file_was_cut_under_its_mapped_header_raises_estale_naming_it(
        private_dirs, cutter, then) -> None:
    # In a child: before the guard, the header store into the cut page was a SIGBUS.
    # Unread, the cut page was refilled by the next write's samples (found in review:
    # no error, and the earlier audio read back as zeros).
    path = Path(private_dirs.ram) / "cut.wav"
    done = subprocess.run([sys.executable, "-c", CUT_UNDER_THE_WRITER, str(path), cutter, then],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": LIBRARY_PATH})
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("True True truncated or rewritten by another process while mapped "
                           "here; its mapping was replaced with zeros\n"), done.stderr



def test_a_write_after_the_file_was_cut_below_its_audio_raises_estale_and_leaves_no_hole(
        ram) -> None:
    # Another process cuts the file above its header page but below the samples: the
    # next append wrote at the old end, the file grew again over a hole of zeros, and
    # the header counted them as audio (found in review).
    path = ram / "cut.wav"
    writer = WavWriter(path, 24000)
    writer.write(np.full(3000, 7, np.int16))
    cut = os.path.getsize(path) - 2000
    subprocess.run(["truncate", "-s", str(cut), str(path)], check=True)
    with pytest.raises(OSError, match="cut by another process below the audio written so "
                                      "far") as caught:
        writer.write(np.full(3000, 9, np.int16))
    assert caught.value.errno == errno.ESTALE and caught.value.filename == str(path)
    writer.close()
    raw = path.read_bytes()
    assert len(raw) == cut  # nothing was written past the cut
    assert b"\0\0" not in raw[-1000:]  # the samples that are left are all 7s, no hole


# Another program rewrites the file in place (open "wb", then a whole WAV of its own).
REWRITTEN_UNDER_THE_WRITER = {
    "same-format": "sf.write(sys.argv[1], np.full(48000, 9, np.int16), 16000)",
    "float-stereo": "sf.write(sys.argv[1], np.full((9000, 2), 0.5, np.float32), 44100)",
}


@pytest.mark.parametrize("rewrite", sorted(REWRITTEN_UNDER_THE_WRITER))
@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_a_write_after_another_program_rewrote_the_file_in_place_raises_estale_and_writes_nothing(
        ram, rewrite, dtype) -> None:
    # soundfile.write over a live stream keeps the writer's header page (the file is as
    # long as before, or longer): the next append stored the writer's header over the
    # other program's and put its chunk after the other program's samples, with no error.
    # The file then read as this stream's audio with another file's samples inside
    # (found in review).
    path = ram / "rewritten.wav"
    writer = WavWriter(path, RATE, dtype=dtype)
    writer.write(samples(dtype, 3000, 1))
    subprocess.run([sys.executable, "-c", "import sys; import numpy as np; import soundfile "
                    "as sf; " + REWRITTEN_UNDER_THE_WRITER[rewrite], str(path)], check=True)
    theirs = path.read_bytes()
    with pytest.raises(OSError, match="rewritten by another process: its header is not this "
                                      "writer's any more") as caught:
        writer.write(samples(dtype, 3000, 1, seed=1))
    assert caught.value.errno == errno.ESTALE and caught.value.filename == str(path)
    writer.abort()
    assert path.read_bytes() == theirs  # the other program's WAV, as it wrote it


PAST_4_GIB = """
import gc
import os
import resource
import signal
import sys
import numpy as np
from luna_shm import WavWriter, read_wav
directory, excess = sys.argv[1], int(sys.argv[2])
path, sparse = os.path.join(directory, "stream.wav"), os.path.join(directory, "sparse.raw")
first = np.arange(480, dtype=np.int16)
writer = WavWriter(path, 16000)
writer.write(first)
size = os.path.getsize(path)
# The most bytes of samples the file holds: its RIFF size counts the header after its first
# 8 bytes, the samples and a pad byte.
limit = (2**32 - 1 - (size - first.nbytes - 8)) & ~1
frames = (limit - first.nbytes + excess) // 2
with open(sparse, "wb") as handle:
    handle.truncate(frames * 2)  # gigabytes of samples that take no memory
huge = np.memmap(sparse, dtype=np.int16, mode="r", shape=(frames,))
# Should the limit ever let such a chunk through, its write stops at 1 MiB (EFBIG, an
# OSError: the test fails) instead of filling the RAM disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    writer.write(huge)
except ValueError as exc:
    print(str(exc) == f"data too large for a WAV file: {limit + excess} bytes of samples "
          "(the limit is 4 GiB; RF64 is not supported)")
assert os.path.getsize(path) == size
writer.write(first)  # the writer goes on
writer.close()
del huge
gc.collect()
assert (read_wav(path, mmap=False)[0] == np.concatenate([first, first])).all()
assert os.stat(sparse).st_blocks == 0, "the samples were touched"
print("ok")
"""


@pytest.mark.parametrize("excess", [2, 2**31], ids=["2-bytes-over", "2-GiB-over"])
def test_a_chunk_that_would_take_the_file_past_4_gib_is_a_value_error_and_writes_nothing(
        ram, excess) -> None:
    # The C refuses the chunk before it writes (the same 4 GiB limit as write_wav), and the
    # writer says why: a ValueError, not the OSError(EFBIG) of a file size limit.
    done = subprocess.run([sys.executable, "-c", PAST_4_GIB, str(ram), str(excess)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": LIBRARY_PATH})
    assert (done.returncode, done.stdout, done.stderr) == (0, "True\nok\n", "")
