"""The one module that talks to the compiled C layer (luna_shm._native).

Everything here turns C results into Python values or exceptions: a negative
result is ``OSError(errno, strerror, filename)``, a WAV format problem is
:class:`WavError`. No cdata leaves this module: callers get ints, memoryviews
and small dataclasses.
"""

from __future__ import annotations

import errno
import functools
import math
import os
import struct
import sys
import weakref
from collections.abc import Mapping as _Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

import numpy as np

from luna_shm._native import ffi, lib
from luna_shm.errors import WavError

HAS_MEMFD: bool = bool(lib.LUNA_HAS_MEMFD)
HAS_O_TMPFILE: bool = bool(lib.LUNA_HAS_O_TMPFILE)
WAVE_FORMAT_PCM: int = lib.LUNA_WAVE_FORMAT_PCM
WAVE_FORMAT_IEEE_FLOAT: int = lib.LUNA_WAVE_FORMAT_IEEE_FLOAT
_EFORMAT: int = lib.LUNA_EFORMAT

# The strerror of the OSError(ESTALE) for a mapping whose file shrank under it.
STALE_MESSAGE = ("truncated or rewritten by another process while mapped here; "
                 "its mapping was replaced with zeros")
# The strerror of the OSError(ESTALE) for a stream cut below the audio appended so far.
CUT_STREAM_MESSAGE = ("cut by another process below the audio written so far; a write "
                      "would leave a hole of zeros in it")
# The strerror of the OSError(ESTALE) for a stream another program rewrote in place.
REWRITTEN_STREAM_MESSAGE = ("rewritten by another process: its header is not this writer's "
                            "any more; nothing was written")


def check(rc: int, filename: str | None = None) -> int:
    """Return rc when it is >= 0; raise ``OSError(-rc, strerror, filename)`` otherwise."""
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc), filename)
    return rc


def named(exc: OSError, filename: str, *, relative: str | None = None) -> OSError:
    """exc, or the same error naming filename when exc names no file (a call on an fd:
    ``os.fstat``, ``os.pread``, flock) or only the name relative, which meant something
    only with the directory fd it was given (``os.stat(name, dir_fd=...)``)."""
    if exc.errno is not None and exc.filename in (None, relative):
        return OSError(exc.errno, exc.strerror, filename)
    return exc


def fstat(fd: int, filename: str) -> os.stat_result:
    """os.fstat(fd); its OSError names filename (os.fstat's names no file)."""
    try:
        return os.fstat(fd)
    except OSError as exc:
        raise named(exc, filename) from None


def _check_wav(rc: int, info: Any, filename: str | None) -> int:
    """Like :func:`check`, but a WAV format failure becomes :class:`WavError`."""
    if rc == -_EFORMAT:
        reason = ffi.string(info.error).decode() if info.error else "malformed WAV"
        where = f"{filename}: " if filename is not None else ""
        raise WavError(f"{where}{reason}")
    return check(rc, filename)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """count and noun for a message, in the right number: "1 channel", "2 channels"
    (nouns, when the plural is not noun + "s": "entries")."""
    return f"{count} {noun}" if count == 1 else f"{count} {nouns or noun + 's'}"


def brief(value: object, limit: int = 80) -> str:
    """How an error message names a value the caller passed: its repr when that is short,
    else its type and size (never 500 KB of someone's bytes, nor an int's 10,000 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"{'a negative' if value < 0 else 'an'} int of {value.bit_length()} bits"
    if isinstance(value, np.ndarray):
        return f"a numpy array of shape {value.shape} and dtype {value.dtype}"
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        text = ""
    if text and len(text) <= limit:
        return text
    kind = type(value).__name__
    try:
        return f"{kind} of length {len(value)}"  # type: ignore[arg-type]
    except TypeError:
        return f"a {kind} object"


# os.fsencode's codec, called directly (no Python frame of its own), on every path of
# every call.
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


def _c_path(path: str) -> bytes:
    """Encode a path for C the way the os module does, refusing NUL bytes."""
    encoded = path.encode(_FS_ENCODING, _FS_ERRORS)
    # An int operand is one memchr; b"\0" in encoded costs 0.2 us more (a substring search).
    if 0 in encoded:
        raise ValueError(f"path contains a NUL byte: {brief(path)}")
    return encoded


def path_argument(path: object, allowed: str = "str or os.PathLike[str]", *,
                  name: str = "path") -> str:
    """path as a str; TypeError naming the argument (name) and what was passed, briefly
    (a read_wav(bytes) of a whole WAV must not put 500 KB into the message); ValueError
    naming it when it holds a NUL byte."""
    try:
        path_str = os.fspath(path)  # type: ignore[call-overload]
    except TypeError:
        path_str = None
    if not isinstance(path_str, str):
        hint = ""
        if isinstance(path, (bytes, bytearray, memoryview)) and len(path) > 256:
            hint = " (WAV bytes in memory are not a path: write them to a file first)"
        raise TypeError(f"{name} must be {allowed}, got {brief(path)}{hint}")
    # Here, not only when the C layer encodes it: a path that goes to os.stat first
    # (AudioCache's disk_dir) got the os module's "embedded null byte", naming nothing.
    if "\0" in path_str:
        raise ValueError(f"{name} contains a NUL byte: {brief(path_str)}")
    return path_str


# ---- files -------------------------------------------------------------------


# An fd cell: a cdata int * that holds one open fd (or -1) and closes it when it is
# collected (see fd_cell).
FdCell: TypeAlias = Any


def fd_cell() -> FdCell:
    """An empty cell for one fd, closed when the cell is collected (C luna_fd_release).

    Given to a C call that opens a file, the cell owns the new fd from the moment it
    exists: a signal that arrives during the call runs its handler as the call returns,
    and one that raises there cannot leak the fd. A child forked while the cell holds
    the fd closes its copy and empties its cell at once, whatever holds the cell (an
    object, a frame of a thread the child does not have): it never keeps our files,
    their flocks or a removed file's RAM. See keep_in_child for the exceptions.
    """
    return ffi.gc(ffi.new("int *", -1), lib.luna_fd_release)


def release(cell: FdCell) -> None:
    """Close the cell's fd, once: the cell is empty afterwards."""
    check(lib.luna_fd_release(cell))


