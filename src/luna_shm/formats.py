"""Sample formats: which numpy dtypes map to which WAV encodings, and input checks.

uint8 -> PCM 8-bit, int16 -> PCM 16, int32 -> PCM 32 (or PCM 24 with
``subtype="PCM_24"``), float32 -> IEEE float 32, float64 -> IEEE float 64.
Subtype names follow python-soundfile.
"""

from __future__ import annotations

import functools as _functools
import math as _math
import numbers as _numbers
import operator as _operator
import threading as _threading
from typing import Any, cast

import numpy as np

from luna_shm._lowlevel import (
    WAVE_FORMAT_IEEE_FLOAT,
    WAVE_FORMAT_PCM,
    WavInfo,
    WavSpec,
    brief,
    plural,
    wav_header_size,
)

# THE table of sample types: subtype -> (WAV format tag, bits in the file, numpy dtype of
# the samples in memory). Every other mapping between dtypes, subtypes and file
# encodings below is derived from it.
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

# numpy dtype (kind, itemsize) -> the subtype that stores it unchanged (not PCM_24).
_NATURAL_SUBTYPE: dict[tuple[str, int], str] = {
    (dtype.kind, dtype.itemsize): name
    for name, (_, bits, dtype) in SUBTYPES.items() if bits == dtype.itemsize * 8
}

# (format tag, bits in the file) -> the dtype read_wav returns (24-bit: int32).
FILE_DTYPES: dict[tuple[int, int], np.dtype[Any]] = {
    (fmt, bits): dtype for fmt, bits, dtype in SUBTYPES.values()
}

_PACKED_24 = np.dtype("<u1")  # 24-bit PCM in memory as written: 3 bytes a sample

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


