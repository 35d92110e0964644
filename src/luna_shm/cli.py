"""The ``luna-shm`` command line (also ``python -m luna_shm``).

Commands:
    status   the C backend's capabilities, the temp dir in use and why, whether
             it is in RAM, its free space, and our files in each dir (count,
             bytes, oldest, held by live processes); ``--json`` for scripts.
    clean    remove (or with ``--dry-run`` list) what ``cleanup_all_temp_audio``
             removes: our unused files, optionally only those ``--older-than``.
    demo     one utterance through the RAM disk and back, with timings.
    cache    ``stats``, ``ls`` or ``clear`` an existing AudioCache (``--name``, default
             "default"; ``--disk-dir``, its disk tier's directory, for stats and clear
             to count and remove that tier's entries too); a name no cache has is an
             error. ``--timeout`` (default 10 s)
             bounds the wait for the cache's lock: a process stopped or hung holding
             it makes the command fail instead of hang.

The benchmarks live in the checkout, not in the package: ``python
benchmarks/cases.py [--quick]`` or ``make bench``.

A failure prints one line on stderr and exits non-zero: 1 for a failed
command, 2 for bad arguments.
"""

from __future__ import annotations

import argparse as _argparse
import json as _json
import os as _os
import re as _re
import sys as _sys
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NoReturn, TextIO

from luna_shm import __version__, _lowlevel, placement, temp_audio
from luna_shm.placement import AUDIO_PREFIX, DAEMON_PREFIX

__all__ = ["main", "parse_duration", "shown"]

PROG = "luna-shm"

_DURATION = _re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

# statfs f_type values, for when /proc/self/mountinfo cannot name the filesystem.
_FS_MAGIC_NAMES = {
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0xEF53: "ext2/3/4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x794C7630: "overlayfs",
    0x6969: "nfs",
}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``10m``, ``2h``, ``1d`` or ``3600``.

    Args:
        text: a number >= 0 with an optional unit: s, m, h or d (seconds without one).

    Returns:
        The duration in seconds.

    Raises:
        ValueError: text is not such a duration.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: use a number with an optional unit s, m, h or d, "
            "e.g. 90s, 10m, 2h or 3600"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _duration_argument(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise _argparse.ArgumentTypeError(str(exc)) from None


def _format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _format_age(seconds: float) -> str:
    whole = max(0, int(seconds))
    for unit, size, sub_unit, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                           ("m", 60, "s", 1)):
        if whole >= size:
            return f"{whole // size}{unit} {(whole % size) // sub_size}{sub_unit}"
    return f"{whole}s"