def keep_in_child(cell: FdCell) -> None:
    """Let a child forked from now on keep the fd in cell, and the cell as it is: for an
    fd an object that goes on working in a child uses (a cache's lock file, the
    directory a scan walks), whose number must not be closed and reused under it."""
    lib.luna_fd_keep_in_child(cell)


def open_at(path: str, flags: int, *, cell: FdCell, dir_fd: int | None = None,
            mode: int = 0o600) -> int:
    """os.open(path, flags | O_CLOEXEC, mode, dir_fd=dir_fd) whose fd goes into cell (see
    fd_cell) before the call returns; OSError naming path as os.open's."""
    at = _AT_FDCWD if dir_fd is None else dir_fd
    return check(lib.luna_open_at(at, _c_path(path), flags, mode, cell), path)


_AT_FDCWD = -100  # openat's "relative to the working directory" (Linux)


def dup(fd: int, *, cell: FdCell, filename: str | None = None) -> int:
    """A second fd of fd's open file (sharing its flock), going into cell (see fd_cell);
    OSError naming filename (EMFILE, ...)."""
    return check(lib.luna_dup(fd, cell), filename)


def recv_fd(sock_fd: int, buf: bytearray, cell: FdCell) -> tuple[int, int] | None:
    """One recvmsg into buf with room for one passed fd, which goes into cell (see fd_cell)
    before the call returns: (bytes received, message flags), or None when a non-blocking
    socket has nothing yet. A signal that comes first runs its handlers (PEP 475)."""
    flags = ffi.new("int *")
    with ffi.from_buffer(buf, require_writable=True) as c_buf:
        rc = lib.luna_recv_fd(sock_fd, c_buf, len(buf), cell, flags)
        while rc == -errno.EINTR:  # each call lets the interpreter run pending handlers
            rc = lib.luna_recv_fd(sock_fd, c_buf, len(buf), cell, flags)
    if rc == -errno.EAGAIN:
        return None
    return check(rc), flags[0]


def create_excl(path: str, mode: int = 0o600, *, cell: FdCell = None) -> int:
    """Create path exclusively (never following a link); return the open fd (stored
    into cell too, when given: see fd_cell)."""
    return check(lib.luna_create_excl(_c_path(path), mode, _cell_or_null(cell)), path)


def open_for_write(path: str, mode: int = 0o600, *,
                   cell: FdCell = None) -> tuple[int, bool, int]:
    """Create path, or open the regular file there untouched; return (fd, created, old size)
    (the fd stored into cell too, when given)."""
    created = ffi.new("int *")
    old_size = ffi.new("uint64_t *")
    fd = check(lib.luna_open_for_write(_c_path(path), mode, created, old_size,
                                       _cell_or_null(cell)), path)
    return fd, bool(created[0]), int(old_size[0])


def create_locked(directory: str, path: str, mode: int = 0o600, *,
                  cell: FdCell = None) -> int:
    """Create path in directory with a shared flock held before the name appears; the fd
    (stored into cell too, when given)."""
    return check(lib.luna_create_locked(_c_path(directory), _c_path(path), mode,
                                        _cell_or_null(cell)), path)


def create_unnamed_locked(directory: str, mode: int = 0o600, *, cell: FdCell = None) -> int:
    """A new unnamed (O_TMPFILE) file in directory with a shared flock held; the fd (stored
    into cell too, when given). Name it with :func:`link_unnamed` once it is filled.
    OSError(EOPNOTSUPP) where directory has no O_TMPFILE."""
    return check(lib.luna_create_unnamed_locked(_c_path(directory), mode, _cell_or_null(cell)),
                 directory)


def _cell_or_null(cell: FdCell) -> Any:
    return ffi.NULL if cell is None else cell


def lock(fd: int, *, exclusive: bool, wait: bool = False, filename: str | None = None
         ) -> bool:
    """Take a flock (waiting when wait=True); False when another open file holds it.
    A failure (ENOLCK: the kernel's lock table is full) raises OSError naming filename.

    A signal interrupts a wait as it does Python's own blocking calls (PEP 475): its
    handler runs, and the exception it raises (KeyboardInterrupt, say) ends the wait;
    else the wait goes on."""
    rc = lib.luna_lock(fd, int(exclusive), int(wait))
    while rc == -errno.EINTR:  # each call lets the interpreter run pending handlers
        rc = lib.luna_lock(fd, int(exclusive), int(wait))
    if rc == -errno.EWOULDBLOCK:
        return False
    check(rc, filename)
    return True


def pin_shared(path: str, cell: FdCell) -> tuple[bool, int, int, int, int] | None:
    """Open path read-only into cell and try its shared flock without waiting, in one C
    call (a cache hit's pin): (locked, st_nlink, st_mode, st_size, st_mtime_ns) of the
    file after the attempt, the fd in cell whether locked or not (a caller that finds
    it busy waits for the lock itself). None, the cell empty, when path is gone, a
    symlink or not a regular file (O_NOFOLLOW, O_NONBLOCK: a FIFO never blocks it);
    any other failure raises OSError naming path."""
    out = ffi.new("struct luna_pinned *")
    rc = lib.luna_pin_shared(_c_path(path), cell, out)
    if rc < 0:
        if rc in _NOT_PINNED:
            return None
        check(rc, path)
    return bool(out.locked), out.nlink, out.mode, out.size, out.mtime_ns


_NOT_PINNED = (-errno.ENOENT, -errno.ELOOP, -_EFORMAT)