def check_int(name: str, value: object, *, minimum: int = 0, maximum: int | None = None
              ) -> int:
    """value as an int (numpy integers too, never a bool) in [minimum, maximum].

    The one integer check of the package: TypeError or ValueError naming the argument
    and what the caller passed (briefly: a 5000-digit int by its size).
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        number = _operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {brief(value)}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ValueError(f"{name} must be {bounds}, got {brief(number)}")
    return number


def check_flag(name: str, value: object) -> bool:
    """value as a bool: True or False (numpy's bool too); TypeError naming the argument
    otherwise. Not truthiness: anonymous="no" or mmap="false" would do the opposite of
    what the caller meant."""
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {brief(value)}")


def check_seconds(name: str, value: object, *, maximum: float | None = None,
                  optional: bool = False) -> float:
    """value as a float number of seconds in [0, maximum] (no maximum: any size).

    The one check of the package for real-valued durations (timeouts, ages): ints,
    floats and every numpy real number are taken alike (fractions.Fraction too); a
    bool (numpy's too), NaN and anything else are refused with a TypeError or
    ValueError naming the argument and, briefly, what the caller passed (a 5000-digit
    int by its size). The bounds are checked on the exact value, before it is made a
    float, so an int too large for a float is refused when over maximum and, with no
    maximum, becomes ``inf``: infinity itself is a valid duration there, and what it
    means is the caller's to say. optional=True only words the messages for an
    argument that also takes None (``timeout must be None or ...``); the caller
    handles None itself.
    """
    none = "None or " if optional else ""
    # numbers.Real covers numpy's ints and floats (not numpy's bool, which is not Real).
    if type(value) is not float and type(value) is not int and (
            isinstance(value, bool) or not isinstance(value, _numbers.Real)):
        raise TypeError(f"{name} must be {none}a number of seconds, got {brief(value)}")
    number = cast(float, value)  # a real number, compared exactly as it is
    if not number >= 0 or (maximum is not None and number > maximum):  # not >=: NaN too
        bounds = ">= 0 seconds" if maximum is None else (
            f"between 0 and {int(maximum) if float(maximum).is_integer() else maximum} "
            "seconds")
        raise ValueError(f"{name} must be {none}{bounds}, got {brief(value)}")
    try:
        return float(number)
    except OverflowError:  # an int beyond a float's range: only when there is no maximum
        return _math.inf


def check_timeout(timeout: object) -> float | None:
    """A wait's timeout: float seconds >= 0, or None for no limit (None itself, infinity,
    and anything past threading.TIMEOUT_MAX, about 292 years, which no wait takes).

    The one timeout check of the package (pools, followers, the cache): numpy numbers
    are taken like Python ones; a bool, NaN, a negative number or a non-number is a
    TypeError or ValueError naming it (:func:`check_seconds`).
    """
    if timeout is None:
        return None
    seconds = check_seconds("timeout", timeout, optional=True)
    return None if seconds > _threading.TIMEOUT_MAX else seconds


def check_samplerate(samplerate: object) -> int:
    """samplerate as an int in 1..2**32-1; TypeError/ValueError naming the bad value."""
    return check_int("samplerate", samplerate, minimum=1, maximum=MAX_SAMPLERATE)


def check_channels(channels: object) -> int:
    """channels as an int in 1..65535."""
    return check_int("channels", channels, minimum=1, maximum=MAX_CHANNELS)


def check_frames(frames: object) -> int:
    """frames as an int >= 0."""
    return check_int("frames", frames)


def max_data_bytes(spec: WavSpec, tail_bytes: int = 0, header_len: int | None = None) -> int:
    """The most bytes of samples a WAV file of spec holds: the one 4 GiB limit.

    Its RIFF size, 32 bits, counts everything after itself: the rest of the header
    (header_len bytes; None: the plain header we write for spec), the samples, a pad
    byte after an odd data chunk and any tail chunk.
    """
    header = wav_header_size(spec) if header_len is None else header_len
    data_bytes = MAX_WAV_BYTES - (header - 8) - tail_bytes
    return max(0, data_bytes - (data_bytes & 1))


def check_data_fits(data_bytes: int, spec: WavSpec, header_len: int | None = None) -> None:
    """ValueError when data_bytes of samples do not fit a WAV file of spec."""
    if data_bytes > max_data_bytes(spec, header_len=header_len):
        raise ValueError(
            f"data too large for a WAV file: {data_bytes} bytes of samples (the limit is "
            "4 GiB; RF64 is not supported)"
        )


def max_frames(spec: WavSpec) -> int:
    """The most frames a WAV file of spec can hold (its RIFF sizes are 32-bit)."""
    return max_data_bytes(spec) // (spec.channels * (spec.bits // 8))


def check_frames_fit(frames: int, spec: WavSpec) -> None:
    """ValueError naming frames and the limit when a WAV of spec cannot hold that many."""
    limit = max_frames(spec)
    if frames > limit:
        raise ValueError(
            f"frames={brief(frames)} is too long for a WAV file: with "
            f"{plural(spec.channels, 'channel')} of {spec.bits}-bit samples it holds at most "
            f"{limit} frames (4 GiB; RF64 is not supported)"
        )


def check_dtype(dtype: object) -> np.dtype[Any]:
    """dtype as a little-endian numpy dtype that a WAV can hold.

    Raises:
        TypeError: naming what the caller passed (None is refused, not read as
            numpy's default float64; so is a numpy sample or array, not read as its type).
    """
    # The message is made only on failure: repr of a numpy dtype costs ~20 us.
    def message() -> str:
        return f"dtype must be one of {SUPPORTED_DTYPES}, got {brief(dtype)}"

    # A sample (np.float64(1.5)) or an array is no type, though np.dtype takes its dtype:
    # WavWriter(path, rate, 1, audio[0]) would silently be a writer of whatever that was.
    if dtype is None or isinstance(dtype, (np.generic, np.ndarray)):
        raise TypeError(message())
    try:
        resolved = np.dtype(dtype)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise TypeError(message()) from None
    subtype = _NATURAL_SUBTYPE.get((resolved.kind, resolved.itemsize))
    if subtype is None:
        extra = f" (numpy {resolved})" if str(resolved) != str(dtype) else ""
        raise TypeError(message() + extra)
    return SUBTYPES[subtype][2]


def _as_array(data: object, what: str) -> np.ndarray:
    """data as a numpy array; a list numpy makes an unsupported type of is named as such.
    what names data in messages ("data", or WavWriter.write's "chunk")."""
    if isinstance(data, np.ndarray):
        return data
    if data is None:
        raise TypeError(f"{what} must be a numpy array of {SUPPORTED_DTYPES} samples, got None")
    if isinstance(data, (bytes, bytearray)) or (isinstance(data, memoryview)
                                                 and data.format in ("B", "b", "c")):
        # numpy would make 8-bit samples of a bytearray's bytes: PCM int16 as noise.
        raise TypeError(
            f"{what} must be a numpy array of {SUPPORTED_DTYPES} samples, got raw bytes "
            f"({type(data).__name__} of {memoryview(data).nbytes} bytes): say what they "
            "hold with np.frombuffer(data, dtype=np.int16) (or their sample type); an "
            "encoded file (MP3, a whole WAV) goes to save_temp_audio"
        )
    try:
        array = np.asarray(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} ({brief(data)}) is not an array of samples: {exc}") from None
    if (array.dtype.kind, array.dtype.itemsize) in _NATURAL_SUBTYPE:
        return array
    if isinstance(data, (list, tuple)):
        elements = _PYTHON_ELEMENTS.get(array.dtype.kind, "values")
        got = f"a {type(data).__name__} of Python {elements}, which numpy makes {array.dtype}"
    else:
        got = f"{brief(data)}, which numpy makes {array.dtype}"
    raise TypeError(
        f"{what} must be a numpy array of {SUPPORTED_DTYPES} samples, got {got}: "
        "pass e.g. np.asarray(data, dtype=np.int16)"
    )


def audio_array(data: object, what: str = "data") -> np.ndarray:
    """data as a 1-D or 2-D array of a WAV sample type, checked but not yet made
    contiguous and little-endian (see :func:`contiguous_samples`): a caller checks the
    size it will write before a strided view of gigabytes is copied.

    A list or other sequence is accepted when numpy makes one of the supported types of
    it (a list of Python floats: float64); a list of Python ints (int64) is refused with
    a hint.
    """
    array = _as_array(data, what)
    # One lookup in the table for every type no WAV holds: bool, complex, objects, str,
    # dates, records, and the numbers of another width or sign (int8, int64, float16...).
    if (array.dtype.kind, array.dtype.itemsize) not in _NATURAL_SUBTYPE:
        raise TypeError(f"{what} has unsupported sample dtype {array.dtype}: use "
                        f"{SUPPORTED_DTYPES}")
    if array.ndim not in (1, 2):
        raise ValueError(
            f"{what} must have shape (frames,) or (frames, channels), got {array.ndim}-D "
            f"shape {array.shape}"
        )
    if array.ndim == 2:
        _check_array_channels(array, what)
    return array


def _check_array_channels(array: np.ndarray, what: str) -> None:
    """ValueError naming the shape when a (frames, channels) array has no channel or more
    than a WAV holds."""
    channels = array.shape[1]
    if channels == 0:
        raise ValueError(
            f"{what} has 0 channels (shape {array.shape}): a WAV needs at least one; pass "
            "shape (frames,) for mono or (frames, channels)")
    if channels > MAX_CHANNELS:
        raise ValueError(
            f"{what} has {channels} channels (shape {array.shape}): a WAV holds at most "
            f"{MAX_CHANNELS} (is the array transposed? pass (frames, channels))")


def contiguous_samples(array: np.ndarray) -> np.ndarray:
    """An :func:`audio_array` as C-contiguous little-endian samples: the array itself
    when it already is (no copy), else one converted copy."""
    natural = SUBTYPES[natural_subtype(array.dtype)][2]
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
    return None if spec.bits == 24 else FILE_DTYPES[spec.format, spec.bits]


def stored_dtype(spec: WavSpec) -> np.dtype[Any]:
    """The numpy dtype of an array holding spec's samples as the file stores them
    (packed 24-bit: bytes, 3 a sample)."""
    return _PACKED_24 if spec.bits == 24 else FILE_DTYPES[spec.format, spec.bits]


def check_block_align(spec: WavSpec) -> None:
    """ValueError when a frame of spec does not fit the WAV's 16-bit block-align field."""
    sample_bytes = spec.bits // 8
    if spec.channels * sample_bytes > 0xFFFF:
        raise ValueError(
            f"{plural(spec.channels, 'channel')} of {spec.bits}-bit samples make a frame of "
            f"{spec.channels * sample_bytes} bytes; WAV allows at most 65535"
        )
    if spec.samplerate * spec.channels * sample_bytes > 0xFFFFFFFF:
        raise ValueError(
            f"samplerate {spec.samplerate} with {plural(spec.channels, 'channel')} of "
            f"{spec.bits}-bit "
            "samples overflows the WAV byte-rate field"
        )
