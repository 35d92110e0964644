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


def natural_subtype(dtype: np.dtype[Any]) -> str:
    """The subtype that stores dtype's samples unchanged; TypeError for other dtypes."""
    subtype = _NATURAL_SUBTYPE.get((dtype.kind, dtype.itemsize))
    if subtype is None:
        raise TypeError(f"unsupported sample dtype {dtype}: use {SUPPORTED_DTYPES}")
    return subtype


def check_subtype(subtype: object) -> str:
    """subtype as a known name; ValueError for an unknown one."""
    if not isinstance(subtype, str) or subtype.upper() not in SUBTYPES:
        raise ValueError(f"unknown subtype {subtype!r}: use one of {', '.join(SUBTYPES)}")
    return subtype.upper()


def check_samplerate(samplerate: object) -> int:
    """samplerate as an int in 1..2**32-1; TypeError/ValueError naming the bad value."""
    if isinstance(samplerate, bool):
        raise TypeError(f"samplerate must be an int, got {samplerate!r}")
    try:
        rate = _operator.index(samplerate)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"samplerate must be an int, got {samplerate!r}") from None
    if not 0 < rate <= MAX_SAMPLERATE:
        raise ValueError(f"samplerate must be > 0 and <= {MAX_SAMPLERATE}, got {rate!r}")
    return rate


def check_channels(channels: object) -> int:
    """channels as an int in 1..65535."""
    if isinstance(channels, bool):
        raise TypeError(f"channels must be an int, got {channels!r}")
    try:
        count = _operator.index(channels)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"channels must be an int, got {channels!r}") from None
    if not 0 < count <= MAX_CHANNELS:
        raise ValueError(f"channels must be between 1 and {MAX_CHANNELS}, got {count!r}")
    return count


def check_frames(frames: object) -> int:
    """frames as an int >= 0."""
    if isinstance(frames, bool):
        raise TypeError(f"frames must be an int, got {frames!r}")
    try:
        count = _operator.index(frames)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"frames must be an int, got {frames!r}") from None
    if count < 0:
        raise ValueError(f"frames must be >= 0, got {count!r}")
    return count


def check_dtype(dtype: object) -> np.dtype[Any]:
    """dtype as a little-endian numpy dtype that a WAV can hold."""
    try:
        resolved = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"unsupported sample dtype {dtype!r}: use {SUPPORTED_DTYPES}") from None
    return SUBTYPES[natural_subtype(resolved)][2]


def check_audio(data: object) -> np.ndarray:
    """data as a 1-D or 2-D array of a WAV sample type, C-contiguous and little-endian.

    An array that is already so is returned as is (no copy); a strided or
    big-endian one is converted once.
    """
    array = np.asarray(data)
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
