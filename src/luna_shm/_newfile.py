"""Where a new file goes, how it is made and locked, and the one RAM-disk-to-disk retry.

Every producer of a new temp file (``write_wav(None, ...)``, ``create_wav_buffer()``,
``WavWriter(None, ...)``, ``AudioPool`` slots, ``save_temp_audio``,
``get_temp_audio_path(create=True)``) makes it here: a fresh uuid4 name in the
directory placement chose (the fallback dir when a size hint says the RAM disk
lacks room), created exclusively with mode 0600, optionally under a shared
flock held from before the name appears, or made unnamed and named only once
filled (:func:`create_unnamed_temp_file`, :func:`publish`: a process killed
meanwhile leaves nothing). :func:`with_disk_fallback` is the one
policy for a RAM disk that refuses the file (full, read-only, ...): make it
again in the fallback dir, logged once. Space or fds that the prefault reserve
holds are given back first, before a size hint or a failure sends a file to disk.
"""

from __future__ import annotations

import errno as _errno
import fcntl as _fcntl
import os as _os
import re as _re
import stat as _stat
import uuid as _uuid
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from luna_shm import _lowlevel, _prefault, formats, placement
from luna_shm.placement import AUDIO_PREFIX

_T = TypeVar("_T")

# As tempfile.TMP_MAX: how many names to try before giving up on EEXIST.
_MAX_TRIES = 10000

# Errors after which a file that the RAM disk refused is made again in the fallback
# dir (read-only, full, over quota, permission changed, gone). EFBIG is not one: a
# file size limit (RLIMIT_FSIZE) applies on every filesystem alike.
FALLBACK_ERRNOS = frozenset(
    {_errno.EROFS, _errno.ENOSPC, _errno.EDQUOT, _errno.EACCES, _errno.EPERM, _errno.ENOENT}
)

_PARTIAL_MARK = ".partial_"
_PARTIAL_NAME = _re.compile(_re.escape(f".{AUDIO_PREFIX}{_PARTIAL_MARK}") + "[0-9a-f]{32}")


def _new_token() -> str:
    """A fresh random name part: uuid4 hex (32 characters)."""
    return _uuid.uuid4().hex


# A name is <prefix><32 hex><suffix>, at most NAME_MAX (255) bytes on Linux filesystems.
_MAX_NAME_PART = 100


