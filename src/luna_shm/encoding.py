"""From the user's samples to the bytes of a WAV's data chunk.

:func:`plan` checks the input once and decides how the samples become WAV
bytes: as they are (zero copy), converted from float to PCM in one C pass, or
packed to 24 bits. :func:`data_chunk` gives those bytes for a write;
:func:`encode_into` puts them straight into a mapped destination.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from luna_shm import _lowlevel, formats


class Encoding(NamedTuple):
    """Checked samples, the WAV spec they are written as, and how."""

    array: np.ndarray
    spec: _lowlevel.WavSpec
    conversion: str  # "none", "float_to_pcm" or "pack_s24"
    nbytes: int  # bytes of the data chunk


# The common call, a native C-contiguous array of a WAV sample type written as it is, at an
# int rate: its spec and 4 GiB limit by (dtype, rate, channels), made once by the full path
# below. A few attribute reads instead of about 1.5 us of checks per write.
_PLANNED: dict[tuple[np.dtype[Any], int, int], tuple[_lowlevel.WavSpec, int]] = {}


def planned_spec(data: object, samplerate: object, subtype: object) -> _lowlevel.WavSpec | None:
    """The spec of the common call when :func:`plan` has already checked one like it (data
    then goes to the file as it is), else None: write_wav's hot path, with no Encoding made."""
    if (subtype is None and type(data) is np.ndarray and type(samplerate) is int
            and data.flags.c_contiguous and 0 < data.ndim <= 2):
        known = _PLANNED.get((data.dtype, samplerate, data.shape[1] if data.ndim == 2 else 1))
        if known is not None and data.nbytes <= known[1]:
            return known[0]
    return None


def plan(data: object, samplerate: object, subtype: object,
         check_size: Callable[[int], object] | None = None) -> Encoding:
    """Check data, samplerate and subtype; TypeError/ValueError naming what is wrong.

    check_size(nbytes), when given, may refuse the data chunk's size (a pool's slot size)
    before anything is copied: a strided view of gigabytes is refused, not copied first.
    """
    spec = planned_spec(data, samplerate, subtype)
    if spec is not None:
        assert isinstance(data, np.ndarray)
        if check_size is not None:
            check_size(data.nbytes)
        return Encoding(data, spec, "none", data.nbytes)
    enc = _plan(data, samplerate, subtype, check_size)
    if subtype is None and enc.array is data and len(_PLANNED) < 256:
        _PLANNED[enc.array.dtype, enc.spec.samplerate, enc.spec.channels] = (
            enc.spec, formats.max_data_bytes(enc.spec))
    return enc


def _plan(data: object, samplerate: object, subtype: object,
          check_size: Callable[[int], object] | None) -> Encoding:
    rate = formats.check_samplerate(samplerate)
    array = formats.audio_array(data)
    natural = formats.natural_subtype(array.dtype)
    chosen = natural if subtype is None else formats.check_subtype(subtype)
    spec = formats.spec_for(chosen, rate, formats.channels_of(array))
    if chosen == natural:
        conversion = "none"
    elif natural in formats.FLOAT_SUBTYPES and chosen in formats.PCM_SUBTYPES:
        conversion = "float_to_pcm"
    elif chosen == "PCM_24" and natural == "PCM_32":
        conversion = "pack_s24"
    else:
        wanted = formats.SUBTYPES[chosen][2]
        raise ValueError(
            f"subtype {chosen!r} stores {wanted} samples, but data is {array.dtype}; "
            f"convert the data first or use subtype {natural!r}"
        )
    nbytes = array.size * (spec.bits // 8)
    formats.check_data_fits(nbytes, spec)
    if check_size is not None:
        check_size(nbytes)
    return Encoding(formats.contiguous_samples(array), spec, conversion, nbytes)


def data_chunk(enc: Encoding) -> np.ndarray:
    """The data chunk's samples as the file stores them: the caller's own array when no
    conversion is needed, else a new array converted in one C pass."""
    if enc.conversion == "none":
        return enc.array
    dest = np.empty(enc.nbytes // formats.stored_dtype(enc.spec).itemsize,
                    formats.stored_dtype(enc.spec))
    encode_into(enc, dest)
    return dest


def encode_into(enc: Encoding, dest: np.ndarray) -> None:
    """Write the data chunk's bytes into dest (enc.nbytes bytes of memory: a uint8 view
    of a mapped slot, or an array of formats.stored_dtype(enc.spec))."""
    if enc.conversion == "float_to_pcm":
        _lowlevel.float_to_pcm_into(enc.array, dest, enc.spec.bits)
    elif enc.conversion == "pack_s24":
        _lowlevel.pack_s24_into(enc.array, dest)
    else:
        np.copyto(dest.view(np.uint8), enc.array.reshape(-1).view(np.uint8))
