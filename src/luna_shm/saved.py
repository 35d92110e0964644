"""save_temp_audio: encoded audio (MP3, Opus, ...) from a cloud TTS into a RAM-disk file.

Cloud TTS clients return the audio as bytes, or as an iterator of byte chunks
(ElevenLabs' ``convert`` and ``stream``). ``save_temp_audio`` writes either to
a new temp file with the same safety as every luna_shm file (exclusive
creation, mode 0600, RAM disk first with the same fallback) and in few system
calls: bytes in one ``write``, chunks gathered and written with ``writev``.
"""

from __future__ import annotations

import errno as _errno
import os as _os
import re as _re
from collections.abc import Callable, Iterable, Iterator, Mapping, Set

from luna_shm import _lowlevel, _newfile
from luna_shm.placement import AUDIO_PREFIX

__all__ = ["save_temp_audio"]

BytesLike = bytes | bytearray | memoryview

_BYTES_TYPES = (bytes, bytearray, memoryview)

# The ":name:" of a field in a struct format (numpy's record arrays: "T{O:name:i:size:}").
_FIELD_NAMES = _re.compile(r":[^:]*:")

# Gather up to this many bytes of chunks before one writev: few system calls,
# bounded memory held for a long stream.
_BATCH_BYTES = 1 << 20

try:
    _IOV_MAX = max(16, _os.sysconf("SC_IOV_MAX"))
except (AttributeError, ValueError, OSError):  # pragma: no cover - not Linux
    _IOV_MAX = 1024


def _holds_objects(fmt: str) -> bool:
    """True when a struct format has Python objects ('O') in it, field names aside."""
    return "O" in _FIELD_NAMES.sub("", fmt)


def _byte_view(chunk: BytesLike) -> memoryview:
    """A flat, C-contiguous byte view of chunk (a non-contiguous memoryview is copied once).

    Raises:
        TypeError: chunk's items are Python objects (a view of an object array): its
            bytes are addresses in this process, not audio.
    """
    view = memoryview(chunk)
    if view.format != "B" and _holds_objects(view.format):
        raise TypeError(f"data must be bytes, not a memoryview of Python objects (format "
                        f"{view.format!r}): its bytes are addresses in this process")
    if view.nbytes == 0:  # a shape with a zero in it cannot be cast: nothing to write
        return memoryview(b"")
    if not view.c_contiguous:
        return memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _check_data(data: object) -> None:
    if isinstance(data, str):
        raise TypeError(
            "data must be bytes, bytearray, memoryview or an iterable of them, got str "
            "(encoded audio is bytes: encode text yourself if you mean to save text)"
        )
    if isinstance(data, _BYTES_TYPES):
        return
    try:
        memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        is_buffer = False
    except ValueError:  # a buffer it cannot export (numpy's dates): no bytes either
        is_buffer = True
    else:
        is_buffer = True
    if is_buffer or not isinstance(data, Iterable):
        raise TypeError(
            "data must be bytes, bytearray, memoryview or an iterable of them, got "
            f"{_lowlevel.brief(data)}"
        )
    # Chunks are written in the order they come: a mapping yields its keys, and a set
    # (a dict's keys() or items() too) in no order that the audio had.
    why = (_UNORDERED_MAPPING if isinstance(data, Mapping)
           else _UNORDERED_SET if isinstance(data, Set)
           else _UNORDERED_ITERATORS.get(type(data)))
    if why is not None:
        raise TypeError(
            "data must be bytes, bytearray, memoryview or an ordered iterable of them (a "
            f"list, a tuple, a generator of chunks), got a {type(data).__name__} "
            f"{_lowlevel.brief(data)}: {why}"
        )


_UNORDERED_MAPPING = "iterating a mapping yields its keys, not audio"
_UNORDERED_SET = "a set holds its items in no order (and each only once)"
# The iterators of those (iter(a_set), iter(a_dict)): as they are.
_UNORDERED_ITERATORS: dict[type, str] = {type(iter(set())): _UNORDERED_SET,
                                         type(iter({})): _UNORDERED_MAPPING}


def _chunk_view(chunk: object, index: int) -> memoryview:
    if not isinstance(chunk, _BYTES_TYPES):
        raise TypeError(
            f"chunk {index} of data must be bytes, bytearray or memoryview, got "
            f"{_lowlevel.brief(chunk)}"
        )
    return _byte_view(chunk)


