"""write_wav and read_wav: shapes, views and copies, lifetimes, atomic replacement, round trips."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import LIBRARY_PATH, as_soundfile_reads, assert_child_ok
from luna_shm import WavWriter, create_wav_buffer, read_wav, write_wav

RATE = 16000

# (dtype, subtype, bytes per sample in the file)
FORMATS = [("uint8", None, 1), ("int16", None, 2), ("int32", None, 4), ("int32", "PCM_24", 3),
           ("float32", None, 4), ("float64", None, 8)]
FORMAT_IDS = ["uint8", "int16", "int32", "int32-PCM_24", "float32", "float64"]

SOUNDFILE_DTYPE = {"uint8": "int16", "int16": "int16", "int32": "int32",
                   "float32": "float32", "float64": "float64"}

HYPOTHESIS = settings(max_examples=200, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


def random_audio(dtype: str, frames: int, channels: int, seed: int = 0,
                 *, two_d_mono: bool = False) -> np.ndarray:
    """Random bit patterns of dtype (NaNs, infinities and subnormals included for floats)."""
    rng = np.random.default_rng(seed)
    shape = (frames,) if channels == 1 and not two_d_mono else (frames, channels)
    width = np.dtype(dtype).itemsize
    bits = rng.integers(0, 256, int(np.prod(shape)) * width, dtype=np.uint8)
    return bits.view(dtype).reshape(shape)


def in_file(data: np.ndarray, subtype: str | None) -> np.ndarray:
    return data & np.int32(-256) if subtype == "PCM_24" else data


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal shape, dtype and bits (so that NaN payloads count too)."""
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert actual.tobytes() == expected.tobytes()


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run code in a child python that sees the same (private) dirs as this test."""
    env = {**os.environ, "PYTHONPATH": LIBRARY_PATH}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


# ---- read_wav: views, copies, shapes ------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "copy"])
def test_read_wav_returns_frames_for_mono_and_frames_by_channels_otherwise(ram, mmap, channels):
    data = random_audio("int16", 50, channels)
    write_wav(ram / "a.wav", data, RATE)
    back, rate = read_wav(ram / "a.wav", mmap=mmap)
    assert rate == RATE
    assert back.shape == ((50,) if channels == 1 else (50, channels))
    assert_same_bits(back, data)


def test_a_two_dimensional_single_channel_array_reads_back_as_mono(ram):
    data = random_audio("float32", 30, 1, two_d_mono=True)
    write_wav(ram / "a.wav", data, RATE)
    back, _ = read_wav(ram / "a.wav")
    assert_same_bits(back, data[:, 0])


@pytest.mark.parametrize(("dtype", "subtype", "width"),
                         [f for f in FORMATS if f[1] is None], ids=FORMAT_IDS[:3] + FORMAT_IDS[4:])
def test_read_wav_mmap_is_a_read_only_view_that_cannot_be_made_writeable(ram, dtype, subtype,
                                                                        width):
    write_wav(ram / "a.wav", random_audio(dtype, 64, 2), RATE)
    back, _ = read_wav(ram / "a.wav", mmap=True)
    assert not back.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        back[0, 0] = 1
    with pytest.raises(ValueError, match="cannot set WRITEABLE flag"):
        back.setflags(write=True)
    base = back
    while isinstance(base.base, np.ndarray):
        base = base.base
        with pytest.raises(ValueError, match="cannot set WRITEABLE flag"):
            base.setflags(write=True)


def test_read_wav_mmap_views_the_file_itself_so_a_change_to_the_file_shows_through(ram):
    path = ram / "a.wav"
    write_wav(path, np.zeros(1000, np.int16), RATE)
    mapped, _ = read_wav(path, mmap=True)
    copied, _ = read_wav(path, mmap=False)
    data_start = path.stat().st_size - 2000
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, np.array([1234], np.int16).tobytes(), data_start + 2 * 500)
    finally:
        os.close(fd)
    assert mapped[500] == 1234  # no copy was made: the array is the file's memory
    assert copied[500] == 0     # an owned copy is not


def test_two_mmap_reads_of_one_file_share_no_memory_with_each_other_or_the_input(ram):
    data = random_audio("int16", 100, 2)
    write_wav(ram / "a.wav", data, RATE)
    first, _ = read_wav(ram / "a.wav")
    second, _ = read_wav(ram / "a.wav")
    assert not np.shares_memory(first, second)
    assert not np.shares_memory(first, data)


@pytest.mark.parametrize(("dtype", "subtype", "width"), FORMATS, ids=FORMAT_IDS)
def test_read_wav_without_mmap_returns_an_owned_writable_array(ram, dtype, subtype, width):
    data = random_audio(dtype, 40, 2)
    write_wav(ram / "a.wav", data, RATE, subtype=subtype)
    before = (ram / "a.wav").read_bytes()
    back, _ = read_wav(ram / "a.wav", mmap=False)
    assert back.flags.writeable
    assert_same_bits(back, in_file(data, subtype))
    back[:] = 0
    assert (ram / "a.wav").read_bytes() == before
    again, _ = read_wav(ram / "a.wav", mmap=False)
    assert not np.shares_memory(back, again)


def test_a_mapped_array_stays_readable_after_its_file_is_deleted_and_intermediates_are_collected(
        ram):
    path = ram / "a.wav"
    data = random_audio("float64", 5000, 3)
    write_wav(path, data, RATE)
    # Run in a child: were the mapping gone, the read would kill it, not pytest.
    done = run_python(f"""
        import gc, os, numpy as np
        from luna_shm import read_wav
        part = read_wav({str(path)!r})[0][100:200]   # keep only a view of a view
        os.unlink({str(path)!r})
        gc.collect()
        junk = [np.ones(100000) for _ in range(50)]  # reuse freed memory, if any was freed
        del junk
        gc.collect()
        print(part.tobytes().hex())
    """)
    out = assert_child_ok(done)
    assert bytes.fromhex(out.strip()) == data[100:200].tobytes()
    assert not path.exists()


def test_a_mapped_array_survives_an_atomic_rewrite_of_its_file_with_shorter_audio(ram):
    path = ram / "a.wav"
    data = random_audio("int16", 200000, 1)
    write_wav(path, data, RATE)
    done = run_python(f"""
        import numpy as np
        from luna_shm import read_wav, write_wav
        old = read_wav({str(path)!r})[0]
        write_wav({str(path)!r}, np.zeros(10, np.int16), 8000, atomic=True)
        print(hex(int(old.astype(np.int64).sum()) & 0xFFFFFFFF))
    """)
    out = assert_child_ok(done)
    assert int(out, 16) == int(data.astype(np.int64).sum()) & 0xFFFFFFFF


def test_a_mapped_array_survives_a_plain_rewrite_of_its_file_with_shorter_audio(ram):
    path = ram / "a.wav"
    write_wav(path, np.ones(200000, np.int16), RATE)
    done = run_python(f"""
        import numpy as np
        from luna_shm import read_wav, write_wav
        old = read_wav({str(path)!r})[0]
        write_wav({str(path)!r}, np.zeros(10, np.int16), 8000)
        print(int(old.sum()))
    """)
    assert_child_ok(done)


# ---- write_wav: paths, conversions, copies -----------------------------------------------


def test_write_wav_without_a_path_writes_a_new_file_in_the_private_ram_dir(private_dirs):
    data = random_audio("int16", 100, 2)
    first = write_wav(None, data, RATE)
    second = write_wav(None, data, RATE)
    assert first != second
    for path in (first, second):
        assert isinstance(path, str)
        assert path.startswith(private_dirs.ram + "/luna_audio_") and path.endswith(".wav")
        assert_same_bits(read_wav(path)[0], data)
    assert sorted(os.listdir(private_dirs.ram)) == sorted(os.path.basename(p)
                                                          for p in (first, second))


@pytest.mark.parametrize("kind", [str, Path], ids=["str", "Path"])
def test_write_wav_accepts_str_and_path_and_returns_the_path_as_str(ram, kind):
    target = ram / "named.wav"
    returned = write_wav(kind(target), random_audio("int16", 10, 1), RATE)
    assert returned == str(target) and type(returned) is str
    assert sf.info(returned).frames == 10


def test_write_wav_replaces_an_existing_longer_file_completely(ram):
    path = ram / "a.wav"
    write_wav(path, random_audio("int16", 10000, 2), RATE)
    short = random_audio("int16", 10, 2, seed=1)
    write_wav(path, short, RATE)
    back, _ = sf.read(str(path), dtype="int16")
    np.testing.assert_array_equal(back, short)
    assert path.stat().st_size == 44 + short.nbytes


def layouts() -> list:
    base = random_audio("int16", 2000, 4, seed=7)
    return [
        pytest.param(base[::2, :2], id="strided-frames"),
        pytest.param(base[:, ::2], id="strided-channels"),
        pytest.param(base[:, 1], id="one-column"),
        pytest.param(np.asfortranarray(base), id="fortran-order"),
        pytest.param(base.astype(">i2"), id="big-endian-int16"),
        pytest.param(random_audio("float32", 300, 2).astype(">f4"), id="big-endian-float32"),
        pytest.param(random_audio("float64", 300, 3).astype(">f8")[::-1], id="reversed-big-endian"),
        pytest.param(random_audio("int32", 300, 2).astype(">i4"), id="big-endian-int32"),
        pytest.param(base.T.copy().T[::3], id="fortran-strided"),
    ]


@pytest.mark.parametrize("data", layouts())
def test_write_wav_writes_strided_fortran_and_big_endian_arrays_correctly(ram, data):
    path = write_wav(ram / "a.wav", data, RATE)
    native = data.astype(data.dtype.newbyteorder("="))
    back, _ = sf.read(path, dtype=SOUNDFILE_DTYPE[native.dtype.name])
    np.testing.assert_array_equal(back, native)
    ours, _ = read_wav(path)
    assert_same_bits(ours, np.ascontiguousarray(native))


def peak_traced_during(call) -> int:
    """Peak bytes traced by tracemalloc (numpy reports its buffers to it) while call runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - start


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32", "float64"])
def test_write_wav_writes_a_native_contiguous_array_without_copying_it(ram, dtype):
    data = random_audio(dtype, 2_000_000, 2)
    peak = peak_traced_during(lambda: write_wav(ram / "big.wav", data, RATE))
    assert peak < data.nbytes // 8, f"write_wav allocated {peak} bytes for {data.nbytes} of audio"
    assert_same_bits(read_wav(ram / "big.wav")[0], data)


