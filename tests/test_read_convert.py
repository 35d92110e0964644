"""read_wav(path, dtype=..., always_2d=..., out=...): convert-on-read in one C pass, with
python-soundfile (libsndfile) as the oracle for every value."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from helpers import samples
from luna_shm import read_wav, write_wav

# What each file subtype is written from, and the dtypes it is read as.
SOURCES = {"PCM_U8": "uint8", "PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32",
           "FLOAT": "float32", "DOUBLE": "float64"}
PCM = ("PCM_U8", "PCM_16", "PCM_24", "PCM_32")
TARGETS = ("int16", "int32", "float32", "float64")


def make_file(directory, subtype: str, frames: int, channels: int) -> str:
    path = f"{directory}/{subtype}_{frames}_{channels}.wav"
    data = samples(SOURCES[subtype], frames, channels, seed=frames + channels)
    write_wav(path, data, 16000, subtype=subtype if subtype == "PCM_24" else None)
    return path


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("frames", [0, 1, 37, 70_001])  # 70,001: past a 64 KiB chunk
@pytest.mark.parametrize("dtype", TARGETS)
@pytest.mark.parametrize("subtype", list(SOURCES))
def test_read_wav_converts_exactly_as_soundfile_reads(ram, subtype, dtype, frames,
                                                      channels) -> None:
    path = make_file(ram, subtype, frames, channels)
    if subtype in ("FLOAT", "DOUBLE") and dtype.startswith("int"):
        with pytest.raises(ValueError, match=f"float samples are not read as {dtype}"):
            read_wav(path, dtype=dtype)
        return
    ours, rate = read_wav(path, dtype=dtype)
    theirs, their_rate = sf.read(path, dtype=dtype, always_2d=channels > 1)
    assert rate == their_rate == 16000
    assert ours.dtype == np.dtype(dtype) and ours.flags.writeable
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("subtype", PCM)
def test_pcm_read_as_float_lies_in_minus_one_to_one(ram, subtype) -> None:
    path = make_file(ram, subtype, 5000, 1)
    data, _ = read_wav(path, dtype="float32")
    assert data.min() >= -1.0 and data.max() < 1.0


def test_the_file_type_asked_for_by_name_gives_what_a_plain_read_gives(ram) -> None:
    path = make_file(ram, "PCM_16", 1000, 2)
    plain, _ = read_wav(path, mmap=False)
    named, _ = read_wav(path, dtype="int16")
    np.testing.assert_array_equal(named, plain)
    u8 = make_file(ram, "PCM_U8", 100, 1)
    np.testing.assert_array_equal(read_wav(u8, dtype="uint8")[0], read_wav(u8)[0])


@pytest.mark.parametrize(("subtype", "message"), [
    ("PCM_16", r"16-bit PCM samples are not read as uint8 \(uint8 reads 8-bit files only\): "
               "use int16, int32, float32 or float64$"),
    ("PCM_24", r"24-bit PCM samples are not read as uint8"),  # not "an int32 file"
    ("PCM_32", r"32-bit PCM samples are not read as uint8"),
    ("FLOAT", r"32-bit float samples are not read as uint8 \(float samples are read as "
              r"float32 or float64 only\)$"),  # not "use int16, int32, ..."
    ("DOUBLE", r"64-bit float samples are not read as uint8"),
])
def test_uint8_is_read_from_8_bit_files_only_and_the_refusal_says_what_the_file_holds(
        ram, subtype, message) -> None:
    path = make_file(ram, subtype, 10, 1)
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        read_wav(path, dtype="uint8")


@pytest.mark.parametrize("dtype", [None, "float32"])
@pytest.mark.parametrize("mmap", [True, False])
def test_always_2d_gives_mono_files_a_channel_axis(ram, dtype, mmap) -> None:
    path = make_file(ram, "PCM_16", 100, 1)
    data, _ = read_wav(path, dtype=dtype, mmap=mmap, always_2d=True)
    assert data.shape == (100, 1)
    np.testing.assert_array_equal(data[:, 0], read_wav(path, dtype=dtype)[0])


@pytest.mark.parametrize("dtype", TARGETS)
def test_out_receives_the_samples_and_the_result_views_its_first_frames(ram, dtype) -> None:
    path = make_file(ram, "PCM_24", 500, 2)
    out = np.full((800, 2), 7, dtype=dtype)
    data, rate = read_wav(path, out=out)
    assert rate == 16000 and data.shape == (500, 2)
    assert np.shares_memory(data, out)
    np.testing.assert_array_equal(out[:500], sf.read(path, dtype=dtype)[0])
    assert (out[500:] == 7).all()  # nothing written past the file's frames


def test_out_of_the_files_own_type_is_filled_without_conversion(ram) -> None:
    path = make_file(ram, "FLOAT", 1000, 1)
    out = np.empty(1000, np.float32)
    data, _ = read_wav(path, out=out)
    assert data.base is out or data is out or np.shares_memory(data, out)
    np.testing.assert_array_equal(out, sf.read(path, dtype="float32")[0])


@pytest.mark.parametrize(("out", "message"), [
    (np.empty(10, np.int16), r"out has shape \(10,\), but .* has 500 frames of 2 channel"),
    (np.empty((500, 1), np.int16), r"out has shape \(500, 1\)"),
    (np.empty(1000, np.int16), r"out has shape \(1000,\)"),  # mono layout, stereo file
    (np.empty((500, 2), np.uint8), "out must be int16, int32, float32 or float64"),
    (np.empty((500, 2), ">i2"), "out must be int16, int32, float32 or float64"),
    (np.empty((2, 500), np.int16).T, "out must be a writable, C-contiguous"),
    (np.empty((500, 2, 1), np.int16), "out must be a writable, C-contiguous 1-D or 2-D"),
])
def test_an_out_that_does_not_fit_is_a_value_error_naming_its_shape(ram, out, message) -> None:
    path = make_file(ram, "PCM_16", 500, 2)
    before = out.copy()
    with pytest.raises(ValueError, match=message):
        read_wav(path, out=out)
    np.testing.assert_array_equal(out, before)


def test_a_read_only_out_is_refused(ram) -> None:
    path = make_file(ram, "PCM_16", 10, 1)
    out = np.zeros(10, np.int16)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writable=False"):
        read_wav(path, out=out)


def test_dtype_and_out_must_agree(ram) -> None:
    path = make_file(ram, "PCM_16", 10, 1)
    with pytest.raises(ValueError, match="dtype float32 and out's dtype int16 disagree"):
        read_wav(path, dtype="float32", out=np.empty(10, np.int16))


@pytest.mark.parametrize("dtype", ["complex64", "int64", object])
def test_a_dtype_no_wav_holds_is_a_type_error_naming_it(ram, dtype) -> None:
    path = make_file(ram, "PCM_16", 10, 1)
    with pytest.raises(TypeError, match="dtype must be one of"):
        read_wav(path, dtype=dtype)


def test_out_that_is_not_an_array_is_a_type_error(ram) -> None:
    path = make_file(ram, "PCM_16", 10, 1)
    with pytest.raises(TypeError, match=r"out must be a numpy array, got \[0, 0, 0\]$"):
        read_wav(path, out=[0] * 3)  # type: ignore[arg-type]


def test_a_converted_read_of_a_file_that_shrank_below_its_header_is_a_wav_error(ram) -> None:
    from luna_shm import WavError

    path = make_file(ram, "PCM_16", 1000, 1)
    with open(path, "r+b") as handle:
        handle.truncate(500)
    with pytest.raises(WavError, match="truncated"):
        read_wav(path, dtype="float32")


@pytest.mark.parametrize("always_2d", [False, True])
@pytest.mark.parametrize("out_shape", [(100,), (100, 1), (150,), (150, 1)],
                         ids=["1-D", "2-D", "1-D-longer", "2-D-longer"])
def test_out_of_a_mono_file_comes_back_in_its_own_shape_as_soundfile_returns_it(
        ram, out_shape, always_2d) -> None:
    path = make_file(ram, "PCM_16", 100, 1)
    ours_out, theirs_out = np.zeros(out_shape, np.float32), np.zeros(out_shape, np.float32)
    ours, _ = read_wav(path, out=ours_out, always_2d=always_2d)
    theirs, _ = sf.read(path, out=theirs_out, always_2d=always_2d)
    assert ours.shape == theirs.shape == (100, *out_shape[1:])
    assert np.shares_memory(ours, ours_out) and ours.base is not None
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours_out, theirs_out)
