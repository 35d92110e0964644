"""WavBuffer: a WAV file that is a numpy array, named on the RAM disk or anonymous (memfd)."""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
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
from luna_shm import WavBuffer, create_wav_buffer, read_wav

RATE = 24000
FRAMES = 333  # odd: 8-bit mono data needs a pad byte
DTYPES = ["uint8", "int16", "int32", "float32", "float64"]
KINDS = ["named", "anonymous"]

def sox_samples(path: str, dtype: str) -> np.ndarray:
    sox = require_tool("sox")
    done = subprocess.run(
        [sox, "-D", "-t", "wav", path, "-t", "raw", "-e", SOX_ENCODING[dtype],
         "-b", str(np.dtype(dtype).itemsize * 8), "-L", "-"],
        capture_output=True, check=True, timeout=60,
    )
    return np.frombuffer(done.stdout, dtype=np.dtype(dtype).newbyteorder("<"))


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run code in a child python that sees this test's private dirs (a crash fails, not kills)."""
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


@contextmanager
def rendered(kind: str, dtype: str, channels: int) -> Iterator[tuple[str, np.ndarray]]:
    """Render audio into a buffer; yield (a path other programs can read, the audio).

    A named buffer is closed first (its file stays); an anonymous one only exists
    while it is open, so it is read through its /proc/<pid>/fd/<n> path.
    """
    data = samples(dtype, FRAMES, channels)
    buf = create_wav_buffer(FRAMES, RATE, channels, dtype, anonymous=kind == "anonymous")
    try:
        buf.array[...] = data
        if kind == "named":
            buf.close()
        yield buf.path, data
    finally:
        buf.close()


MATRIX = [pytest.param(kind, dtype, channels, id=f"{kind}-{dtype}-{channels}ch")
          for kind in KINDS for dtype in DTYPES for channels in (1, 2, 3)]


# ---- what is rendered into the array is the WAV -----------------------------------------------


@pytest.mark.parametrize(("kind", "dtype", "channels"), MATRIX)
def test_soundfile_reads_exactly_the_samples_written_into_the_array(ram, kind, dtype, channels):
    with rendered(kind, dtype, channels) as (path, data):
        back, rate = sf.read(path, dtype=SOUNDFILE_DTYPE[dtype])
    assert rate == RATE
    np.testing.assert_array_equal(back, as_soundfile_reads(data), strict=True)


@pytest.mark.parametrize(("kind", "dtype", "channels"), MATRIX)
def test_scipy_reads_exactly_the_samples_written_into_the_array(ram, kind, dtype, channels):
    with rendered(kind, dtype, channels) as (path, data):
        rate, back = scipy.io.wavfile.read(path)
        back = back.copy()  # scipy may map the file; keep what it read
    assert rate == RATE
    np.testing.assert_array_equal(back, data, strict=True)