def close(fd: int) -> None:
    """Close fd."""
    check(lib.luna_close(fd))


# ---- filesystems ---------------------------------------------------------------


@dataclass(frozen=True)
class FsInfo:
    """What luna_fs_probe found out about a path (see csrc/fsinfo.c)."""

    fs_type: int
    dev: tuple[int, int]
    bytes_free: int
    bytes_total: int
    files_free: int  # new files (inodes) this user may still make there
    files_total: int  # 0: no limit on files (ramfs, a tmpfs with nr_inodes=0)
    mode: int
    uid: int
    is_symlink: bool
    is_dir: bool
    is_ram_fs: bool
    is_mount_point: bool
    writable: bool
    write_errno: int

    @property
    def size_limited(self) -> bool:
        """False for a filesystem with no size limit (see room_left)."""
        return room_left(self.bytes_total, self.bytes_free) != NO_SIZE_LIMIT

    @property
    def has_file_left(self) -> bool:
        """True when one more file can be made there: an inode is free, or the
        filesystem has no limit on them. A tmpfs mounted with nr_inodes can run out of
        inodes with bytes to spare, and then refuses every new file (ENOSPC)."""
        return self.files_total == 0 or self.files_free > 0

    def has_room(self, length: int) -> bool:
        """True when path is a directory where a new file of length bytes fits: in the
        free space (or on a filesystem with no limit), with an inode left for it."""
        return (self.is_dir and self.has_file_left
                and room_left(self.bytes_total, self.bytes_free) >= length)


# What room_left counts on a filesystem with no size limit: more than anything can need.
NO_SIZE_LIMIT = sys.maxsize


def room_left(bytes_total: int, bytes_free: int) -> int:
    """The bytes a file may still grow by on a filesystem of bytes_total bytes with
    bytes_free free for this user; NO_SIZE_LIMIT when bytes_total is 0: ramfs and a tmpfs
    mounted with size=0 report 0 blocks and 0 free in statvfs, which says nothing of room.
    The one place that rule lives (placement, the prefault reserve, the cache's eviction,
    ``luna-shm status``)."""
    return bytes_free if bytes_total != 0 else NO_SIZE_LIMIT


def room_on(fd_or_path: int | str) -> int:
    """room_left of the filesystem an open fd or a path is on, from (f)statvfs: one system
    call, for a caller that needs no more than the room (a render between chunks)."""
    fs = os.statvfs(fd_or_path)
    return room_left(fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize)


def fs_probe(path: str) -> FsInfo:
    """lstat/statfs/statvfs/access of a directory in one C call."""
    out = ffi.new("struct luna_fs_info *")
    check(lib.luna_fs_probe(_c_path(path), out), path)
    return FsInfo(
        fs_type=out.fs_type,
        dev=(out.dev_major, out.dev_minor),
        bytes_free=out.bytes_free,
        bytes_total=out.bytes_total,
        files_free=out.files_free,
        files_total=out.files_total,
        mode=out.mode,
        uid=out.uid,
        is_symlink=bool(out.is_symlink),
        is_dir=bool(out.is_dir),
        is_ram_fs=bool(out.is_ram_fs),
        is_mount_point=bool(out.is_mount_point),
        writable=bool(out.writable),
        write_errno=out.write_errno,
    )


# ---- space and mappings ----------------------------------------------------------


def reserve(fd: int, length: int, filename: str | None = None) -> None:
    """posix_fallocate [0, length): ENOSPC now rather than SIGBUS later."""
    check(lib.luna_reserve(fd, 0, length), filename)


# The owners (struct luna_mapping) of the private mappings (Mapping(private=True), until
# shared) that a forked child breaks at once. The owner, not the Mapping: an owner lives
# until its release has unmapped it, which a thread may be doing at the fork (the
# Mapping is gone by then, the unmap waits for the fork: see luna_cells_lock).
_private_owners: weakref.WeakSet[Any] = weakref.WeakSet()


def _break_private_mappings_in_child() -> None:
    for owner in list(_private_owners):
        lib.luna_mapping_let_go(owner)  # anonymous zeros over its pages, if mapped
    _private_owners.clear()


os.register_at_fork(after_in_child=_break_private_mappings_in_child)


def _mapping_owner() -> Any:
    """An empty struct luna_mapping that unmaps what a C call maps into it when it is
    collected: made before the call, it owns the mapping from the moment it exists (a
    signal handler that raises right after the call returns cannot leak it)."""
    return ffi.gc(ffi.new("struct luna_mapping *"), lib.luna_mapping_release)