@pytest.mark.parametrize("make", [lambda a: a.astype(">i2"), lambda a: np.asfortranarray(a),
                                  lambda a: np.repeat(a, 2, axis=0)[::2]],
                         ids=["big-endian", "fortran-order", "strided"])
def test_write_wav_converts_an_unusual_array_exactly_once(ram, make):
    data = random_audio("int16", 2_000_000, 2)
    unusual = make(data)
    peak = peak_traced_during(lambda: write_wav(ram / "big.wav", unusual, RATE))
    # One converted copy (which also shows that the measurement sees numpy's buffers), not two.
    assert data.nbytes <= peak < 2 * data.nbytes
    assert_same_bits(read_wav(ram / "big.wav")[0], data)


# ---- atomic replacement ----------------------------------------------------------------

WATCHER = """
import hashlib, json, os, sys
path, stop = sys.argv[1:3]
seen, missing = {}, 0
while not os.path.exists(stop):
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        missing += 1
        continue
    if not seen:
        print("watching", flush=True)
    seen[digest] = seen.get(digest, 0) + 1
print(json.dumps({"seen": seen, "missing": missing}), flush=True)
"""


def test_atomic_write_is_never_seen_half_written_by_a_process_watching_the_path(ram, tmp_path):
    path = ram / "watched.wav"
    old = random_audio("int16", 300_000, 2, seed=1)
    new = random_audio("int16", 200_000, 2, seed=2)
    digests = set()
    for name, version in (("old.wav", old), ("new.wav", new)):
        written = Path(write_wav(tmp_path / name, version, RATE)).read_bytes()
        digests.add(hashlib.sha256(written).hexdigest())
    write_wav(path, old, RATE)
    stop = tmp_path / "stop"
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, str(path), str(stop)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline() == "watching\n"  # it has read the file once
        for i in range(100):
            write_wav(path, new if i % 2 == 0 else old, RATE, atomic=True)
        final_digest = hashlib.sha256(path.read_bytes()).hexdigest()
    finally:
        stop.touch()
        out, _ = watcher.communicate(timeout=60)
    report = json.loads(out)
    assert sum(report["seen"].values()) >= 1
    assert report["missing"] == 0, "the path vanished during an atomic replacement"
    assert set(report["seen"]) <= digests, "a watcher saw a partial WAV"
    assert final_digest in digests  # the last replacement left a complete WAV
    assert os.listdir(ram) == ["watched.wav"], "a hidden partial file was left behind"


