"""A pool's slot files: their size, the marker that makes a file a slot, how a slot is
made ready, checked and closed, and the reclaim of the slot files of pools whose
process died.
"""

from __future__ import annotations

import errno as _errno
import os as _os
import re as _re
import warnings as _warnings
import weakref as _weakref

import numpy as np

from luna_shm import (
    _lowlevel,
    _newfile,
    _resource,
    formats,
    placement,
    temp_audio,
)
from luna_shm.placement import AUDIO_PREFIX

PAGE = _os.sysconf("SC_PAGESIZE")
HEADER_ROOM = 128  # >= LUNA_WAV_MAX_HEADER
POOL_MARK = "pool_"
# The last bytes of every slot file, written when the slot is made: a new pool reclaims
# only unlocked files that carry it (and a RIFF/WAVE header covering the whole file),
# never a file merely named like a slot. It lies inside the slot's tail JUNK chunk,
# past anything a pool write can reach (see slot_length), so readers skip it.
SLOT_MARKER = b"luna_shm:pool1\0\0"
_SAFE_PREFIX = _re.compile(r"[A-Za-z0-9_-]+")


class Lease:
    """A call's claim on a slot, then its PooledWav's: the slot is theirs while this
    object lives. A slot whose lease died without giving it back (an exception, or a
    signal handler that raised, between taking the slot and handing it over or between
    a release's steps) is found again when the pool runs dry (AudioPool._reclaim_lost):
    Python can raise at every call, so no order of statements alone closes those gaps."""

    __slots__ = ("__weakref__",)


class Slot:
    """One pre-faulted file (or memfd) of a pool and its mapping."""

    __slots__ = ("array", "byte_view", "cell", "fd", "identity", "lease", "length", "mapping",
                 "path", "readonly", "verified", "watched")

    def __init__(self, cell: _lowlevel.FdCell, path: str, mapping: _lowlevel.Mapping) -> None:
        self.cell = cell  # owns the fd
        self.fd: int = cell[0]
        self.path = path
        self.mapping = mapping
        self.length = mapping.length
        self.byte_view = np.frombuffer(mapping.view, dtype=np.uint8)
        self.readonly = mapping.view.toreadonly()
        st = _lowlevel.fstat(self.fd, path)
        self.identity = (st.st_dev, st.st_ino)
        # watched: the pool's inotify instance watches this file. verified: its name was
        # checked (still_named) and the watch has reported nothing since.
        self.watched = False
        self.verified = False
        # Who holds the slot: None while it is free (or lost before a lease was set).
        self.lease: _weakref.ReferenceType[Lease] | None = None
        # Its holder's array (PooledWav.array), made on first use. Kept here, not in the
        # PooledWav, so that a forked child drops it with the slot (see let_go).
        self.array: np.ndarray | None = None

    def let_go(self) -> None:
        """In a forked child: close the child's copy of the fd and drop the child's
        references to the mapping (which holds the open file too, and with it the
        flock): unmapped at once unless the user keeps an array of it. The slot is
        the parent's: the child never uses it again (its pool refuses)."""
        try:
            _lowlevel.release(self.cell)
        except OSError:
            pass
        del self.mapping, self.byte_view, self.readonly
        self.array = None

    def still_named(self) -> bool:
        """True while path names this slot's file, at the slot's full length.

        A ``write_wav(pooled.path, ...)`` replaces the name with a new file, and
        another program may cut or remove it: a slot whose path no longer is its
        own file must never be handed out, or its holder's path would hold other audio.
        """
        try:
            st = _os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.identity and st.st_size == self.length