class Mapping:
    """A shared mapping of a file, unmapped when the last view of it dies.

    ``view`` is a memoryview over the whole mapping (read-only unless mapped
    writable). numpy arrays made from it keep it, and so the mapping, alive:
    no Python code can reach unmapped memory, whatever order things are
    closed or collected in.

    Every mapping is registered with the C layer's SIGBUS guard (csrc/guard.c):
    when another process shrinks the file and this process touches a page that
    is gone, the whole mapping is replaced with zero pages instead of the
    process dying, and :attr:`broken` turns True. The views then read zeros and
    writes through them reach no file; :meth:`check` raises.
    """

    __slots__ = ("_address", "_guard", "_owner", "_private", "filename", "length", "view")

    def __init__(self, fd: int, length: int, *, writable: bool, populate: bool,
                 filename: str | None = None, private: bool = False) -> None:
        owner = self._owner = _mapping_owner()
        self._private = private
        if private:
            # Registered before it exists: a fork from here on finds it (see share).
            _private_owners.add(owner)
        guard = check(lib.luna_map(fd, length, int(writable), int(populate), owner), filename)
        self._adopt(owner, guard, length, writable, filename)

    def share(self) -> None:
        """From now on a forked child keeps this mapping as it is (its views may be in the
        caller's hands). Until then, a private mapping (``private=True``) becomes zeros in
        a forked child right at the fork: its pages no longer hold the file, nor so its
        flock, whichever frames of the parent's threads still refer to it (the child has
        none of those threads, and such a frame would keep it for as long as the child
        lives). Only the first call does anything."""
        if self._private:
            self._private = False
            _private_owners.discard(self._owner)

    @classmethod
    def of_wav(cls, path: str) -> tuple[Mapping, WavInfo]:
        """Open, parse and map a WAV read-only in one C call; the fd is already closed."""
        out = ffi.new("struct luna_wav_info *")
        owner = _mapping_owner()
        return cls._wav_mapped(lib.luna_wav_map(_c_path(path), out, owner), out, owner, path)

    @classmethod
    def of_wav_fd(cls, fd: int, file_size: int, path: str) -> tuple[Mapping, WavInfo]:
        """Parse and map the WAV in fd (file_size bytes) read-only in one C call; fd stays
        open (a cache hit's pinned descriptor)."""
        out = ffi.new("struct luna_wav_info *")
        owner = _mapping_owner()
        return cls._wav_mapped(lib.luna_wav_map_fd(fd, file_size, out, owner), out, owner,
                               path)

    @classmethod
    def _wav_mapped(cls, rc: int, out: Any, owner: Any, path: str
                    ) -> tuple[Mapping, WavInfo]:
        """The mapping and WavInfo of a C call that parsed a WAV into out and mapped it into
        owner, returning rc (WavError or OSError naming path). Passed its result, not a
        function to call: a closure cost read_wav's view 0.3 us a call."""
        guard = _check_wav(rc, out, path)
        info = _info(out)
        mapping = cls.__new__(cls)
        mapping._private = False
        mapping._adopt(owner, guard, info.data_offset + info.data_bytes, False, path)
        return mapping, info

    def _adopt(self, owner: Any, guard: int, length: int, writable: bool,
               filename: str | None) -> None:
        # The views keep the address alive, and the address keeps its owner: the
        # mapping goes with the last view. Both destructors are C functions (a Python
        # one could be cut short by a signal handler that raises) and the release is
        # done once, by whichever runs first.
        self._address = ffi.gc(owner.addr, functools.partial(lib.luna_mapping_release_view,
                                                             owner))
        self._guard = guard
        self._owner = owner
        self.filename = filename
        self.length = length
        view = memoryview(ffi.buffer(self._address, self.length))
        self.view = view if writable else view.toreadonly()

    def cut(self, length: int) -> None:
        """Keep only the first length bytes in view and guarded, before the file is cut
        to length (the rest stays mapped, out of every view, until the unmap).

        A guarded range that reaches past its file's end looks broken to the SIGBUS
        guard (its last byte cannot be read) and may be broken by a SIGBUS that is not
        ours. No view of the old length may be in use (BufferError otherwise).
        """
        writable = not self.view.readonly
        self.view.release()
        check(lib.luna_mapping_cut(self._owner, length), self.filename)
        self.length = length
        view = memoryview(ffi.buffer(self._address, length))
        self.view = view if writable else view.toreadonly()

    @property
    def broken(self) -> bool:
        """True once the file shrank under this mapping and its pages became zeros."""
        return lib.luna_guard_broken(self._guard) > 0

    def check(self) -> None:
        """Raise ``OSError(ESTALE)`` naming the file if the mapping is broken.

        Raises:
            OSError: errno ESTALE: another process truncated or rewrote the file
                while it was mapped here; the mapping now holds zeros.
        """
        if lib.luna_guard_broken(self._guard) > 0:
            raise OSError(errno.ESTALE, STALE_MESSAGE, self.filename)

    def check_file(self, fd: int, length: int) -> None:
        """check(), and also raise when fd's file (the one mapped here, whole) is no longer
        length bytes long: another process cut or rewrote it, and the pages this process
        touches may all be there still, so no fault told the guard. The mapping is then
        replaced with zeros, as a fault would have it, before the error: nothing more
        written through it reaches the other program's file. One fstat.

        Raises:
            OSError: errno ESTALE, as :meth:`check`.
        """
        if check(lib.luna_mapping_check_size(self._owner, fd, length), self.filename):
            raise OSError(errno.ESTALE, STALE_MESSAGE, self.filename)

    def fill_slot(self, spec: WavSpec, data: np.ndarray) -> int:
        """Copy data (already in the file's encoding) after the header and format the
        mapping as a WAV of it, in one C call; returns the data offset."""
        # The hot path of AudioPool.write_wav: no context manager (CPython releases the
        # buffer as soon as the call returns) and the mapping's own void * as the slot.
        return check(lib.luna_wav_fill_slot(self._address, self.length, _c_spec(spec),
                                            ffi.from_buffer(data), data.nbytes))

    def pool_fill(self, watch_fd: int, spec: WavSpec, data: np.ndarray) -> int:
        """fill_slot, after the checks that hand out a pool slot (luna_pool_fill, under the
        pool's lock): the data offset; 0 when watch_fd had an event (nothing was written:
        check the slot's name); -1 when the mapping is broken (maybe half written)."""
        rc = lib.luna_pool_fill(self._guard, watch_fd, self._address, self.length,
                                _c_spec(spec), ffi.from_buffer(data), data.nbytes)
        if rc >= 0:
            return rc
        return -1 if rc == -errno.ESTALE else check(rc, self.filename)

    def format_slot(self, spec: WavSpec, data_bytes: int) -> int:
        """Make the whole mapping a WAV of data_bytes of audio plus a skipped tail chunk.

        Returns the data offset. The samples themselves are not touched.
        """
        return check(lib.luna_wav_format_slot(ffi.cast("uint8_t *", self._address), self.length,
                                              _c_spec(spec), data_bytes))


def memfd(name: str, *, cell: FdCell = None) -> int:
    """An anonymous, sealable memory file; ENOSYS where the platform has none. The fd
    is stored into cell too, when given."""
    return check(lib.luna_memfd(_c_path(name), _cell_or_null(cell)))


