"""write_wav and read_wav: numpy audio to and from WAV files without copies.

``write_wav`` sends header and samples to the kernel in one ``writev`` straight
from the array's memory. ``read_wav`` maps the file and returns a read-only
array over it (``mmap=True``) or reads the samples into a new array with one
``pread`` (``mmap=False``).
"""

from __future__ import annotations

import os as _os
import stat as _stat
import typing as _typing

import numpy as np

from luna_shm import _lowlevel, _newfile, encoding, formats

__all__ = ["read_wav", "write_wav"]


def write_wav(
    path: str | _os.PathLike[str] | None,
    data: object,
    samplerate: int,
    *,
    subtype: str | None = None,
    atomic: bool = False,
) -> str:
    """Write a numpy array as a WAV file and return its path.

    Args:
        path: where to write; None makes a new temp audio file (RAM disk first).
            A new or empty file is written in place; a file with content is
            replaced by a new one (rename), so that whoever mapped the old one
            keeps reading it whole. A symlink at path is refused (ELOOP), never
            followed; atomic=True replaces the link itself, as a rename does.
        data: array of shape (frames,) or (frames, channels) of uint8, int16,
            int32, float32 or float64. C-contiguous little-endian arrays are
            written straight from their memory; others are converted once. More
            than 2 channels make a WAVE_FORMAT_EXTENSIBLE header whose speaker
            mask is libsndfile's: quad, 5.1 or 7.1 for 4, 6 or 8, else unspecified.
        samplerate: frames per second, 1 to 2**32-1.
        subtype: None for the data's own type, or a python-soundfile subtype name
            ("PCM_16", "PCM_24", ...); "PCM_24" keeps the top 24 bits of int32.
            Float data with a PCM subtype is converted in one C pass: scaled by
            the largest positive sample (1.0 -> 32767), clipped, rounded to
            nearest (ties to even); NaN is written as 0. The product is computed
            as numpy's ``np.rint(data * 32767)`` does: in the data's own precision
            for 8- and 16-bit targets (float32 data in float32, so a product
            within float32's rounding of a .5 may land on the other neighbour),
            in float64 for 24- and 32-bit targets (exact for float32 data).
        atomic: make the complete file appear under its name at once.

    Returns:
        The path written.

    Raises:
        TypeError, ValueError: bad path, data, samplerate or subtype, named in the
            message (a list of Python ints is refused: numpy makes it int64).
        OSError: the write failed (ENOSPC, EFBIG, ...); nothing half-written is left.
            EINVAL "not a regular file" for a FIFO, socket or device at path, which
            is never written over nor replaced (atomic too).
    """
    if atomic is not False and atomic is not True:
        atomic = formats.check_flag("atomic", atomic)
    # The common call (an array like one checked before, written as it is) skips the
    # Encoding: its fixed cost is what a short WAV's write costs beyond its system calls.
    known = encoding.planned_spec(data, samplerate, subtype)
    if known is not None:
        array, spec = _typing.cast(np.ndarray, data), known
    else:
        enc = encoding.plan(data, samplerate, subtype)
        array, spec = encoding.data_chunk(enc), enc.spec
    if path is None:
        return _write_new_temp_file(array, spec, array.nbytes, atomic)
    path_str = _lowlevel.path_argument(path, "str, os.PathLike[str] or None")
    try:
        # A new or empty file is written in place; one with content is replaced through
        # a hidden name in its directory, both made only then (a uuid costs as much as
        # the write of a short WAV).
        if atomic or not _lowlevel.write_wav_path(path_str, spec, array):
            _lowlevel.write_wav_atomic(_os.path.dirname(path_str) or ".", path_str,
                                       _newfile.partial_path(path_str), spec, array)
    except OSError as exc:
        # The C layer removed a file it created and left an existing one as it
        # was; an empty temp file of ours (from get_temp_audio_path) goes too.
        if not atomic and _newfile.is_our_temp_path(path_str):
            _remove_if_empty(path_str)
        failure = _newfile.explain_special(exc, path_str)
        raise _newfile.explain_full_disk(failure, path_str) from None
    return path_str


def _remove_if_empty(path: str) -> None:
    """Remove path when it is an empty regular file (a name reserved with create=True); a
    FIFO, socket or device there (size 0 too) is someone's live file: it stays."""
    try:
        st = _os.lstat(path)
        if _stat.S_ISREG(st.st_mode) and st.st_size == 0:
            _os.unlink(path)
    except FileNotFoundError:
        pass


def _write_new_temp_file(array: np.ndarray, spec: _lowlevel.WavSpec, nbytes: int,
                         atomic: bool) -> str:
    """Write a new temp audio file: unnamed (locked while it is written) and then named
    (O_TMPFILE; elsewhere named first), or, atomic, linked under a hidden name and
    renamed to a fresh uuid4 name. A RAM disk that refuses it (full, read-only) sends
    it to the disk temp dir."""

    def attempt(on_disk: bool) -> str:
        if atomic:
            path = _newfile.new_temp_name(".wav", size_hint=nbytes + 128, on_disk=on_disk)
            # The C layer leaves nothing behind when it fails.
            _lowlevel.write_wav_atomic(_os.path.dirname(path), path,
                                       _newfile.partial_path(path), spec, array)
            return path
        # Written unnamed, then named: a process killed on the way leaves no empty file.
        new = _newfile.create_unnamed_temp_file(".wav", size_hint=nbytes + 128,
                                                on_disk=on_disk)
        return _newfile.fill(new, lambda fd, path: _lowlevel.write_wav_fd(fd, spec, array,
                                                                           path))

    return _newfile.with_disk_fallback(attempt)