def _escaped_char(char: str, encoding: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if char in "\\'":
        return "\\" + char
    if char.isprintable():
        try:
            char.encode(encoding)
        except UnicodeEncodeError:
            pass
        else:
            return char
    return char.encode("unicode_escape").decode("ascii")  # \n, \x1b, \xe9, \u200b


def shown(text: str, encoding: str | None = None) -> str:
    """text as it is when it prints safely as one line, else quoted and escaped.

    A name with a control character (a newline that would forge a line), an
    undecodable byte (kept by surrogateescape) or a character the output's
    encoding cannot take becomes ``'...'`` with Python escapes (``\\n``,
    ``\\xff``, ``\\u200b``), so that every listed file is one line and printing
    it never fails.

    Args:
        text: a path or name, as os functions return it.
        encoding: the output's encoding (UTF-8 when None).

    Returns:
        The text, or its quoted, escaped form.
    """
    codec = encoding or "utf-8"
    if text.isprintable() and "'" not in text[:1]:
        try:
            text.encode(codec)
        except UnicodeEncodeError:
            pass
        else:
            return text
    return "'" + "".join(_escaped_char(char, codec) for char in text) + "'"


# ---- status ------------------------------------------------------------------------


@dataclass
class FileGroup:
    """This user's files with one of our prefixes in one directory."""

    dir: str
    prefix: str
    count: int = 0
    bytes: int = 0
    oldest_age_seconds: float | None = None
    held: int = 0


def _scan(directory: str, now: float) -> list[FileGroup]:
    """Count this user's files with our prefixes in directory, per prefix: exactly what
    the scan of ``clean`` sees (missing dir: none; unreadable: OSError)."""
    groups = {prefix: FileGroup(directory, prefix) for prefix in (AUDIO_PREFIX, DAEMON_PREFIX)}
    for found in temp_audio.scan_our_files(directory, temp_audio.is_our_name):
        # Hidden partial writes (".luna_audio_.partial_...") count with their prefix.
        group = groups[DAEMON_PREFIX if found.name.lstrip(".").startswith(DAEMON_PREFIX)
                       else AUDIO_PREFIX]
        group.count += 1
        group.bytes += found.stat.st_size
        age = max(0.0, now - found.stat.st_mtime)
        if group.oldest_age_seconds is None or age > group.oldest_age_seconds:
            group.oldest_age_seconds = age
        group.held += found.held
    return list(groups.values())


def _fs_type_name(info: _lowlevel.FsInfo) -> str:
    name = placement.mount_fs_type(info.dev)
    if name is not None:
        return name
    return _FS_MAGIC_NAMES.get(info.fs_type, f"unknown (magic {info.fs_type:#x})")


def collect_status() -> dict[str, Any]:
    """What ``luna-shm status`` reports, as a JSON-ready dict.

    Returns:
        Keys: version, backend {module, memfd, o_tmpfile}, dir, reason, in_ram,
        fs_type, bytes_free, bytes_total, size_limited (None when the dir cannot be
        examined; size_limited False on a filesystem with no size limit, whose
        statvfs says 0 bytes of 0),
        ram_dir, fallback_dir, and files: one entry per dir and prefix with
        dir, prefix, count, bytes, oldest_age_seconds (None without files), held.
    """
    where = placement.current()
    fs_type: str | None = None
    bytes_free: int | None = None
    bytes_total: int | None = None
    size_limited: bool | None = None
    try:
        info = _lowlevel.fs_probe(where.directory)
    except OSError:
        pass
    else:
        fs_type, bytes_free, bytes_total = _fs_type_name(info), info.bytes_free, info.bytes_total
        size_limited = info.size_limited
    now = _time.time()
    files = [group for directory in placement.our_dirs() for group in _scan(directory, now)]
    return {
        "version": __version__,
        "backend": {
            "module": "luna_shm._native",
            "memfd": _lowlevel.HAS_MEMFD,
            "o_tmpfile": _lowlevel.HAS_O_TMPFILE,
        },
        "dir": where.directory,
        "reason": where.reason,
        "in_ram": where.in_ram,
        "fs_type": fs_type,
        "bytes_free": bytes_free,
        "bytes_total": bytes_total,
        "size_limited": size_limited,
        "ram_dir": where.ram_dir,
        "fallback_dir": where.fallback_dir,
        "files": [asdict(group) for group in files],
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _print_status(status: dict[str, Any], out: TextIO) -> None:
    backend = status["backend"]
    encoding = getattr(out, "encoding", None)

    def safe(text: str) -> str:  # a dir name with a newline must not forge a line
        return shown(text, encoding)

    print(f"luna-shm {status['version']}", file=out)
    print(f"backend:  C layer {backend['module']}: memfd {_yes(backend['memfd'])}, "
          f"O_TMPFILE {_yes(backend['o_tmpfile'])}", file=out)
    print(f"dir:      {safe(status['dir'])}", file=out)
    print(f"why:      {safe(status['reason'])}", file=out)
    print(f"in RAM:   {_yes(status['in_ram'])} (filesystem {status['fs_type'] or 'unknown'})",
          file=out)
    if status["bytes_free"] is None:
        print("space:    unknown (the dir cannot be examined)", file=out)
    elif not status["size_limited"]:
        print("space:    no size limit (its filesystem reports none)", file=out)
    else:
        print(f"space:    {_format_bytes(status['bytes_free'])} free of "
              f"{_format_bytes(status['bytes_total'])}", file=out)
    print(f"ram dir:  {safe(status['ram_dir'])}   fallback dir: {safe(status['fallback_dir'])}",
          file=out)
    groups = status["files"]
    width = max(len("dir"), *(len(safe(g["dir"])) for g in groups))
    print("our files (this user's):", file=out)
    row = "  {:<{width}}  {:<13} {:>6} {:>11} {:>10} {:>5}"
    print(row.format("dir", "prefix", "files", "bytes", "oldest", "held", width=width),
          file=out)
    for g in groups:
        oldest = "-" if g["oldest_age_seconds"] is None else _format_age(g["oldest_age_seconds"])
        print(row.format(safe(g["dir"]), g["prefix"], g["count"], _format_bytes(g["bytes"]), oldest,
                         g["held"], width=width), file=out)


def _run_status(args: _argparse.Namespace, out: TextIO) -> int:
    status = collect_status()
    if args.json:
        print(_json.dumps(status), file=out)
    else:
        _print_status(status, out)
    return 0


# ---- clean -------------------------------------------------------------------------


def _run_clean(args: _argparse.Namespace, out: TextIO) -> int:
    verb = "would remove" if args.dry_run else "removed"
    now = _time.time()
    count = total = 0
    failure: OSError | None = None
    encoding = getattr(out, "encoding", None)
    try:
        for path, st in temp_audio.iter_unused_temp_audio(older_than=args.older_than,
                                                          remove=not args.dry_run):
            count += 1
            total += st.st_size
            print(f"{verb} {shown(path, encoding)} ({_format_bytes(st.st_size)}, "
                  f"{_format_age(now - st.st_mtime)} old)", file=out)
    except OSError as exc:
        failure = exc  # a dir we cannot read: the total of what was done, then the error
    note = " (dry run: nothing was removed)" if args.dry_run else ""
    print(f"{verb} {_lowlevel.plural(count, 'file')}, {_format_bytes(total)} in total{note}",
          file=out)
    if failure is not None:
        out.flush()
        print(f"{PROG} {args.command}: error: {_one_line(failure)}", file=_sys.stderr)
        return 1
    return 0


# ---- cache -------------------------------------------------------------------------


_UNKNOWN_MAX = "unknown (each process that opens the cache sets its own)"
CACHE_TIMEOUT = 10.0  # seconds: `luna-shm cache --timeout`'s default


def _run_cache(args: _argparse.Namespace, out: TextIO) -> int:
    """The cache command, every wait for the cache's locks bounded by --timeout in all:
    on expiry a TimeoutError (ETIMEDOUT) that says so, naming the lock file (exit 1)."""
    try:
        return _cache_command(args, out, _time.monotonic() + args.timeout)
    except TimeoutError as exc:
        raise TimeoutError(exc.errno, f"gave up after {args.timeout:g} s (--timeout) "
                           f"waiting for the lock of cache {args.name!r}: another "
                           "process holds it (stopped or hung?)", exc.filename) from None


def _cache_command(args: _argparse.Namespace, out: TextIO, deadline: float) -> int:
    from luna_shm.cache import AudioCache
    from luna_shm.cache._files import check_cache_name, dir_name

    # Opening an AudioCache makes its directory: a mistyped --name would report an
    # empty cache (or "removed 0 entries") and leave a new one behind. A name no cache
    # can have (../x) is said to be one before anything is looked up.
    check_cache_name(args.name)
    parent = placement.current().directory
    if not _os.path.lexists(f"{parent}/{dir_name(args.name)}"):
        raise FileNotFoundError(f"no cache named {args.name!r} in {parent}")
    # The disk tier is the cache's only with --disk-dir: its place is each opener's own
    # (AudioCache(disk_dir=...)), kept nowhere shared. Without it, a clear leaves the
    # disk tier's entries, which the next get reloads. A mistyped --disk-dir is said to
    # be one, as a mistyped --name is: nothing is made there.
    disk_dir = args.disk_dir
    if disk_dir is not None and not _os.path.lexists(f"{disk_dir}/{dir_name(args.name)}"):
        raise FileNotFoundError(f"no disk tier of cache {args.name!r} in {disk_dir}")

    def left() -> float:
        return max(0.0, deadline - _time.monotonic())

    with AudioCache(args.name, max_bytes=args.max_bytes, disk_dir=disk_dir,
                    timeout=left()) as cache:
        if args.action == "stats":
            # The bound is each opener's own (AudioCache(max_bytes=...)), kept nowhere
            # shared: this command's is no one's.
            stats = {**asdict(cache.stats(timeout=left())), "max_bytes": None}
            print(_json.dumps(stats) if args.json else "\n".join(
                f"{field}: {_UNKNOWN_MAX if value is None else value}"
                for field, value in stats.items()), file=out)
        elif args.action == "ls":
            now = _time.time()
            encoding = getattr(out, "encoding", None)
            for key, path, st in cache.entries(timeout=left()):
                print(f"{key} {_format_bytes(st.st_size)} stored {_format_age(now - st.st_mtime)}"
                      f" ago, used {_format_age(now - st.st_atime)} ago {shown(path, encoding)}",
                      file=out)
        else:
            removed = _lowlevel.plural(cache.clear(timeout=left()), "entry", "entries")
            print(f"removed {removed} from cache {args.name!r} (pinned entries stay)",
                  file=out)
    return 0


# ---- demo --------------------------------------------------------------------------


def _run_demo(args: _argparse.Namespace, out: TextIO) -> int:
    from luna_shm import demo

    return demo.run(out)


# ---- the parser ----------------------------------------------------------------------


class _Parser(_argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


Handler = Callable[[_argparse.Namespace, TextIO], int]


def build_parser() -> _argparse.ArgumentParser:
    """The argument parser of ``luna-shm`` with its subcommands.

    Returns:
        The parser; each subcommand sets ``handler`` to its function.
    """
    parser = _Parser(
        prog=PROG,
        description="Temporary audio on a RAM disk: inspect, clean up and try out luna_shm.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser(
        "status", help="the backend, the temp dir in use and why, and our files in it",
        description="Show the C backend's capabilities, the temp dir in use and why, whether "
        "it is really in RAM, its free space, and this user's luna_shm files per dir and "
        "prefix: count, bytes, oldest age, and how many of them live processes hold (a "
        "flock: those clean leaves alone).",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=_run_status)

    clean = commands.add_parser(
        "clean", help="remove our temp files that no live process uses",
        description="Remove (or list, with --dry-run) what cleanup_all_temp_audio() removes: "
        "this user's regular luna_shm files in the RAM dir and the fallback dir that no live "
        "process holds, printing each with a total.",
    )
    clean.add_argument("--older-than", type=_duration_argument, default=None, metavar="AGE",
                       help="only files last modified longer ago: 90s, 10m, 2h, 1d or seconds")
    clean.add_argument("--dry-run", action="store_true",
                       help="list what would be removed, remove nothing")
    clean.set_defaults(handler=_run_clean)

    demo = commands.add_parser(
        "demo", help="write, read back and verify one utterance, with timings",
        description="Speak a sentence with espeak-ng (or synthesize a tone) into a RAM-disk "
        "WAV through the zero-copy path, read it back, verify it, and time the steps "
        "against the disk temp dir.",
    )
    demo.set_defaults(handler=_run_demo)

    cache = commands.add_parser(
        "cache", help="an AudioCache's counters, its entries, or clear it",
        description="stats: entries, bytes and the shared counters of an AudioCache (not its "
        "max_bytes: each process that opens it sets its own); ls: its "
        "entries, least recently used first; clear: remove every entry no process holds. "
        "A cache with a disk tier (AudioCache(disk_dir=...)) is seen whole only with "
        "--disk-dir: without it, stats counts no disk entry and clear leaves them (the "
        "next get reloads them). "
        "The cache must exist: a name no cache has is an error, and nothing is made. "
        "Every wait for the cache's lock (held for an instant by the processes that use "
        "it) is bounded by --timeout, in all: a process stopped or hung holding it makes "
        "the command fail (exit 1, naming the lock file) instead of hang.",
    )
    cache.add_argument("action", choices=("stats", "ls", "clear"))
    cache.add_argument("--name", default="default", help="the cache's name (default: default)")
    cache.add_argument("--max-bytes", type=int, default=256 * 1024 * 1024,
                       help=_argparse.SUPPRESS)
    cache.add_argument("--json", action="store_true", help="stats as one JSON object")
    cache.add_argument("--disk-dir", metavar="DIR",
                       help="the cache's disk_dir: stats counts its disk tier's entries and "
                       "clear removes them too (its disk tier must exist there)")
    cache.add_argument("--timeout", type=_duration_argument, default=CACHE_TIMEOUT,
                       metavar="SECONDS",
                       help="give up waiting for the cache's lock after this long: seconds "
                       f"(or 90s, 2m); 0 does not wait (default: {CACHE_TIMEOUT:g})")
    cache.set_defaults(handler=_run_cache)

    return parser


def _one_line(exc: BaseException) -> str:
    return shown(" ".join(str(exc).split()) or type(exc).__name__,
                 getattr(_sys.stderr, "encoding", None))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: the arguments after the program name; None reads ``sys.argv``.

    Returns:
        The exit code: 0 on success, 1 when the command failed, 130 on Ctrl-C, 141
        (as a process killed by SIGPIPE) when the reader of the output went away
        (``luna-shm clean | head -1``), with no message. With no stdout at all (fd 1
        closed) the command runs and its output goes nowhere.
        Bad arguments, ``--help`` and ``--version`` exit through SystemExit
        (code 2, 0 and 0) as argparse does.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    if _sys.stdout is None:
        # Started with fd 1 closed (`luna-shm clean >&-`), Python has no sys.stdout: the
        # command still runs, its output going nowhere, as print's does then.
        with open(_os.devnull, "w", encoding="utf-8") as discard:
            return _run(handler, args, discard)
    return _run(handler, args, _sys.stdout)


def _run(handler: Handler, args: _argparse.Namespace, out: TextIO) -> int:
    """Run a command's handler with its output on out: main's exit code."""
    try:
        code = handler(args, out)
        out.flush()  # a reader that went away shows here, not at the exit
        return code
    except BrokenPipeError:
        # Stop quietly, as command-line tools do; the interpreter's last flush of what
        # is still buffered goes nowhere instead of failing again.
        devnull = _os.open(_os.devnull, _os.O_WRONLY)
        _os.dup2(devnull, _sys.stdout.fileno())
        _os.close(devnull)
        return 141
    except (OSError, ValueError) as exc:
        print(f"{PROG} {args.command}: error: {_one_line(exc)}", file=_sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=_sys.stderr)
        return 130
