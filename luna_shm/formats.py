"""Sample formats: which numpy dtypes map to which WAV encodings, and input checks.

uint8 -> PCM 8-bit, int16 -> PCM 16, int32 -> PCM 32 (or PCM 24 with
``subtype="PCM_24"``), float32 -> IEEE float 32, float64 -> IEEE float 64.
Subtype names follow python-soundfile.
"""

from __future__ import annotations

import functools as _functools
import operator as _operator
from typing import Any

import numpy as np

from luna_shm._lowlevel import (
    FILE_DTYPES,
    WAVE_FORMAT_IEEE_FLOAT,
    WAVE_FORMAT_PCM,
    WavInfo,
    WavSpec,
    brief,
    wav_header_size,
)

# subtype -> (WAV format tag, bits in the file, numpy dtype of the samples in memory)
SUBTYPES: dict[str, tuple[int, int, np.dtype[Any]]] = {
    "PCM_U8": (WAVE_FORMAT_PCM, 8, np.dtype("<u1")),
    "PCM_16": (WAVE_FORMAT_PCM, 16, np.dtype("<i2")),
    "PCM_24": (WAVE_FORMAT_PCM, 24, np.dtype("<i4")),
    "PCM_32": (WAVE_FORMAT_PCM, 32, np.dtype("<i4")),
    "FLOAT": (WAVE_FORMAT_IEEE_FLOAT, 32, np.dtype("<f4")),
    "DOUBLE": (WAVE_FORMAT_IEEE_FLOAT, 64, np.dtype("<f8")),
}

PCM_SUBTYPES = frozenset({"PCM_U8", "PCM_16", "PCM_24", "PCM_32"})
FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})

# numpy dtype (kind, itemsize) -> its own subtype
_NATURAL_SUBTYPE: dict[tuple[str, int], str] = {
    ("u", 1): "PCM_U8",
    ("i", 2): "PCM_16",
    ("i", 4): "PCM_32",
    ("f", 4): "FLOAT",
    ("f", 8): "DOUBLE",
}

SUPPORTED_DTYPES = "uint8, int16, int32, float32 or float64"
MAX_CHANNELS = 65535
MAX_SAMPLERATE = 2**32 - 1
MAX_WAV_BYTES = 2**32 - 1  # RIFF sizes are 32-bit; RF64 is not supported

# What numpy makes of a list of Python values, by dtype kind: for the error message.
_PYTHON_ELEMENTS = {"i": "ints", "u": "ints", "b": "bools", "f": "floats", "c": "complex numbers",
                    "U": "strings", "S": "bytes", "O": "objects"}


def natural_subtype(dtype: np.dtype[Any]) -> str:
    """The subtype that stores dtype's samples unchanged; TypeError for other dtypes."""
    subtype = _NATURAL_SUBTYPE.get((dtype.kind, dtype.itemsize))
    if subtype is None:
        raise TypeError(f"unsupported sample dtype {dtype}: use {SUPPORTED_DTYPES}")
    return subtype


def check_subtype(subtype: object) -> str:
    """subtype as a known name; ValueError for an unknown one."""
    if not isinstance(subtype, str) or subtype.upper() not in SUBTYPES:
        raise ValueError(f"unknown subtype {brief(subtype)}: use one of {', '.join(SUBTYPES)}")
    return subtype.upper()


def check_samplerate(samplerate: object) -> int:
    """samplerate as an int in 1..2**32-1; TypeError/ValueError naming the bad value."""
    if isinstance(samplerate, bool):
        raise TypeError(f"samplerate must be an int, got {samplerate!r}")
    try:
        rate = _operator.index(samplerate)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"samplerate must be an int, got {brief(samplerate)}") from None
    if not 0 < rate <= MAX_SAMPLERATE:
        raise ValueError(f"samplerate must be > 0 and <= {MAX_SAMPLERATE}, got {brief(rate)}")
    return rate


def check_channels(channels: object) -> int:
    """channels as an int in 1..65535."""
    if isinstance(channels, bool):
        raise TypeError(f"channels must be an int, got {channels!r}")
    try:
        count = _operator.index(channels)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"channels must be an int, got {brief(channels)}") from None
    if not 0 < count <= MAX_CHANNELS:
        raise ValueError(f"channels must be between 1 and {MAX_CHANNELS}, got {brief(count)}")
    return count


def check_frames(frames: object) -> int:
    """frames as an int >= 0."""
    if isinstance(frames, bool):
        raise TypeError(f"frames must be an int, got {frames!r}")
    try:
        count = _operator.index(frames)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"frames must be an int, got {brief(frames)}") from None
    if count < 0:
        raise ValueError(f"frames must be >= 0, got {brief(count)}")
    return count


def max_frames(spec: WavSpec) -> int:
    """The most frames a WAV file of spec can hold (its RIFF sizes are 32-bit)."""
    data_bytes = MAX_WAV_BYTES - (wav_header_size(spec) - 8)
    data_bytes -= data_bytes & 1  # an odd data chunk takes a pad byte
    return data_bytes // (spec.channels * (spec.bits // 8))