def _shape(info: _lowlevel.WavInfo) -> tuple[int, ...]:
    return (info.frames,) if info.channels == 1 else (info.frames, info.channels)


def read_wav(
    path: str | _os.PathLike[str],
    *,
    mmap: bool = True,
    dtype: object = None,
    always_2d: bool = False,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Read a WAV file; return ``(data, samplerate)``.

    Args:
        path: the file (any PCM 8/16/24/32-bit or IEEE float 32/64 WAV, plain or
            EXTENSIBLE, with any other chunks around).
        mmap: True returns a read-only array that views the mapped file (no copy;
            the mapping lives as long as the array). False returns an owned array.
            Ignored when the samples are converted (dtype) or read into out.
        dtype: None for the file's own type; else "int16", "int32", "float32" or
            "float64" (or uint8 for an 8-bit file): the samples are converted in one
            C pass with python-soundfile's values (PCM to float scaled by
            1/2**(bits-1), so 16-bit x becomes x/32768; PCM to int left-justified, so
            16-bit x as int32 is x << 16). Float files are read as float only.
        always_2d: return shape (frames, channels) for mono files too, as soundfile.
        out: an array to read into instead of a new one: C-contiguous, writable,
            int16/int32/float32/float64 (its dtype is the dtype read), shape
            (frames,) for mono or (frames, channels) with at least the file's frames.
            The returned data is ``out[:frames]``, of out's own shape (always_2d does
            not change it), as soundfile returns it.

    Returns:
        data of shape (frames,) for mono or (frames, channels), in the file's
        own type (uint8, int16, int32, float32, float64; 24-bit comes back as
        int32 with the sample in the top 24 bits, a copy) or in dtype, and the
        sample rate.

    Raises:
        TypeError: path is not a str or os.PathLike[str]; dtype is not a sample type;
            out is not a numpy array.
        ValueError: out does not fit the file or is not writable and C-contiguous;
            dtype conflicts with out's; a conversion not made (float to int).
        WavError: the file is malformed, truncated or of an unsupported encoding, or
            holds less than its size says (a /proc or /sys file).
        OSError: the file cannot be opened or read.
    """
    path_str = _lowlevel.path_argument(path, "str or os.PathLike[str]")
    # The flags are checked inline (a call costs on this hot path): True/False pass.
    if mmap is not True and mmap is not False:
        mmap = formats.check_flag("mmap", mmap)
    if always_2d is not False and always_2d is not True:
        always_2d = formats.check_flag("always_2d", always_2d)
    if out is not None:
        samples, channels, samplerate = _read_converted(path_str, dtype, out)
        # out's own shape, as soundfile returns it: a (frames, 1) out of a mono file stays
        # 2-D, a 1-D one stays 1-D whatever always_2d says.
        return out[:samples.size // channels], samplerate
    if dtype is not None:
        samples, channels, samplerate = _read_converted(path_str, dtype, out)
    elif mmap:
        mapping, info = _lowlevel.Mapping.of_wav(path_str)
        samples = mapped_samples(mapping, info)
        channels, samplerate = info.channels, info.samplerate
    else:
        samples, channels, samplerate = _lowlevel.read_wav_owned(path_str, formats.FILE_DTYPES)
    if channels == 1 and not always_2d:
        return samples, samplerate
    return samples.reshape(-1, channels), samplerate


def mapped_samples(mapping: _lowlevel.Mapping, info: _lowlevel.WavInfo) -> np.ndarray:
    """A mapped WAV's samples, flat: a read-only view of the mapping (24-bit: unpacked to
    int32, a copy)."""
    count = info.frames * info.channels
    if info.bits == 24:
        raw = np.frombuffer(mapping.view, np.uint8, count * 3, info.data_offset)
        return _lowlevel.unpack_s24(raw, count)
    return np.frombuffer(mapping.view, formats.dtype_of(info), count, info.data_offset)


def _read_converted(path: str, dtype: object, out: np.ndarray | None
                    ) -> tuple[np.ndarray, int, int]:
    """read_wav with a dtype or an out array: (flat samples, channels, samplerate)."""
    wanted = None if dtype is None else formats.check_dtype(dtype)
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy array, got {_lowlevel.brief(out)}")
        if not (out.flags.c_contiguous and out.flags.writeable) or out.ndim not in (1, 2):
            raise ValueError(f"out must be a writable, C-contiguous 1-D or 2-D array, got "
                             f"shape {out.shape}, contiguous={out.flags.c_contiguous}, "
                             f"writable={out.flags.writeable}")
        if wanted is not None and out.dtype != wanted:
            raise ValueError(f"dtype {wanted} and out's dtype {out.dtype} disagree")
        wanted = out.dtype
        if wanted not in _lowlevel.DECODE_TYPES:
            raise ValueError(f"out must be int16, int32, float32 or float64, got {out.dtype}")
    assert wanted is not None
    return _lowlevel.read_wav_decoded(path, wanted, out)