@pytest.mark.parametrize("existing", [True, False], ids=["replaces", "creates"])
def test_atomic_write_leaves_exactly_the_new_file_and_nothing_hidden(ram, existing):
    path = ram / "a.wav"
    if existing:
        write_wav(path, random_audio("int16", 5000, 2), RATE)
    data = random_audio("float32", 77, 3)
    assert write_wav(path, data, RATE, atomic=True) == str(path)
    assert_same_bits(read_wav(path)[0], data)
    assert os.listdir(ram) == ["a.wav"]
    assert path.stat().st_mode & 0o777 == 0o600  # what the replaced file of ours was


@pytest.mark.parametrize("atomic", [False, True], ids=["plain", "atomic"])
@pytest.mark.parametrize(("before", "mode", "expected"), [
    (None, None, 0o600),
    (b"", 0o644, 0o644),
    (b"old audio", 0o644, 0o644),
    (b"old audio", 0o640, 0o640),
    (b"old audio", 0o4755, 0o755),  # never the setuid bit
], ids=["nothing", "an-empty-0644-file", "a-0644-file-with-content",
        "a-0640-file-with-content", "a-setuid-file-with-content"])
def test_a_file_write_wav_makes_keeps_the_permissions_of_the_users_file_it_replaces(
        tmp_path, atomic, before, mode, expected):
    # The README: a new file is 0600; one that replaces (or fills) a regular file of
    # this user keeps that file's permission bits, never wider than they were.
    path = tmp_path / "out.wav"
    if before is not None:
        path.write_bytes(before)
        path.chmod(mode)
    data = random_audio("int16", 10, 1)
    write_wav(path, data, RATE, atomic=atomic)
    assert path.stat().st_mode & 0o7777 == expected
    assert_same_bits(read_wav(path)[0], data)
    assert os.listdir(tmp_path) == ["out.wav"]