def check_frames_fit(frames: int, spec: WavSpec) -> None:
    """ValueError naming frames and the limit when a WAV of spec cannot hold that many."""
    limit = max_frames(spec)
    if frames > limit:
        raise ValueError(
            f"frames={brief(frames)} is too long for a WAV file: with {spec.channels} "
            f"channel(s) of {spec.bits}-bit samples it holds at most {limit} frames "
            "(4 GiB; RF64 is not supported)"
        )


def check_dtype(dtype: object) -> np.dtype[Any]:
    """dtype as a little-endian numpy dtype that a WAV can hold.

    Raises:
        TypeError: naming what the caller passed (None is refused, not read as
            numpy's default float64).
    """
    message = f"dtype must be one of {SUPPORTED_DTYPES}, got {brief(dtype)}"
    if dtype is None:
        raise TypeError(message)
    try:
        resolved = np.dtype(dtype)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise TypeError(message) from None
    subtype = _NATURAL_SUBTYPE.get((resolved.kind, resolved.itemsize))
    if subtype is None:
        if str(resolved) != str(dtype):
            message += f" (numpy {resolved})"
        raise TypeError(message)
    return SUBTYPES[subtype][2]


def _as_array(data: object) -> np.ndarray:
    """data as a numpy array; a list numpy makes an unsupported type of is named as such."""
    if isinstance(data, np.ndarray):
        return data
    if data is None:
        raise TypeError(f"data must be a numpy array of {SUPPORTED_DTYPES} samples, got None")
    try:
        array = np.asarray(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"data ({brief(data)}) is not an array of samples: {exc}") from None
    if (array.dtype.kind, array.dtype.itemsize) in _NATURAL_SUBTYPE:
        return array
    if isinstance(data, (list, tuple)):
        elements = _PYTHON_ELEMENTS.get(array.dtype.kind, "values")
        got = f"a {type(data).__name__} of Python {elements}, which numpy makes {array.dtype}"
    else:
        got = f"{brief(data)}, which numpy makes {array.dtype}"
    raise TypeError(
        f"data must be a numpy array of {SUPPORTED_DTYPES} samples, got {got}: "
        "pass e.g. np.asarray(data, dtype=np.int16)"
    )


def check_audio(data: object) -> np.ndarray:
    """data as a 1-D or 2-D array of a WAV sample type, C-contiguous and little-endian.

    An array that is already so is returned as is (no copy); a strided or
    big-endian one is converted once. A list or other sequence is accepted when
    numpy makes one of the supported types of it (a list of Python floats:
    float64); a list of Python ints (int64) is refused with a hint.
    """
    array = _as_array(data)
    if array.dtype.kind in "bcOSUVMm":
        raise TypeError(f"unsupported sample dtype {array.dtype}: use {SUPPORTED_DTYPES}")
    natural = SUBTYPES[natural_subtype(array.dtype)][2]
    if array.ndim not in (1, 2):
        raise ValueError(
            f"data must have shape (frames,) or (frames, channels), got {array.ndim}-D "
            f"shape {array.shape}"
        )
    if array.ndim == 2:
        check_channels(array.shape[1])
    if array.dtype != natural or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=natural)
    return array


def channels_of(array: np.ndarray) -> int:
    """Channel count of a checked (frames,) or (frames, channels) array."""
    return 1 if array.ndim == 1 else int(array.shape[1])


@_functools.lru_cache(maxsize=256)
def spec_for(subtype: str, samplerate: int, channels: int) -> WavSpec:
    """The WavSpec that writes subtype at this rate and channel count.

    Raises:
        ValueError: a frame or the byte rate would not fit the WAV header's fields.
    """
    fmt, bits, _ = SUBTYPES[subtype]
    spec = WavSpec(samplerate=samplerate, channels=channels, format=fmt, bits=bits)
    check_block_align(spec)
    return spec


def dtype_of(info: WavInfo) -> np.dtype[Any]:
    """The numpy dtype read_wav returns for a parsed file (24-bit: int32)."""
    return FILE_DTYPES[info.format, info.bits]


def view_dtype(spec: WavSpec) -> np.dtype[Any] | None:
    """The numpy dtype that views spec's samples in place, or None (packed 24-bit)."""
    if spec.bits == 24:
        return None
    if spec.format == WAVE_FORMAT_IEEE_FLOAT:
        return np.dtype(f"<f{spec.bits // 8}")
    return np.dtype("<u1") if spec.bits == 8 else np.dtype(f"<i{spec.bits // 8}")


def check_block_align(spec: WavSpec) -> None:
    """ValueError when a frame of spec does not fit the WAV's 16-bit block-align field."""
    sample_bytes = spec.bits // 8
    if spec.channels * sample_bytes > 0xFFFF:
        raise ValueError(
            f"{spec.channels} channels of {spec.bits}-bit samples make a frame of "
            f"{spec.channels * sample_bytes} bytes; WAV allows at most 65535"
        )
    if spec.samplerate * spec.channels * sample_bytes > 0xFFFFFFFF:
        raise ValueError(
            f"samplerate {spec.samplerate} with {spec.channels} channels of {spec.bits}-bit "
            "samples overflows the WAV byte-rate field"
        )