def seal_shrink(fd: int, filename: str | None = None) -> None:
    """Forbid every process to shrink this memfd (F_SEAL_SHRINK); a failure raises
    OSError naming filename (its ``/proc/<pid>/fd/<n>`` path)."""
    check(lib.luna_seal_shrink(fd), filename)


def prepare_file(directory: str | None, memfd_name: str, length: int, *,
                 cell: FdCell) -> int:
    """A new unnamed file of length bytes, every page allocated and written once (see
    csrc/prefault.c): O_TMPFILE in directory (mode 0600, shared flock held), or a memfd
    called memfd_name when directory is None. The fd goes into cell (see fd_cell)
    before the call returns."""
    c_dir = ffi.NULL if directory is None else _c_path(directory)
    return check(lib.luna_prepare_file(c_dir, _c_path(memfd_name), length, cell), directory)


def link_unnamed(fd: int, path: str) -> None:
    """Give the unnamed (O_TMPFILE) file open at fd the name path; FileExistsError if taken."""
    check(lib.luna_link_unnamed(fd, _c_path(path)), path)


def set_length(fd: int, length: int, filename: str | None = None) -> None:
    """ftruncate fd to length bytes."""
    check(lib.luna_set_length(fd, length), filename)


# ---- WAV ----------------------------------------------------------------------


class WavInfo(NamedTuple):
    """A parsed WAV header: where the samples are and what they are."""

    samplerate: int
    channels: int
    format: int
    bits: int
    block_align: int
    extensible: int  # 1 for a WAVE_FORMAT_EXTENSIBLE fmt chunk, else 0
    data_offset: int
    data_bytes: int
    frames: int
    file_size: int
    stream_state: int = 0  # STREAM_*: the state chunk a WavWriter keeps (live streams)


# The struct module's code for each C integer type a record read in one unpack holds.
_STRUCT_CODES = {"uint16_t": "H", "uint32_t": "I", "int32_t": "i", "uint64_t": "Q"}


def _struct_layout(c_type: str, names: tuple[str, ...]) -> struct.Struct:
    """A struct.Struct that unpacks the fields names of the C struct c_type, in that
    order, in one call: their types and offsets as cffi has them (the compiler's), padding
    and other fields skipped. A field of a type not in _STRUCT_CODES is a KeyError here,
    at import, never a misread."""
    fields = dict(ffi.typeof(c_type).fields)
    layout, end = "=", 0
    for name in names:
        field = fields[name]
        code = _STRUCT_CODES[field.type.cname]
        if field.offset < end:
            raise RuntimeError(f"{c_type}: {names} are not in the order of its fields")
        layout += f"{field.offset - end}x{code}" if field.offset > end else code
        end = field.offset + struct.calcsize("=" + code)
    return struct.Struct(layout)


# Eleven cffi attribute reads cost ~1.4 us on these machines, one unpack of the struct's
# bytes ~0.3 us: read_wav's mapped view makes a WavInfo per call.
_INFO_LAYOUT = _struct_layout("struct luna_wav_info", WavInfo._fields)
_new_tuple = tuple.__new__


def _info(out: Any) -> WavInfo:
    """The WavInfo of a filled struct luna_wav_info."""
    return _new_tuple(WavInfo, _INFO_LAYOUT.unpack_from(ffi.buffer(out)))


class WavSpec(NamedTuple):
    """What a WAV file we write holds: rate, channels, encoding and sample width."""

    samplerate: int
    channels: int
    format: int
    bits: int


@functools.lru_cache(maxsize=256)
def _c_spec(spec: WavSpec) -> Any:
    """The C struct for spec, made once per distinct spec."""
    c_spec = ffi.new("struct luna_wav_spec *")
    c_spec.samplerate = spec.samplerate
    c_spec.channels = spec.channels
    c_spec.format = spec.format
    c_spec.bits = spec.bits
    return c_spec


def wav_header(spec: WavSpec, data_bytes: int, tail_bytes: int = 0) -> bytes:
    """The header bytes for data_bytes of audio (and a skippable tail)."""
    out = ffi.new("uint8_t[]", lib.LUNA_WAV_MAX_HEADER)
    n = check(lib.luna_wav_header(out, _c_spec(spec), data_bytes, tail_bytes))
    return bytes(ffi.buffer(out, n))


@functools.lru_cache(maxsize=256)
def wav_header_size(spec: WavSpec) -> int:
    """Where the samples start in a file we write with this spec."""
    return len(wav_header(spec, 0))


def parse_wav_bytes(data: bytes | bytearray | memoryview) -> WavInfo:
    """Parse a WAV held in memory; raises WavError for malformed bytes."""
    out = ffi.new("struct luna_wav_info *")
    with ffi.from_buffer(data) as buf:
        _check_wav(lib.luna_wav_parse_buffer(buf, len(buf), out), out, None)
    return _info(out)


def wav_open(path: str) -> tuple[int, WavInfo]:
    """Open and parse a WAV file; return (fd, info). The caller closes fd (for tests and
    benchmarks: the library's reads keep their fds in cells, see fd_cell)."""
    out = ffi.new("struct luna_wav_info *")
    fd = _check_wav(lib.luna_wav_open(_c_path(path), out, ffi.NULL), out, path)
    return fd, _info(out)


def wav_parse_fd(fd: int, file_size: int, filename: str | None = None) -> WavInfo:
    """Parse the WAV in an open fd of file_size bytes (pread of the headers only)."""
    out = ffi.new("struct luna_wav_info *")
    _check_wav(lib.luna_wav_parse_fd(fd, file_size, out), out, filename)
    return _info(out)


_WRITE_REPLACE: int = lib.LUNA_WRITE_REPLACE