@pytest.mark.parametrize("atomic", [False, True], ids=["plain", "atomic"])
def test_a_file_of_another_user_that_write_wav_replaces_becomes_a_private_file_of_ours(
        tmp_path, atomic):
    path = tmp_path / "out.wav"
    path.write_bytes(b"their audio")
    path.chmod(0o666)
    try:
        os.chown(path, 65534, 65534)
    except PermissionError:
        pytest.skip("cannot give a file to another user here (needs CAP_CHOWN)")
    write_wav(path, random_audio("int16", 10, 1), RATE, atomic=atomic)
    st = path.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (os.geteuid(), 0o600)


@pytest.mark.parametrize("maker", ["WavWriter", "create_wav_buffer"])
def test_a_writer_or_buffer_that_replaces_a_users_file_keeps_its_permissions(ram, maker):
    path = ram / "out.wav"
    path.write_bytes(b"old audio")
    path.chmod(0o644)
    if maker == "WavWriter":
        with WavWriter(path, RATE) as writer:
            writer.write(np.ones(10, np.int16))
    else:
        with create_wav_buffer(10, RATE, path=path) as buf:
            buf.array[:] = 1
    assert path.stat().st_mode & 0o7777 == 0o644
    assert (read_wav(path, mmap=False)[0] == 1).all()


def test_atomic_write_without_a_path_writes_a_new_temp_file(private_dirs):
    data = random_audio("int16", 10, 1)
    path = write_wav(None, data, RATE, atomic=True)
    assert path.startswith(private_dirs.ram + "/luna_audio_")
    assert os.listdir(private_dirs.ram) == [os.path.basename(path)]
    assert_same_bits(read_wav(path)[0], data)