def slot_length(max_bytes: int) -> int:
    # Room for the largest header, the audio, its pad byte, the tail chunk's header
    # and the marker: a write of max_bytes ends at most at HEADER_ROOM + max_bytes +
    # 1 + 8, which is <= length - len(SLOT_MARKER), so it never reaches the marker.
    need = HEADER_ROOM + max_bytes + 1 + 8 + len(SLOT_MARKER)
    return -(-need // PAGE) * PAGE


def check_prefix(prefix: object) -> str:
    _newfile.check_name_part("prefix", prefix)
    assert isinstance(prefix, str)
    if not _SAFE_PREFIX.fullmatch(prefix):
        raise ValueError(
            "prefix must be one or more letters, digits, '_' or '-' (the start of the "
            f"pool's file names), got {prefix!r}")
    return prefix


def check_slot_file(slot: Slot) -> None:
    """ESTALE when slot's mapping is broken or its file no longer has the slot's length
    (see Mapping.check_file); once the pool closed the slot's fd (its file is gone then),
    only the mapping is checked."""
    fd = slot.cell[0]
    if fd < 0:
        slot.mapping.check()
    else:
        slot.mapping.check_file(fd, slot.length)


def close_slot(slot: Slot, *, unlink: bool) -> None:
    """Close a slot's fd (its mapping lives on with the arrays that view it); with
    unlink=True also remove its name, but only while the name is still this slot's
    file: a file someone wrote at the slot's path is theirs, never ours to delete, even
    one renamed over the path while we remove it (temp_audio.remove_if_same)."""
    # The fd first: the removal opens the slot's directory, which a full fd table (a
    # daemon that ran out of fds, closing its pool) must not refuse.
    try:
        _lowlevel.release(slot.cell)
    except OSError:
        pass
    if unlink:
        temp_audio.remove_if_same(slot.path, slot.identity)


def close_slots(slots: list[Slot], watch_cell: _lowlevel.FdCell, anonymous: bool,
                leaked: bool, owner_pid: int) -> None:
    # In a forked child (close() there, its exit, its garbage collector) the slots are
    # the parent's: only the child's copies of the descriptors are closed.
    # A slot that cannot be removed (EROFS, EMFILE for its directory) stops no other:
    # every slot is closed and removed before the first failure is raised, naming its
    # file; what stays is unlocked, and the next pool reclaims it.
    ours = owner_pid == _resource.current_pid
    failure: OSError | None = None
    for slot in slots:
        try:
            close_slot(slot, unlink=ours and not anonymous)
        except OSError as exc:
            if failure is None:
                failure = exc
    slots.clear()
    if watch_cell is not None:
        try:
            _lowlevel.release(watch_cell)
        except OSError:
            pass
    try:
        if failure is not None:
            raise failure
    finally:
        del failure
        if leaked and ours:  # last: warnings may be errors (-W error)
            _warnings.warn("unclosed AudioPool", ResourceWarning, stacklevel=2)


def prepare_slot(slot: Slot) -> None:
    """Make a new slot's file what every slot is: every page touched once (now, not on
    the hot path), the slot marker in its last bytes, an empty WAV."""
    slot.byte_view[:] = 0
    slot.byte_view[-len(SLOT_MARKER):] = np.frombuffer(SLOT_MARKER, np.uint8)
    slot.mapping.format_slot(formats.spec_for("PCM_16", 16000, 1), 0)


def check_memory(count: int, length: int) -> None:
    """OSError(ENOMEM) naming the numbers when count memfd slots of length bytes exceed
    this machine's memory: they would be made one by one until the memory ran out."""
    try:
        memory = _os.sysconf("SC_PHYS_PAGES") * PAGE
    except (ValueError, OSError):  # pragma: no cover - not Linux
        return
    if count * length > memory:
        raise OSError(_errno.ENOMEM, f"{_lowlevel.brief(count)} anonymous slots of {length} "
                      f"bytes cannot fit in this machine's memory ({memory} bytes)")


def restore_marker(slot: Slot) -> None:
    """Write the slot marker again when another program wrote over it: a slot rewritten
    in place at its full length is still handed out (its next write is ours), so it must
    stay reclaimable if the pool dies."""
    tail = slot.byte_view[-len(SLOT_MARKER):]
    if tail.tobytes() != SLOT_MARKER:
        tail[:] = np.frombuffer(SLOT_MARKER, np.uint8)


def new_watch(anonymous: bool) -> _lowlevel.FdCell:
    """The fd cell of the inotify fd that watches a named pool's slot files; empty (-1)
    for anonymous slots (no name to lose) and when out of inotify instances (every take
    checks by stat)."""
    cell = _lowlevel.fd_cell()  # until the pool that lets go of it holds it
    if not anonymous:
        try:
            _lowlevel.watch_new(cell=cell)
        except OSError as exc:
            placement.log_once(f"luna_shm: no inotify instance for an AudioPool "
                               f"({exc.strerror}): its slots are checked with a stat on "
                               "every take")
    return cell


def _is_slot_file(name: str, prefix: str) -> bool:
    return (name.startswith(prefix) and name.endswith(".wav")
            and len(name) == len(prefix) + len(POOL_MARK) + 32 + 4
            and name[len(prefix):].startswith(POOL_MARK)
            and all(c in "0123456789abcdef" for c in name[len(prefix) + len(POOL_MARK):-4]))


def _carries_slot_marker(fd: int, st: _os.stat_result) -> bool:
    """True for a file a pool made: page-sized, a RIFF/WAVE header whose size covers
    the whole file, and the slot marker in its last bytes."""
    size = st.st_size
    if size < PAGE or size % PAGE:
        return False
    try:
        head = _os.pread(fd, 12, 0)
        tail = _os.pread(fd, len(SLOT_MARKER), size - len(SLOT_MARKER))
    except OSError:
        return False
    return (head[:4] == b"RIFF" and head[8:12] == b"WAVE"
            and int.from_bytes(head[4:8], "little") == size - 8 and tail == SLOT_MARKER)


_ZERO_CHECK_BYTES = 1 << 20


def _never_marked(fd: int, st: _os.stat_result) -> bool:
    """True for a slot file made before its marker: empty, or page-sized and all zeros
    (a pool killed between its creation and its marker, where O_TMPFILE was missing,
    or a version of luna_shm that named slot files first). It holds nothing."""
    size = st.st_size
    if size == 0:
        return True
    if size % PAGE or size - 8 > formats.MAX_WAV_BYTES:
        return False
    offset = 0
    try:
        while offset < size:
            block = _os.pread(fd, min(_ZERO_CHECK_BYTES, size - offset), offset)
            if not block or block.count(0) != len(block):
                return False
            offset += len(block)
    except OSError:
        return False
    return True


def reclaim_dead_pool_files(prefix: str = AUDIO_PREFIX) -> int:
    """Remove slot files of pools whose process died; return how many.

    Only this user's regular files named ``<prefix>pool_<32 hex>.wav``, which no
    live process holds locked, and which carry the marker every slot file gets
    when it is made, or hold nothing yet (empty, or page-sized zeros: a slot file
    whose pool died before it was marked); checked under the exclusive lock, just
    before the unlink. A user's file that merely starts with the prefix, or holds
    anything, is never touched.

    Raises:
        TypeError, ValueError: prefix is not a str of letters, digits, '_' or '-'.
    """
    check_prefix(prefix)
    removed = 0
    for directory in placement.our_dirs():
        try:
            removed += temp_audio.remove_unused_files(
                directory, f"{prefix}{POOL_MARK}",
                verify=lambda name, fd, st: _is_slot_file(name, prefix)
                and (_carries_slot_marker(fd, st) or _never_marked(fd, st)))
        except OSError as exc:
            # Reclaim is housekeeping: a dir we cannot read keeps its dead slots, and
            # the new pool is made all the same.
            placement.log_once(f"luna_shm: cannot reclaim dead pool slots in {directory}: "
                               f"{exc.strerror}")
    return removed