def write_wav_path(path: str, spec: WavSpec, data: np.ndarray) -> bool:
    """Write a WAV to a new or empty file at path; True when written, False (nothing
    written) when path holds a file with content, which write_wav_atomic must replace.

    No directory is passed: only a replacement needs one, and the caller makes it then.
    """
    with ffi.from_buffer(data) as buf:
        rc = lib.luna_write_wav_path(ffi.NULL, _c_path(path), ffi.NULL, _c_spec(spec), buf,
                                     len(buf))
    return check(rc, path) != _WRITE_REPLACE


def write_wav_fd(fd: int, spec: WavSpec, data: np.ndarray, filename: str | None = None) -> None:
    """Write header + samples at fd's position with one writev."""
    with ffi.from_buffer(data) as buf:
        check(lib.luna_write_wav_fd(fd, _c_spec(spec), buf, len(buf)), filename)


def write_wav_atomic(directory: str, path: str, tmp_path: str, spec: WavSpec,
                     data: np.ndarray) -> None:
    """Write a WAV that appears under path whole, at once (see wav_io.c)."""
    with ffi.from_buffer(data) as buf:
        rc = lib.luna_write_wav_atomic(_c_path(directory), _c_path(path), _c_path(tmp_path),
                                       _c_spec(spec), buf, len(buf))
    check(rc, path)


def _check_read(rc: int, filename: str | None) -> None:
    """check() for reads of samples: a file that ended before its header said is a WavError."""
    if rc == -errno.ENODATA:
        raise WavError(f"{filename}: file shrank while it was being read")
    check(rc, filename)


def read_into(fd: int, offset: int, dest: np.ndarray, filename: str | None = None) -> None:
    """pread exactly dest.nbytes bytes at offset into dest's memory."""
    with ffi.from_buffer(dest, require_writable=True) as buf:
        _check_read(lib.luna_read_at(fd, offset, buf, len(buf)), filename)


# A struct luna_wav_file made and freed by C: made with no fd (every other field the C
# fills before it reads it: 4 KiB it need not clear), freed closing the fd it holds.
_new_wav_file = ffi.new_allocator(lib.luna_wav_file_new, lib.luna_wav_file_free,
                                  should_clear_after_alloc=False)

# Structs whose read is done (no fd: reused as they are). Making one through C costs
# 0.3 us, a sixth of what a small read costs beyond its system calls; a pop and an append
# are atomic, so threads and a signal handler that reads too each get their own. One that
# a failure (or a handler) dropped is freed, closing any fd it holds, and never comes
# back; one is kept only once nothing more is read from it.
_spare_wav_files: list[Any] = []
_MAX_SPARE_WAV_FILES = 8


def _done_with(held: Any) -> None:
    """Keep a struct whose fd is closed for the next read."""
    if held.fd < 0 and len(_spare_wav_files) < _MAX_SPARE_WAV_FILES:
        _spare_wav_files.append(held)


def read_wav_owned(path: str, dtypes: _Mapping[tuple[int, int], np.dtype[Any]]
                   ) -> tuple[np.ndarray, int, int]:
    """Read a WAV's samples into a new array: (flat samples, channels, samplerate).

    dtypes maps (format tag, bits) to the array type (formats.FILE_DTYPES).
    Two C calls (open + parse, then read + close) and one allocation: the hot
    path of read_wav(mmap=False), kept free of intermediate Python objects and
    frames. A file of up to 4 KiB is read whole by the first call (its samples
    come with the header): the floor's one read, not two.
    """
    # The struct owns the fd from the open to the close, whatever happens between.
    try:
        held = _spare_wav_files.pop()
    except IndexError:
        held = _new_wav_file("struct luna_wav_file *")
    rc = lib.luna_wav_open_held(_c_path(path), held)
    out = held.info
    if rc < 0:  # raises (reading the struct's error text: it is not kept for reuse)
        _check_wav(rc, out, path)
    if out.bits == 24:  # unpacked to int32 while it is read, in cache-sized chunks
        result = _read_decoded(ffi.addressof(held, "fd"), out, path, np.dtype("<i4"), None)
        _done_with(held)
        return result
    dest = np.empty(out.frames * out.channels, dtypes[out.format, out.bits])
    # from_buffer(dest, require_writable=True), positionally: cffi parses keywords slowly
    # (0.2 us, a tenth of what this call may cost beyond its system calls).
    with ffi.from_buffer("char[]", dest, True) as buf:
        rc = lib.luna_wav_read_held(held, buf, len(buf))
    channels, samplerate = out.channels, out.samplerate
    _done_with(held)
    if rc < 0:
        _check_read(rc, path)
    return dest, channels, samplerate


# The numpy dtypes convert-on-read makes (luna_decode's target types).
DECODE_TYPES: dict[np.dtype[Any], int] = {
    np.dtype("<i2"): lib.LUNA_DECODE_INT16,
    np.dtype("<i4"): lib.LUNA_DECODE_INT32,
    np.dtype("<f4"): lib.LUNA_DECODE_FLOAT32,
    np.dtype("<f8"): lib.LUNA_DECODE_FLOAT64,
}


def read_wav_decoded(path: str, dtype: np.dtype[Any], out: np.ndarray | None
                     ) -> tuple[np.ndarray, int, int]:
    """Read a WAV's samples converted to dtype (a DECODE_TYPES key) in one C pass, into
    a new array or into out's first samples: (flat samples, channels, samplerate). dtype
    uint8 reads an 8-bit file's samples as they are.

    Raises:
        ValueError: out is too small for the file, or the file's samples are not
            converted to dtype (float to int, anything but 8-bit to uint8), checked
            before a sample is read.
        WavError, OSError: as read_wav.
    """
    info = ffi.new("struct luna_wav_info *")
    cell = fd_cell()
    _check_wav(lib.luna_wav_open(_c_path(path), info, cell), info, path)
    return _read_decoded(cell, info, path, dtype, out)