@pytest.mark.parametrize(("kind", "dtype", "channels"), MATRIX)
def test_sox_in_another_process_reads_exactly_the_samples_written_into_the_array(
        ram, kind, dtype, channels):
    with rendered(kind, dtype, channels) as (path, data):
        decoded = sox_samples(path, dtype)
        rate = subprocess.run([require_tool("sox"), "--i", "-r", path],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert rate == str(RATE)
    assert decoded.tobytes() == data.astype(data.dtype.newbyteorder("<")).tobytes()


@pytest.mark.parametrize("kind", KINDS)
def test_the_buffer_array_is_a_writable_view_of_the_declared_shape(ram, kind):
    with create_wav_buffer(10, RATE, 2, "float32", anonymous=kind == "anonymous") as buf:
        array = buf.array
        assert array.flags.writeable and array.flags.c_contiguous and array.flags.aligned
        assert array.shape == (10, 2) and array.dtype == np.float32
        assert buf.array is array
        array[3, 1] = 0.5
        assert read_wav(buf.path, mmap=False)[0][3, 1] == 0.5  # the array is the file


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_a_zero_frame_buffer_is_a_valid_empty_wav(ram, kind, channels):
    with create_wav_buffer(0, RATE, channels, anonymous=kind == "anonymous") as buf:
        assert buf.array.shape == ((0,) if channels == 1 else (0, channels))
        info = sf.info(buf.path)
        assert (info.frames, info.channels) == (0, channels)


# ---- attributes --------------------------------------------------------------------------


def test_a_named_buffer_reports_its_path_format_and_file_descriptor(private_dirs):
    with create_wav_buffer(FRAMES, RATE, 3, "int16") as buf:
        assert isinstance(buf, WavBuffer) and not buf.anonymous
        assert buf.path.startswith(private_dirs.ram + "/luna_audio_")
        assert buf.path.endswith(".wav")
        assert (buf.samplerate, buf.channels, buf.frames, buf.dtype) == (RATE, 3, FRAMES,
                                                                          np.int16)
        size = os.fstat(buf.fileno()).st_size
        assert size == os.path.getsize(buf.path)
        assert os.path.samestat(os.fstat(buf.fileno()), os.stat(buf.path))
        assert size == 68 + FRAMES * 3 * 2  # EXTENSIBLE header, then the samples
    assert os.listdir(private_dirs.ram) == [os.path.basename(buf.path)]


@pytest.mark.parametrize("kind", [str, Path], ids=["str", "Path"])
def test_a_named_buffer_is_created_at_a_given_path(ram, kind):
    target = ram / "given.wav"
    with create_wav_buffer(5, RATE, path=kind(target)) as buf:
        assert buf.path == str(target)
        buf.array[:] = [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(read_wav(target)[0], np.array([1, 2, 3, 4, 5], np.int16))


def test_a_named_buffer_replaces_an_existing_file_at_its_path(ram):
    target = ram / "given.wav"
    target.write_bytes(b"old content " * 1000)
    with create_wav_buffer(5, RATE, path=target):
        pass
    assert target.stat().st_size == 44 + 10
    assert sf.info(str(target)).frames == 5


def test_an_anonymous_buffer_has_no_name_in_any_directory_and_a_proc_path(private_dirs):
    with create_wav_buffer(FRAMES, RATE, 2, "int16", anonymous=True) as buf:
        assert buf.anonymous
        assert buf.path == f"/proc/{os.getpid()}/fd/{buf.fileno()}"
        assert os.readlink(buf.path).startswith("/memfd:luna_audio_")
        assert os.listdir(private_dirs.ram) == []
        assert os.listdir(private_dirs.fallback) == []
        assert os.fstat(buf.fileno()).st_nlink == 0


def test_an_anonymous_buffer_fd_can_be_handed_to_another_process(ram):
    with create_wav_buffer(FRAMES, RATE, 2, "int16", anonymous=True) as buf:
        buf.array[...] = samples("int16", FRAMES, 2)
        fd = buf.fileno()
        done = subprocess.run(
            [sys.executable, "-c", f"from luna_shm import read_wav; "
                                   f"print(read_wav('/proc/self/fd/{fd}')[0].tobytes().hex())"],
            env={**os.environ, "PYTHONPATH": LIBRARY_PATH}, pass_fds=[fd],
            capture_output=True, text=True, timeout=60)
        assert bytes.fromhex(assert_child_ok(done).strip()) == buf.array.tobytes()


def test_an_anonymous_buffer_is_freed_by_the_kernel_when_its_process_is_killed(private_dirs):
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            import numpy as np
            from luna_shm import create_wav_buffer
            buf = create_wav_buffer(100_000, 8000, 1, "int16", anonymous=True)
            buf.array[:] = np.arange(100_000) % 1000
            print(buf.path, flush=True)
            sys.stdin.read()  # wait to be killed
        """)],
        env={**os.environ, "PYTHONPATH": LIBRARY_PATH}, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    ) as child:
        try:
            assert child.stdout is not None
            path = child.stdout.readline().strip()
            assert path.startswith(f"/proc/{child.pid}/fd/")
            # While it lives, another process (this one) can open and read it by that path.
            data, rate = read_wav(path, mmap=False)
            assert rate == 8000
            np.testing.assert_array_equal(data, (np.arange(100_000) % 1000).astype(np.int16))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not os.path.exists(path)
    assert os.listdir(private_dirs.ram) == [] and os.listdir(private_dirs.fallback) == []


# ---- truncate ----------------------------------------------------------------------------


@pytest.mark.parametrize("new_frames", [0, 1, 101, FRAMES])
@pytest.mark.parametrize(("dtype", "channels"), [("uint8", 1), ("int16", 2), ("float64", 3)])
@pytest.mark.parametrize("kind", KINDS)
def test_truncate_fixes_the_header_so_readers_see_the_shorter_audio(ram, kind, dtype, channels,
                                                                    new_frames):
    data = samples(dtype, FRAMES, channels)
    with create_wav_buffer(FRAMES, RATE, channels, dtype, anonymous=kind == "anonymous") as buf:
        buf.array[...] = data
        length_before = os.fstat(buf.fileno()).st_size
        buf.truncate(new_frames)
        assert buf.frames == new_frames and len(buf.array) == new_frames
        np.testing.assert_array_equal(buf.array, data[:new_frames])
        back, _ = sf.read(buf.path, dtype=SOUNDFILE_DTYPE[dtype])
        ours, _ = read_wav(buf.path, mmap=False)
        length_after = os.fstat(buf.fileno()).st_size
        header = Path(buf.path).read_bytes()[:4096]
    np.testing.assert_array_equal(back, as_soundfile_reads(data[:new_frames]), strict=True)
    np.testing.assert_array_equal(ours, data[:new_frames], strict=True)
    data_bytes = new_frames * channels * np.dtype(dtype).itemsize
    header_len = length_before - data.nbytes - (data.nbytes & 1)
    # The file is never cut under those who mapped it (a sealed memfd cannot be, a
    # named file is not): its tail is a chunk readers skip.
    assert length_after == length_before
    end = header_len + data_bytes + (data_bytes & 1)
    skippable_tail = length_before - end >= 8
    riff_size = int.from_bytes(header[4:8], "little")
    assert riff_size == (length_after - 8 if skippable_tail else end - 8)


@pytest.mark.parametrize(("dtype", "frames"), [("uint8", 1), ("uint8", 5), ("int16", 1),
                                               ("int16", 3), ("float32", 1)])
@pytest.mark.parametrize("kind", KINDS)
def test_a_buffer_of_a_few_bytes_cut_to_nothing_reads_as_empty_everywhere(
    ram, kind, dtype, frames
) -> None:
    # Found in review: under 8 bytes of audio cut to 0 frames left those bytes after a data
    # size of 0, which read_wav took for a streaming writer's unfinished header and read
    # back as samples (soundfile and scipy read nothing). Such a buffer now has an empty
    # JUNK chunk after its audio from the start, and the cut leaves a chunk readers skip.
    data = samples(dtype, frames, 1)
    with create_wav_buffer(frames, RATE, 1, dtype, anonymous=kind == "anonymous") as buf:
        buf.array[...] = data
        whole = [read_wav(buf.path, mmap=False)[0], sf.read(buf.path, dtype="int16")[0],
                 scipy.io.wavfile.read(buf.path)[1], sox_samples(buf.path, "int16")]
        buf.truncate(0)
        views, copies = read_wav(buf.path)[0], read_wav(buf.path, mmap=False)[0]
        as_float = read_wav(buf.path, dtype="float32")[0]
        theirs = sf.read(buf.path)[0], scipy.io.wavfile.read(buf.path)[1]
    np.testing.assert_array_equal(whole[0], data, strict=True)
    assert [len(x) for x in whole] == [frames] * 4
    assert [len(x) for x in (views, copies, as_float, *theirs)] == [0] * 5


@pytest.mark.parametrize("kind", KINDS)
def test_sox_reads_the_shorter_audio_after_truncate(ram, kind):
    data = samples("int16", FRAMES, 2)
    with create_wav_buffer(FRAMES, RATE, 2, anonymous=kind == "anonymous") as buf:
        buf.array[...] = data
        buf.truncate(100)
        decoded = sox_samples(buf.path, "int16")
    assert decoded.tobytes() == data[:100].tobytes()


@pytest.mark.parametrize("kind", KINDS)
def test_truncate_refuses_to_grow_or_go_negative(ram, kind):
    with create_wav_buffer(10, RATE, anonymous=kind == "anonymous") as buf:
        with pytest.raises(ValueError, match=r"cannot grow a buffer: frames=11 > 10"):
            buf.truncate(11)
        buf.truncate(4)
        with pytest.raises(ValueError, match=r"cannot grow a buffer: frames=5 > 4"):
            buf.truncate(5)
        with pytest.raises(ValueError, match="frames must be >= 0, got -1"):
            buf.truncate(-1)
        with pytest.raises(TypeError, match=r"frames must be an int, got 2\.5"):
            buf.truncate(2.5)
        assert buf.frames == 4 and sf.info(buf.path).frames == 4


@pytest.mark.parametrize("kind", KINDS)
def test_truncate_names_a_huge_frame_count_by_its_size(ram, kind) -> None:
    with create_wav_buffer(10, RATE, anonymous=kind == "anonymous") as buf:
        with pytest.raises(ValueError,
                           match=r"^cannot grow a buffer: frames=an int of 333 bits > 10$"):
            buf.truncate(10**100)
        assert buf.frames == 10


@pytest.mark.parametrize("kind", KINDS)
def test_an_old_longer_view_can_still_be_written_after_truncate(ram, kind):
    # In a child: a SIGBUS here must fail this test, not kill pytest.
    done = run_python(f"""
        import gc
        import numpy as np
        import soundfile as sf
        from luna_shm import create_wav_buffer
        buf = create_wav_buffer(1_000_000, 8000, 1, "int16", anonymous={kind == "anonymous"})
        old = buf.array
        old[:] = 7
        buf.truncate(10)
        old[:] = 3          # every page of the old view, most of them past the new end
        total = int(old.astype(np.int64).sum())
        frames = sf.info(buf.path).frames
        first = sf.read(buf.path, dtype="int16")[0].tolist()
        buf.close()
        del buf
        gc.collect()
        old[-1] = 5
        print(total, frames, first, int(old[-1]))
    """)
    total, frames, *rest = assert_child_ok(done).split(maxsplit=2)
    assert int(total) == 3_000_000
    assert int(frames) == 10
    first, last = rest[0].rsplit(maxsplit=1)
    assert json.loads(first) == [3] * 10
    assert int(last) == 5


# ---- close, context manager, lifetimes, leaks ----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_close_is_idempotent_and_closed_buffers_refuse_further_use(ram, kind):
    buf = create_wav_buffer(10, RATE, anonymous=kind == "anonymous")
    assert not buf.closed
    buf.close()
    buf.close()
    assert buf.closed
    for use in (lambda: buf.array, buf.fileno, lambda: buf.truncate(1)):
        with pytest.raises(ValueError, match="I/O operation on closed WavBuffer"):
            use()
    with pytest.raises(ValueError, match="closed"), buf:
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_the_context_manager_closes_the_buffer_even_on_error(ram, kind):
    with pytest.raises(RuntimeError, match="render failed"), \
            create_wav_buffer(10, RATE, anonymous=kind == "anonymous") as buf:
        assert buf.__enter__() is buf
        raise RuntimeError("render failed")
    assert buf.closed


@pytest.mark.parametrize("kind", KINDS)
def test_arrays_taken_before_close_stay_valid_after_the_buffer_is_gone(ram, kind):
    done = run_python(f"""
        import gc
        import numpy as np
        from luna_shm import create_wav_buffer
        buf = create_wav_buffer(100_000, 8000, 2, "float32", anonymous={kind == "anonymous"})
        arr = buf.array
        part = arr[10:20]
        buf.close()
        del buf
        gc.collect()
        junk = [np.ones(100_000) for _ in range(50)]  # reuse freed memory, if any was freed
        del junk
        arr[:] = 0.25
        part[:] = 0.5
        gc.collect()
        print(float(arr.sum()), float(part.sum()))
    """)
    whole, part = map(float, assert_child_ok(done).split())
    assert part == 0.5 * 20
    assert whole == 0.25 * (200_000 - 20) + 0.5 * 20


def test_a_named_buffer_file_stays_after_close_and_matches_the_array(ram):
    with create_wav_buffer(FRAMES, RATE, 2, "int32") as buf:
        buf.array[...] = samples("int32", FRAMES, 2)
        kept = buf.array
    np.testing.assert_array_equal(read_wav(buf.path)[0], kept)


@pytest.mark.parametrize("kind", KINDS)
def test_a_leaked_open_buffer_warns_resource_warning_and_closes_its_fd(ram, kind):
    with pytest.warns(ResourceWarning, match="unclosed WavBuffer"):
        buf = create_wav_buffer(10, RATE, anonymous=kind == "anonymous")
        fd = buf.fileno()
        target = os.readlink(f"/proc/self/fd/{fd}")
        del buf
        gc.collect()
    try:
        now = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        now = None
    assert now != target


def test_a_half_built_buffer_can_be_closed_and_collected_without_warnings(ram):
    # A failure in __init__ (here: bad channels) must leave an object that is safe to finalise.
    with pytest.raises(ValueError, match="channels"):
        create_wav_buffer(10, RATE, channels=0)
    half = WavBuffer.__new__(WavBuffer)
    assert half.closed
    half.close()
    del half
    gc.collect()


# ---- a full RAM disk -------------------------------------------------------------------------


def test_a_buffer_larger_than_a_full_ram_disk_raises_enospc_and_leaves_no_file():
    done = run_in_private_shm("""
        import errno, json, os
        from luna_shm import create_wav_buffer
        try:
            create_wav_buffer(1_000_000, 8000, 1, "int16", path="/dev/shm/big.wav")
        except OSError as exc:
            print(json.dumps({"errno": exc.errno, "filename": exc.filename, "text": str(exc),
                              "left": os.listdir("/dev/shm")}))
    """, shm_size="64k")
    report = json.loads(assert_child_ok(done))
    assert report["errno"] == errno.ENOSPC
    assert report["filename"] == "/dev/shm/big.wav"
    assert "/dev/shm/big.wav" in report["text"] and "No space left on device" in report["text"]
    assert report["left"] == []


def test_a_buffer_that_fits_the_small_ram_disk_is_fully_usable_there():
    # The counterpart of the test above: the same tmpfs takes a buffer that fits.
    done = run_in_private_shm("""
        import numpy as np, soundfile as sf
        from luna_shm import create_wav_buffer
        with create_wav_buffer(10_000, 8000, 1, "int16", path="/dev/shm/ok.wav") as buf:
            buf.array[:] = np.arange(10_000) % 100
        print(sf.info("/dev/shm/ok.wav").frames)
    """, shm_size="64k")
    assert assert_child_ok(done).strip() == "10000"


def test_a_failed_buffer_never_removes_an_existing_file_outside_our_dirs_even_with_our_prefix():
    # An empty file of the user's, named like ours but in a directory of theirs: a buffer that
    # cannot reserve its space there (ENOSPC) must leave it where it was.
    done = run_in_private_shm("""
        import errno, os
        from luna_shm import create_wav_buffer
        os.mkdir("/dev/shm/theirs")
        target = "/dev/shm/theirs/luna_audio_keep.wav"
        open(target, "wb").close()
        try:
            create_wav_buffer(1_000_000, 8000, path=target)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        else:
            raise AssertionError("expected ENOSPC")
        print(sorted(os.listdir("/dev/shm/theirs")))
    """, shm_size="64k")
    assert assert_child_ok(done).strip() == "['luna_audio_keep.wav']"