def _write_all(fd: int, views: list[memoryview], path: str) -> None:
    """Write every byte of views at fd's position: writev, repeated on short writes; an
    OSError names path (ENOSPC with the full-RAM-disk hint)."""
    pending = [view for view in views if view.nbytes]
    while pending:
        batch = pending[:_IOV_MAX]
        try:
            written = _os.writev(fd, batch) if len(batch) > 1 else _os.write(fd, batch[0])
        except OSError as exc:
            raise _newfile.explain_full_disk(exc, path) from None
        if written == 0:
            raise OSError(_errno.EIO, "the file accepted no more bytes", path)
        done = 0
        while done < len(pending) and written >= pending[done].nbytes:
            written -= pending[done].nbytes
            done += 1
        del pending[:done]
        if written:
            pending[0] = pending[0][written:]


def _write_chunks(fd: int, chunks: Iterator[object], path: str) -> None:
    """Write chunks in batches; a mutable chunk is written before the next is asked for.

    Producers may reuse one bytearray for every chunk, so a batch that holds a
    mutable chunk goes out before the iterator runs again.
    """
    batch: list[memoryview] = []
    size = 0
    for index, chunk in enumerate(chunks):
        view = _chunk_view(chunk, index)
        batch.append(view)
        size += view.nbytes
        if not view.readonly or size >= _BATCH_BYTES or len(batch) >= _IOV_MAX:
            _write_all(fd, batch, path)
            batch, size = [], 0
    _write_all(fd, batch, path)


def save_temp_audio(
    data: BytesLike | Iterable[BytesLike],
    suffix: str = ".mp3",
    *,
    prefix: str = AUDIO_PREFIX,
) -> str:
    """Write encoded audio to a new temp file and return its path.

    Args:
        data: the whole file as bytes, bytearray or memoryview, or an iterable of
            such chunks (a generator from a streaming TTS client), written in order.
        suffix: file name ending, e.g. ``".mp3"`` or ``".opus"``; no ``/`` or NUL.
        prefix: file name start; our cleanup knows ``luna_audio_`` and ``luna_daemon_``.

    Returns:
        The path of the new file (mode 0600): on the RAM disk when it is usable
        and (for bytes) has room, else in the fallback temp dir. Remove it with
        :func:`cleanup_temp_audio`.

    Raises:
        TypeError: data is a str, a mapping or a set (whose iteration is no audio in
            order), or neither bytes-like nor an iterable of bytes-like chunks, or a
            chunk is not bytes-like (the message names what was passed).
        ValueError: a bad suffix or prefix.
        OSError: the file could not be created or written (ENOSPC with the
            filename when the RAM disk fills during a stream). Bytes (or a list or
            tuple of chunks) that the RAM disk refuses (full, read-only) are written
            to the fallback temp dir instead; a stream of chunks (an iterator) cannot
            be replayed, so only its creation falls back: a RAM disk that fills
            during a stream raises.
        Any exception the iterator raises. On every failure the file is removed.
    """
    _check_data(data)
    _newfile.check_name_part("suffix", suffix)
    _newfile.check_name_part("prefix", prefix)
    if isinstance(data, (*_BYTES_TYPES, list, tuple)):
        # Bytes, or a list or tuple of chunks: its size is known and it can be written
        # again, so it is placed by its size and falls back whole, as bytes do.
        if isinstance(data, _BYTES_TYPES):
            views = [_byte_view(data)]
        else:
            views = [_chunk_view(chunk, index) for index, chunk in enumerate(data)]
        size = sum(view.nbytes for view in views)
        return _newfile.with_disk_fallback(
            lambda on_disk: _save(lambda fd, path: _write_all(fd, views, path), suffix,
                                  prefix, size, on_disk))
    # A stream cannot be replayed: only its creation may move to the disk temp dir.
    chunks = iter(data)
    new = _newfile.with_disk_fallback(
        lambda on_disk: _newfile.create_unnamed_temp_file(suffix, prefix, on_disk=on_disk))
    return _newfile.fill(new, lambda fd, path: _write_chunks(fd, chunks, path))


def _save(write: Callable[[int, str], None], suffix: str, prefix: str, size: int,
          on_disk: bool) -> str:
    """One try at a new file holding what write puts at its fd; nothing left on failure."""
    new = _newfile.create_unnamed_temp_file(suffix, prefix, size_hint=size, on_disk=on_disk)
    return _newfile.fill(new, write)