def _read_decoded(cell: FdCell, info: Any, path: str, dtype: np.dtype[Any],
                  out: np.ndarray | None) -> tuple[np.ndarray, int, int]:
    """read_wav_decoded's read, from the fd in cell (parsed into info, released here
    whatever happens)."""
    fd = cell[0]
    try:
        if dtype == _UINT8 and info.bits != 8:  # uint8: 8-bit files only, as they are
            raise ValueError(_not_read_as(path, info, dtype))
        count = info.frames * info.channels
        if out is None:
            dest = np.empty(count, dtype)
        elif out.size < count or (out.ndim == 2 and out.shape[1] != info.channels) or (
                out.ndim == 1 and info.channels != 1):
            raise ValueError(
                f"out has shape {out.shape}, but {path} has {info.frames} frames of "
                f"{plural(info.channels, 'channel')}: pass out of "
                "shape (frames,) for mono or (frames, channels), with at least as many frames")
        else:
            dest = out.reshape(-1)[:count]
        if dtype == _UINT8:
            read_into(fd, info.data_offset, dest, path)
        else:
            read_decoded_into(fd, info, dest, path)
    finally:
        lib.luna_fd_release(cell)
    return dest, info.channels, info.samplerate


def read_decoded_into(fd: int, info: Any, dest: np.ndarray, filename: str | None) -> None:
    """Read the samples that info (a WavInfo, or the C struct) describes from fd into dest
    (a flat array of a DECODE_TYPES dtype, one element a sample), converted as they are
    read, in cache-sized chunks: never a copy of the file's bytes beside dest.

    Raises:
        ValueError: info's samples are not converted to dest's dtype (float to int).
        WavError: the file ended before its samples did; OSError: the read failed.
    """
    with ffi.from_buffer(dest, require_writable=True) as buf:
        rc = lib.luna_read_decode(fd, info.data_offset, info.format, info.bits, buf,
                                  DECODE_TYPES[dest.dtype], dest.size)
    if rc == -errno.EINVAL:
        raise ValueError(_not_read_as(filename, info, dest.dtype))
    _check_read(rc, filename)


_UINT8 = np.dtype("u1")


def _not_read_as(path: str | None, info: Any, dtype: np.dtype[Any]) -> str:
    """Why a file's samples are not read as dtype, and what they are read as."""
    if info.format == WAVE_FORMAT_IEEE_FLOAT:
        return (f"{path}: {info.bits}-bit float samples are not read as {dtype} (float "
                "samples are read as float32 or float64 only)")
    return (f"{path}: {info.bits}-bit PCM samples are not read as {dtype} (uint8 reads 8-bit "
            "files only): use int16, int32, float32 or float64")


def write_at(fd: int, offset: int, data: bytes | np.ndarray, filename: str | None = None) -> None:
    """pwrite all of data at offset."""
    with ffi.from_buffer(data) as buf:
        check(lib.luna_write_at(fd, offset, buf, len(buf)), filename)


class Stream:
    """The C-side state of a streaming WAV: fd, spec, mapped header page, data size.

    Made once per writer, so that appending a chunk is one C call and one
    system call, with nothing to convert on the way.
    """

    __slots__ = ("_data_offset", "_fd", "_header", "_header_guard", "_header_map", "_size",
                 "_spec")

    def __init__(self, fd: int, spec: WavSpec, header: Mapping, data_offset: int) -> None:
        self._fd = fd
        self._spec = _c_spec(spec)
        self._header = header  # keeps the mapping alive as long as the stream
        self._header_map = ffi.cast("uint8_t *", header._address)
        self._header_guard = header._guard
        self._data_offset = data_offset
        self._size = ffi.new("uint64_t *", 0)

    @property
    def data_bytes(self) -> int:
        """Bytes of audio in the file so far."""
        return int(self._size[0])

    def append(self, chunk: np.ndarray, filename: str | None = None) -> None:
        """Append chunk's bytes after the data and fix the header's sizes.

        Raises:
            OSError: the write failed (the file keeps the chunks before), or ESTALE:
                another process truncated the file, so the mapped header page is
                zeros now and the header would no longer reach the file, or the file
                ends before the chunks appended so far, or another process rewrote
                it in place (its header page holds another header) (nothing was
                written).
        """
        # No buffer context manager on this per-chunk path: CPython releases the buffer
        # as soon as the call returns. The C checks the header mapping's guard after
        # its store (-ESTALE): no second call for it.
        rc = lib.luna_stream_append(self._fd, self._header_map, self._header_guard, self._spec,
                                    self._data_offset, self._size, ffi.from_buffer(chunk),
                                    chunk.nbytes)
        if rc < 0:
            if rc == -errno.ESTALE:
                if self._header.broken:
                    message = STALE_MESSAGE
                elif os.fstat(self._fd).st_size < self._data_offset + self.data_bytes:
                    message = CUT_STREAM_MESSAGE
                else:  # the header page holds another program's header
                    message = REWRITTEN_STREAM_MESSAGE
                raise OSError(errno.ESTALE, message, self._header.filename)
            raise OSError(-rc, os.strerror(-rc), filename)

    def set_state(self, state: int) -> None:
        """Record the stream's state (STREAM_DONE, STREAM_FAIL) in its header's state chunk
        (nothing when the header no longer holds one)."""
        # -EINVAL (our arguments are valid): the header page holds no state chunk any
        # more. Another process cut it (zeros here now; the writes said ESTALE) or
        # rewrote the file in place (its followers say so): no stream of ours to mark.
        lib.luna_live_set_state(self._header_map, self._data_offset, state)
        # The store makes no inotify event, and the close that follows makes its
        # IN_CLOSE_WRITE only when it is the file's last one (another process may hold
        # the fd: handed over, or a child forked in between): a timestamp update through
        # the fd is an IN_ATTRIB that wakes every follower to read the new state. Only a
        # courtesy: a file we may no longer touch keeps the close event.
        try:
            os.utime(self._fd)
        except OSError:
            pass