def check_name_part(what: str, value: object) -> str:
    """value when it is a str usable inside one file name; TypeError/ValueError naming it."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {_lowlevel.brief(value)}")
    if "/" in value or "\0" in value or value in (".", ".."):
        raise ValueError(f"{what} must not contain '/' or NUL or be '.' or '..', got "
                         f"{_lowlevel.brief(value)}")
    if value.isascii():  # the common case: one byte a character, nothing to encode
        size = len(value)
    else:
        try:
            size = len(_os.fsencode(value))
        except UnicodeEncodeError as exc:  # a lone surrogate: no file can have the name
            raise ValueError(f"{what} cannot be encoded as a file name ({exc.reason}), got "
                             f"{_lowlevel.brief(value)}") from None
    if size > _MAX_NAME_PART:
        raise ValueError(f"{what} is too long for a file name: {size} bytes, at most "
                         f"{_MAX_NAME_PART}")
    return value


def check_size_hint(size_hint: object) -> int | None:
    """size_hint as None or an int >= 0 (numpy integers too: formats.check_int);
    TypeError/ValueError naming it briefly."""
    if size_hint is None:
        return None
    return formats.check_int("size_hint", size_hint)


def _bytes_text(count: int) -> str:
    """A size for a log line: an int too long to print (a size hint of 10**5000 is valid,
    and str() refuses it past 4300 digits) by its length in bits."""
    return f"{count} bytes" if count.bit_length() <= 128 else (
        f"a {count.bit_length()}-bit number of bytes")


def directory_for(size_hint: int | None, on_disk: bool) -> str:
    """The directory for one new file: placement's choice, unless the RAM disk lacks
    room for size_hint bytes (placement, not retry), or on_disk asks for the fallback."""
    chosen = placement.current()
    if on_disk:
        return chosen.fallback_dir
    if chosen.directory != chosen.ram_dir or not size_hint:
        return chosen.directory
    try:
        info = _lowlevel.fs_probe(chosen.ram_dir)
        if not info.is_dir:
            raise NotADirectoryError(_errno.ENOTDIR, _os.strerror(_errno.ENOTDIR))
    except OSError as exc:  # removed or replaced since the placement was chosen
        placement.log_once(
            f"luna_shm: {chosen.ram_dir} cannot be examined ({exc.strerror}): using "
            f"{chosen.fallback_dir} for a file of {_bytes_text(size_hint)}",
            key=f"cannot examine {chosen.ram_dir} ({exc.strerror})",
        )
        return chosen.fallback_dir
    # ramfs has no limit: its statvfs says 0 free, which is no reason to leave it.
    if info.has_room(size_hint) or _prefault.make_room(chosen.ram_dir, size_hint):
        return chosen.directory
    free = f"{info.bytes_free} bytes free" if info.has_file_left else (
        f"no inode free of {info.files_total}")
    # Once, for the first such file: a full RAM disk sends every later one too.
    placement.log_once(
        f"luna_shm: a file of {_bytes_text(size_hint)} does not fit in {chosen.ram_dir} "
        f"({free}): using {chosen.fallback_dir} for it",
        key=f"a file does not fit in {chosen.ram_dir}",
    )
    return chosen.fallback_dir


def check_room(count: int, length: int, what: str) -> None:
    """OSError(ENOSPC) naming the numbers when count new files of length bytes cannot
    fit in the free space of the RAM disk and the fallback dir together (counted once
    when they share a filesystem): a caller that makes them one by one (a pool's slots)
    would otherwise fill both before it gave up. A dir that cannot be examined counts
    as empty; a filesystem with no size limit (ramfs) takes anything.

    Raises:
        OSError: ENOSPC, the RAM dir (or the fallback dir in use) as its filename.
    """
    total = count * length
    room = _free_space()
    if room is None or total <= sum(free for _, free in room):
        return
    chosen = placement.current()
    if chosen.directory == chosen.ram_dir and _prefault.make_room(chosen.ram_dir, total):
        return  # the reserve gave its files back, and the RAM disk alone has the room now
    room = _free_space()
    if room is None or total <= sum(free for _, free in room):
        return
    free_text = " and ".join(f"{directory} has {free} bytes free" for directory, free in room)
    raise OSError(_errno.ENOSPC, f"{_lowlevel.brief(count)} {what} of {length} bytes "
                  f"({_bytes_text(total)}) cannot fit: {free_text or 'no dir is usable'}",
                  chosen.directory)


def _free_space() -> list[tuple[str, int]] | None:
    """(dir, bytes free) of the dir in use and the fallback dir, one a filesystem; None
    when one of them has no size limit."""
    chosen = placement.current()
    found: dict[int, tuple[str, int]] = {}
    for directory in dict.fromkeys((chosen.directory, chosen.fallback_dir)):
        try:
            info = _lowlevel.fs_probe(directory)
            device = _os.stat(directory).st_dev
        except OSError:
            continue
        if not info.is_dir or not info.writable:
            continue
        if not info.size_limited:
            return None
        found.setdefault(device, (directory, info.bytes_free))
    return list(found.values())


def new_name_in(directory: str, suffix: str = ".wav", prefix: str = AUDIO_PREFIX) -> str:
    """A fresh temp name (``<prefix><uuid4 hex><suffix>``) in directory; nothing created."""
    return f"{directory}/{prefix}{_new_token()}{suffix}"


def create_temp_file(
    suffix: str = ".wav",
    prefix: str = AUDIO_PREFIX,
    *,
    size_hint: int | None = None,
    locked: bool = False,
    on_disk: bool = False,
) -> tuple[str, _lowlevel.FdCell]:
    """Create a new temp file safely and return ``(path, fd cell)``: the cell owns the
    open fd from the moment it exists (see :func:`_lowlevel.fd_cell`); the caller takes
    it over and releases it.

    The name is retried on collision like :func:`tempfile.mkstemp`. locked=True
    holds a shared flock from before the name appears, so that
    ``cleanup_all_temp_audio`` never sees the file unlocked while we live.
    on_disk=True puts it in the fallback dir. A RAM disk that refuses the file
    raises here: callers run this inside :func:`with_disk_fallback`.
    """
    directory = directory_for(size_hint, on_disk)
    cell = _lowlevel.fd_cell()  # see create_unnamed_temp_file

    def claim(path: str) -> int:
        if locked:
            return _lowlevel.create_locked(directory, path, cell=cell)
        return _lowlevel.create_excl(path, cell=cell)

    path, _ = _claim_fresh_name(directory, prefix, suffix, claim)
    return path, cell


class NewFile(NamedTuple):
    """A new temp file being filled (see :func:`create_unnamed_temp_file`)."""

    path: str  # its name: from the start when named, else once publish() links it
    cell: _lowlevel.FdCell  # owns the fd: open read-write, holding a shared flock
    named: bool
    suffix: str
    prefix: str


def create_unnamed_temp_file(
    suffix: str = ".wav",
    prefix: str = AUDIO_PREFIX,
    *,
    size_hint: int | None = None,
    on_disk: bool = False,
) -> NewFile:
    """A new temp file, flocked, that gets its name only from :func:`publish`, once it
    is filled: a process killed before that leaves no file behind (the kernel frees an
    unnamed one), and no name ever shows it empty or half-made.

    ``path`` is the name it is meant to have, which errors name meanwhile (so that
    :func:`with_disk_fallback` sees which directory refused it). Where the directory
    has no O_TMPFILE, the file is made named at once, as :func:`create_temp_file` makes
    it; :func:`drop` undoes either.
    """
    if _lowlevel.HAS_O_TMPFILE:
        directory = directory_for(size_hint, on_disk)
        path = new_name_in(directory, suffix, prefix)
        # Flocked from its creation: a child that another thread forks before the object
        # that will own the file exists (or during a whole write_wav(None)) closes its
        # copy at once, else it would keep the lock, and every cleanup would take the file
        # for one in use, for as long as it lived.
        cell = _lowlevel.fd_cell()
        try:
            _lowlevel.create_unnamed_locked(directory, cell=cell)
            return NewFile(path, cell, False, suffix, prefix)
        except OSError as exc:
            if exc.errno != _errno.EOPNOTSUPP:
                raise OSError(exc.errno, exc.strerror, path) from None
    path, cell = create_temp_file(suffix, prefix, size_hint=size_hint, locked=True,
                                  on_disk=on_disk)
    return NewFile(path, cell, True, suffix, prefix)


def publish(new: NewFile) -> str:
    """Give a filled :class:`NewFile` its name and return its path: new.path, or a fresh
    name in the same directory when another file took that one meanwhile."""
    if new.named:
        return new.path
    try:
        _lowlevel.link_unnamed(new.cell[0], new.path)
    except FileExistsError:
        return name_unnamed_file(new.cell[0], _os.path.dirname(new.path), new.suffix,
                                 new.prefix)
    return new.path


def drop(new: NewFile) -> None:
    """Undo :func:`create_unnamed_temp_file` after a failure: close, and remove the file
    when it has a name already (never when publish() named it: a caller's file)."""
    try:
        _lowlevel.release(new.cell)
    finally:
        if new.named:
            try:
                _os.unlink(new.path)
            except FileNotFoundError:
                pass


def fill(new: NewFile, write: Callable[[int, str], None]) -> str:
    """Run write(fd, path) into a file from :func:`create_unnamed_temp_file`, name it
    (:func:`publish`) and close it; return its path. On any failure nothing is left: the
    file is filled before it has a name, and a close that fails after the naming (EIO,
    ENOSPC on a network disk: what was written may be lost) removes it again, its
    OSError naming the file. The file is locked while it is written (a stream can take
    seconds). What write raises goes on as it is (a stream's ssl.SSLError is an OSError
    too, but not one of our file's)."""
    try:
        write(new.cell[0], new.path)
        path = publish(new)
    except BaseException:
        drop(new)
        raise
    try:
        # The lock let go of first, for every copy of the open file: a child that another
        # thread forks during the close may copy the fd before the cell says it is closed
        # (a fork copies the fd table, then the memory), and would keep the file "in use"
        # to every cleanup for as long as it lived. Nobody else has this fd. (Should the
        # unlock fail, the close lets go of the lock all the same.)
        _fcntl.flock(new.cell[0], _fcntl.LOCK_UN)
    except OSError:
        pass
    try:
        _lowlevel.release(new.cell)
    except OSError as exc:
        try:
            _os.unlink(path)
        except FileNotFoundError:
            pass
        raise explain_full_disk(exc, path) from None  # it names the file
    return path


def name_unnamed_file(fd: int, directory: str, suffix: str = ".wav",
                      prefix: str = AUDIO_PREFIX) -> str:
    """Give an unnamed file (O_TMPFILE in directory, already flocked) a fresh temp name
    there, retried on collision like :func:`create_temp_file`; returns the path."""
    path, _ = _claim_fresh_name(directory, prefix, suffix,
                                lambda path: _lowlevel.link_unnamed(fd, path))
    return path


def _claim_fresh_name(directory: str, prefix: str, suffix: str,
                      claim: Callable[[str], _T]) -> tuple[str, _T]:
    """(path, claim(path)) for a fresh uuid4 name in directory: claim creates or links
    the file there and raises FileExistsError when the name is taken, which is retried
    like :func:`tempfile.mkstemp` does."""
    for _ in range(_MAX_TRIES):
        path = f"{directory}/{prefix}{_new_token()}{suffix}"
        try:
            return path, claim(path)
        except FileExistsError:
            continue
    raise FileExistsError(_errno.EEXIST, "no free temp file name found", directory)


def new_temp_name(
    suffix: str = ".wav",
    prefix: str = AUDIO_PREFIX,
    *,
    size_hint: int | None = None,
    on_disk: bool = False,
) -> str:
    """A fresh temp audio name (nothing created): RAM disk first, or the fallback dir."""
    if size_hint is None and not on_disk:  # placement's choice as it is: no directory_for
        return f"{placement.current().directory}/{prefix}{_new_token()}{suffix}"
    return f"{directory_for(size_hint, on_disk)}/{prefix}{_new_token()}{suffix}"


def partial_name() -> str:
    """A fresh hidden file name of ours (``.luna_audio_.partial_<32 hex>``), which the
    cleanups recognise: for a file on its way in (an atomic write) or out (a removal).

    Its 128 random bits come from os.urandom, not uuid4: the name is never handed out
    (no version nibble to carry), and a cleanup makes one for every file it removes
    (0.8 us against uuid4's 2.9)."""
    return f".{AUDIO_PREFIX}{_PARTIAL_MARK}{_os.urandom(16).hex()}"


def partial_path(path: str) -> str:
    """A hidden sibling name for writing path atomically (see write_wav(atomic=True))."""
    return f"{_os.path.dirname(path) or '.'}/{partial_name()}"


def is_partial_name(name: str) -> bool:
    """True for a file name that partial_path makes (and nothing else that is hidden:
    a user's ``.luna_daemon_state.json`` is not ours)."""
    return _PARTIAL_NAME.fullmatch(name) is not None


def is_our_temp_path(path: str) -> bool:
    """True for a path in one of our dirs whose name carries one of our prefixes."""
    parent, name = _os.path.split(path)
    return parent in placement.our_dirs() and name.startswith(placement.OUR_PREFIXES)


def _ram_disk_refused(exc: OSError) -> bool:
    """True when exc says the RAM disk refused a new file there and the fallback dir
    differs (logged once)."""
    chosen = placement.current()
    if exc.errno not in FALLBACK_ERRNOS or not isinstance(exc.filename, str):
        return False
    if _os.path.dirname(exc.filename) != chosen.ram_dir or chosen.fallback_dir == chosen.ram_dir:
        return False
    # The errno's own words: an error on its way out may carry the --shm-size hint
    # already, which is the caller's to read, not this line's.
    reason = _os.strerror(exc.errno)
    placement.log_once(
        f"luna_shm: {chosen.ram_dir} refused a new file ({reason}): "
        f"using {chosen.fallback_dir} for such files"
    )
    return True


def _explained(exc: OSError) -> OSError:
    if isinstance(exc.filename, str):
        return explain_full_disk(exc, exc.filename)
    return exc


def with_disk_fallback(attempt: Callable[[bool], _T]) -> _T:
    """Make a new temp file: ``attempt(False)`` where placement puts it (once more when
    the prefault reserve held the space or fds it lacked: ``_prefault.retry_if_short``),
    and when the RAM disk refused it (an errno of :data:`FALLBACK_ERRNOS` naming a file
    in the RAM dir), ``attempt(True)`` in the fallback dir, logged once on the
    ``luna_shm`` logger.

    Args:
        attempt: makes and fills the file; its argument is on_disk. When it raises,
            it has removed what it made, and an OSError names the file it tried.

    Returns:
        What the successful attempt returned.

    Raises:
        OSError: the last attempt's error, naming its file, with a ``--shm-size``
            hint when the RAM disk is full (:func:`explain_full_disk`).
    """
    try:
        return _prefault.retry_if_short(lambda: attempt(False))
    except OSError as exc:
        if not _ram_disk_refused(exc):
            raise _explained(exc) from None
    try:
        return attempt(True)
    except OSError as exc:
        raise _explained(exc) from None


class Destination(NamedTuple):
    """Where a buffer or writer puts its WAV (see :func:`open_destination`)."""

    path: str  # the WAV's name once finished (a new temp file's: see finish_destination)
    cell: _lowlevel.FdCell  # owns the fd: open read-write, holding a shared flock
    created: bool  # this call made the file at path
    partial: str | None  # a new file's name until finish_destination renames it over path
    new: NewFile | None = None  # a new temp file, named by finish_destination (publish)

    @property
    def fd(self) -> int:
        """The open fd (owned by cell)."""
        return int(self.cell[0])


def still_named(fd: int, path: str) -> bool:
    """True while path still names the file open at fd (no one removed or replaced it)."""
    try:
        named = _os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = _lowlevel.fstat(fd, path)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def explain_special(exc: OSError, path: str) -> OSError:
    """exc, or, when a FIFO, socket or device sits at path (the C refuses to write over
    one: EINVAL; opening a socket says ENXIO, one on a nodev mount EACCES), an
    OSError(EINVAL) that says so."""
    if exc.errno not in (_errno.EINVAL, _errno.ENXIO, _errno.EACCES):
        return exc
    try:
        mode = _os.lstat(path).st_mode
    except OSError:
        return exc
    kind = _SPECIAL_KINDS.get(_stat.S_IFMT(mode))
    if kind is None:
        return exc
    return OSError(_errno.EINVAL, f"not a regular file ({kind}): a WAV is never written "
                   "over it", path)


_SPECIAL_KINDS = {_stat.S_IFIFO: "a FIFO", _stat.S_IFSOCK: "a socket",
                  _stat.S_IFCHR: "a character device", _stat.S_IFBLK: "a block device"}


def open_destination(
    path: str | _os.PathLike[str] | None,
    *,
    size_hint: int | None = None,
    on_disk: bool = False,
) -> Destination:
    """Open where a WAV will be written, holding a shared flock (the file is in use).

    None makes a new temp audio file (on_disk: in the fallback dir; run it inside
    :func:`with_disk_fallback`), unnamed until :func:`finish_destination` names it
    (see :func:`create_unnamed_temp_file`). A given path is created, or the empty regular
    file there (from get_temp_audio_path) is used; a file with content is never
    cut under a reader that mapped it: a new file is made beside it and renamed
    over it by :func:`finish_destination`, as is an empty file that a remover holds
    locked (a cleanup stopped while testing it is never waited for). A symlink is
    refused.
    """
    if path is None:
        new = create_unnamed_temp_file(".wav", size_hint=size_hint, on_disk=on_disk)
        return Destination(new.path, new.cell, True, None, new)
    text = _lowlevel.path_argument(path, "str, os.PathLike[str] or None")
    for _ in range(8):
        cell = _lowlevel.fd_cell()  # see create_unnamed_temp_file
        try:
            fd, created, old_size = _lowlevel.open_for_write(text, cell=cell)
        except OSError as exc:
            raise explain_special(exc, text) from None
        try:
            # Only a remover (a cleanup testing whether the file is in use) holds a file
            # exclusively, for an instant, unless it is stopped there: never wait for it.
            # A new file beside it, renamed over the name, is ours whatever the remover
            # does next (it takes only the very file it examined).
            in_removal = not _lowlevel.lock(fd, exclusive=False, filename=text)
            if not old_size and not in_removal and still_named(fd, text):
                return Destination(text, cell, created, None)
            beside = bool(old_size) or in_removal
            mode = replacement_mode(_lowlevel.fstat(fd, text)) if beside else 0o600
        except OSError as exc:
            _lowlevel.release(cell)
            raise _lowlevel.named(exc, text) from None
        except BaseException:
            _lowlevel.release(cell)
            raise
        _lowlevel.release(cell)
        if beside:
            partial = partial_path(text)
            cell = _lowlevel.fd_cell()
            try:
                _lowlevel.create_locked(_os.path.dirname(text) or ".", partial, mode, cell=cell)
            except OSError as exc:
                # Named as the path the caller gave (as write_wav names it), never by the
                # hidden name of a file that does not exist (EACCES of a directory we
                # cannot write in, ENOSPC of a RAM disk with no inode left: with its hint).
                raise explain_full_disk(OSError(exc.errno, exc.strerror, text), text) from None
            return Destination(text, cell, False, partial)
        # A cleanup removed the name between our open and our lock: again.
    raise FileNotFoundError(_errno.ENOENT, "the file kept vanishing while it was opened", text)


def replacement_mode(replaced: _os.stat_result) -> int:
    """The mode of a new file that replaces the file replaced describes: its permission
    bits when it is a regular file of this user (no wider than it was; never setuid,
    setgid or sticky), else a private 0600 (another user chose that mode for theirs).
    csrc/wav_io.c (luna_write_wav_atomic) applies the same rule."""
    if _stat.S_ISREG(replaced.st_mode) and replaced.st_uid == _os.geteuid():
        return _stat.S_IMODE(replaced.st_mode) & 0o777
    return 0o600


def finish_destination(dest: Destination) -> str:
    """Give the written file its final name and return it: a replacement's is dest.path
    (a no-op when the file already has it); a new temp file's too, unless another file
    took that name meanwhile (see :func:`publish`)."""
    if dest.new is not None:
        return publish(dest.new)
    if dest.partial is not None:
        _os.rename(dest.partial, dest.path)
    return dest.path


def discard(dest: Destination) -> None:
    """Undo :func:`open_destination` after a failure: close, remove what we made."""
    if dest.new is not None:
        drop(dest.new)
        return
    try:
        _lowlevel.release(dest.cell)
    finally:
        doomed = dest.partial
        if doomed is None and (dest.created or is_our_temp_path(dest.path)):
            doomed = dest.path
        if doomed is not None:
            try:
                _os.unlink(doomed)
            except FileNotFoundError:
                pass


_FULL_DISK_HINT = (
    " (the RAM disk is full: remove old files, or give the container more shared "
    "memory, e.g. docker run --shm-size=256m)"
)


def explain_full_disk(exc: OSError, path: str) -> OSError:
    """The same error with path as its filename, and a hint when the RAM disk is full."""
    strerror = exc.strerror or ""
    # Anywhere inside the RAM dir: a cache's files are one level deeper than ours.
    in_ram = path.startswith(_os.path.join(placement.ram_dir(), "")) or path.startswith("/proc/")
    if exc.errno == _errno.ENOSPC and in_ram and _FULL_DISK_HINT not in strerror:
        return OSError(exc.errno, strerror + _FULL_DISK_HINT, path)
    if exc.filename is None and exc.errno is not None:
        return OSError(exc.errno, strerror, path)
    return exc