# ---- hypothesis round trips --------------------------------------------------------------


@st.composite
def audio(draw, *, max_rate: int = 2**32 - 1):
    dtype, subtype, width = draw(st.sampled_from(FORMATS))
    channels = draw(st.integers(1, 8))
    frames = draw(st.integers(0, 2000))
    two_d_mono = channels == 1 and draw(st.booleans())
    data = random_audio(dtype, frames, channels, draw(st.integers(0, 2**32 - 1)),
                        two_d_mono=two_d_mono)
    # The byte rate (rate * channels * width) is a 32-bit field.
    rate = draw(st.integers(1, min(max_rate, (2**32 - 1) // (channels * width))))
    return data, subtype, rate


def mono_as_read(data: np.ndarray) -> np.ndarray:
    return data[:, 0] if data.ndim == 2 and data.shape[1] == 1 else data


@HYPOTHESIS
@given(case=audio(), mmap=st.booleans())
def test_any_shape_dtype_and_rate_round_trips_through_write_wav_and_read_wav(ram, case, mmap):
    data, subtype, rate = case
    path = ram / f"{uuid.uuid4().hex}.wav"
    assert write_wav(path, data, rate, subtype=subtype) == str(path)
    back, back_rate = read_wav(path, mmap=mmap)
    path.unlink()
    assert back_rate == rate
    assert_same_bits(back, in_file(mono_as_read(data), subtype))


@HYPOTHESIS
@given(rate=st.integers(1, 2**32 - 1))
def test_every_samplerate_up_to_2_32_minus_1_round_trips(ram, rate):
    path = ram / "rate.wav"
    write_wav(path, np.arange(5, dtype=np.uint8), rate)
    assert read_wav(path, mmap=False)[1] == rate
    assert int.from_bytes(path.read_bytes()[24:28], "little") == rate


# libsndfile keeps the sample rate in a C int.
@HYPOTHESIS
@given(case=audio(max_rate=2**31 - 1))
def test_soundfile_reads_what_we_write_for_any_shape_dtype_and_rate(ram, case):
    data, subtype, rate = case
    path = ram / f"{uuid.uuid4().hex}.wav"
    write_wav(path, data, rate, subtype=subtype)
    expected = as_soundfile_reads(in_file(mono_as_read(data), subtype))
    back, back_rate = sf.read(str(path), dtype=expected.dtype.name)
    path.unlink()
    assert back_rate == rate
    assert_same_bits(back, expected)


SOUNDFILE_SUBTYPES = {"PCM_U8": "int16", "PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32",
                      "FLOAT": "float32", "DOUBLE": "float64"}
SUBTYPE_WIDTH = {"PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}


@HYPOTHESIS
@given(subtype=st.sampled_from(sorted(SOUNDFILE_SUBTYPES)), channels=st.integers(1, 8),
       frames=st.integers(0, 2000), rate=st.integers(1, 2**31 - 1),
       seed=st.integers(0, 2**32 - 1), container=st.sampled_from(["WAV", "WAVEX"]))
def test_read_wav_reads_what_soundfile_writes_for_any_shape_subtype_and_rate(
        ram, subtype, channels, frames, rate, seed, container):
    given_dtype = SOUNDFILE_SUBTYPES[subtype]
    data = random_audio(given_dtype, frames, channels, seed)
    if given_dtype.startswith("float"):
        data = np.nan_to_num(data, nan=0.0, posinf=1.0, neginf=-1.0)
    # Keep the fmt chunk's 32-bit byte rate (rate * channels * bytes) valid.
    rate = min(rate, (2**32 - 1) // (channels * SUBTYPE_WIDTH[subtype]))
    path = ram / f"{uuid.uuid4().hex}.wav"
    sf.write(str(path), data, rate, subtype=subtype, format=container)
    expected, sf_rate = sf.read(str(path), dtype=given_dtype)
    for mmap in (True, False):
        ours, our_rate = read_wav(path, mmap=mmap)
        assert our_rate == sf_rate == rate
        assert_same_bits(as_soundfile_reads(ours), expected)
    path.unlink()