def pack_s24_into(src: np.ndarray, dest: np.ndarray) -> None:
    """Top 24 bits of each int32 sample of src, packed little-endian into dest's bytes."""
    if dest.nbytes != src.size * 3:
        raise ValueError(f"destination holds {dest.nbytes} bytes, need {src.size * 3}")
    with ffi.from_buffer(src) as s, ffi.from_buffer(dest, require_writable=True) as d:
        check(lib.luna_pack_s24(s, ffi.cast("uint8_t *", d), src.size))


def unpack_s24(src: np.ndarray | memoryview, count: int) -> np.ndarray:
    """count packed 24-bit samples as int32 with the sample in the top 24 bits."""
    dst = np.empty(count, dtype=np.int32)
    with ffi.from_buffer(src) as s, ffi.from_buffer(dst, require_writable=True) as d:
        check(lib.luna_unpack_s24(ffi.cast("const uint8_t *", s), d, count))
    return dst


def float_to_pcm_into(src: np.ndarray, dest: np.ndarray, bits: int) -> None:
    """Convert float32/float64 samples into dest's memory as PCM of bits (see convert.c).

    dest must hold src.size samples of that PCM type (24-bit: 3 bytes each).
    """
    if dest.nbytes != src.size * (bits // 8):
        raise ValueError(f"destination holds {dest.nbytes} bytes, need {src.size * (bits // 8)}")
    with ffi.from_buffer(src) as s, ffi.from_buffer(dest, require_writable=True) as d:
        check(lib.luna_float_to_pcm(s, int(src.dtype.itemsize == 8), d, bits, src.size))


# ---- live streams (live.c) ---------------------------------------------------------

STREAM_NONE: int = lib.LUNA_STREAM_NONE
STREAM_LIVE: int = lib.LUNA_STREAM_LIVE
STREAM_DONE: int = lib.LUNA_STREAM_DONE
STREAM_FAIL: int = lib.LUNA_STREAM_FAIL
WATCH_CHANGED: int = lib.LUNA_WATCH_CHANGED
WATCH_CLOSED: int = lib.LUNA_WATCH_CLOSED


def live_header(spec: WavSpec, data_bytes: int, state: int = STREAM_LIVE) -> bytes:
    """The header of a live stream: a plain header plus the state chunk before "data"."""
    out = ffi.new("uint8_t[]", lib.LUNA_WAV_MAX_HEADER)
    n = check(lib.luna_live_header(out, _c_spec(spec), data_bytes, state))
    return bytes(ffi.buffer(out, n))


def watch_open(path: str, *, directory: bool, cell: FdCell,
               filename: str | None = None) -> int:
    """An inotify fd watching a file (writes, closes, removal) or a directory (new names);
    it goes into cell (see fd_cell) before the call returns."""
    return check(lib.luna_watch_open(_c_path(path), int(directory), cell), filename or path)


def watch_new(*, cell: FdCell) -> int:
    """An inotify fd with no watch yet (see watch_add); it goes into cell (see fd_cell)."""
    return check(lib.luna_watch_new(cell))


def watch_add(watch_fd: int, path: str, filename: str | None = None) -> None:
    """Watch path's file (followed) on watch_fd for anyone's writes, truncation, link-count
    changes, removal and renames; mapped writes and reads make no event."""
    check(lib.luna_watch_add(watch_fd, _c_path(path)), filename or path)


def watch_quiet(watch_fd: int) -> bool:
    """Drain watch_fd without waiting: True when it had no event queued (an error counts
    as an event: the caller then checks for itself). One FIONREAD when nothing is queued."""
    return lib.luna_watch_wait(watch_fd, 0) == 0


def watch_wait(fd: int, timeout: float | None) -> int:
    """Wait for events on a watch_open fd (None: forever, 0: just drain); the WATCH_* bits."""
    return check(lib.luna_watch_wait(fd, _poll_ms(timeout)))


def _poll_ms(timeout: float | None) -> int:
    """timeout as poll's milliseconds: -1 for None (forever); any number of seconds,
    infinity too, capped at poll's longest wait (2**31 - 1 ms, about 24.8 days: a caller
    that counts its own deadline just waits again)."""
    if timeout is None:
        return -1
    return math.ceil(min(max(timeout, 0.0), (2**31 - 1) / 1000) * 1000)


def watch_read(watch_fd: int, timeout: float | None, fd: int, data_offset: int, offset: int,
               block: int, dest: np.ndarray) -> tuple[int, int, int, int]:
    """watch_wait, then (when the only event was a write) pread the whole blocks past offset
    that the header's data size counts into dest's memory, all in C; returns (WATCH_* bits,
    bytes read into dest, file size, the header's data size or 0 when it was not read)."""
    ms = _poll_ms(timeout)
    out = ffi.new("uint64_t[3]")
    with ffi.from_buffer(dest, require_writable=True) as buf:
        bits = lib.luna_watch_read(watch_fd, ms, fd, data_offset, offset, block, buf, len(buf),
                                   out, out + 1, out + 2)
    return check(bits), int(out[2]), int(out[0]), int(out[1])


def open_regular(path: str, *, cell: FdCell) -> int:
    """Open a regular file read-only (never blocking on a FIFO), its fd going into cell
    (see fd_cell); WavError for anything else."""
    size = ffi.new("uint64_t *")
    rc = lib.luna_open_regular(_c_path(path), size, cell)
    if rc == -_EFORMAT:
        raise WavError(f"{path}: not a regular file")
    return check(rc, path)


def writers_gone(fd: int) -> bool | None:
    """True when no process has the file open for writing, False when one has, None when
    the kernel will not tell us (no lease: not our file and no CAP_LEASE, or no lease support)."""
    rc = lib.luna_writers_gone(fd)
    if rc in (-errno.EACCES, -errno.EPERM, -errno.EINVAL, -errno.ENOLCK):
        return None
    return bool(check(rc))
