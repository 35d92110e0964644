"""The worker processes of tests/test_hostile_soak.py (run as a script, one role a process).

    python hostile_soak_workers.py ROLE CTL_DIR SEED

ROLE is user or hostile. Every worker loops until CTL_DIR/stop exists, then finishes what
it is doing and exits 0. It appends JSON lines to CTL_DIR/out/ROLE-PID.jsonl:
{"violation": ...} the moment it sees a broken promise (so a worker killed later still
reports it), counts of what it did, and at the end its fd and mapping counts.

A user runs 2-4 threads of random public-API users of mappings (read_wav views and
copies, named and anonymous WavBuffers, AudioPool slots, send_wav/recv_wav inside the
process and to other users' sockets, WavWriter streams and follow_wav of them), hands
arrays between its threads (so that one thread drops, and the gc unmaps, what another
mapped), and sometimes runs a hostile thread of its own. A hostile process (and such a
thread) cuts, rewrites, appends to and extends the files in the private dirs at random.

The oracle. Every sample a user writes is a function of a seed it knows. Every byte a
hostile puts in a file at offset o is FOREIGN[k][o] for one of the FOREIGN sources
(random bytes, or a WAV written by soundfile, whose bytes are the same written to a file
or to memory), or a zero (a cut extended back). A hostile logs each file it is about to
touch in CTL_DIR/touched (before it touches it). So what a user reads back is:

- exact (shape, dtype, samplerate, every byte), when its file is not in the touched log,
  or is an anonymous buffer (sealed against shrinking, not in any directory);
- else, at each byte of the file, the byte the user wrote there, a zero (the guard's zero
  pages, or a cut extended back), or a hostile's FOREIGN byte at that offset; read
  with some data offset where a WAV of ours or a FOREIGN WAV has its data;
- or one of the documented errors: OSError(ESTALE) naming the path (a cut mapping of a
  WavBuffer, a PooledWav, a WavWriter's stream), WavError naming the path (not a whole
  WAV any more; a follower's "shrank/cut/rewritten under its follower"), another OSError
  whose filename is the path. Any other exception is a violation.
"""

from __future__ import annotations

import errno
import gc
import io
import json
import os
import random
import socket
import stat
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np
import soundfile
from soak_worker import DTYPES, Reporter, private_dirs_only, seeded_audio

import luna_shm
from luna_shm import (
    AudioPool,
    HandoffError,
    StreamAbandoned,
    WavError,
    WavWriter,
    cleanup_temp_audio,
    create_wav_buffer,
    follow_wav,
    read_wav,
    recv_wav,
    send_wav,
    write_wav,
)

FOLLOW_TIMEOUT = 10.0  # far above the chaos thread's longest SIGSTOP (2 s)
HANDOFF_TIMEOUT = 10.0
MAX_BYTES = 60000  # the largest file a user makes: the FOREIGN sources cover it
# The pools' prefixes: the default one (cleanup_all_temp_audio removes a dead pool's slots)
# and one that only a new pool's reclaim removes (and only slots that still look made by a
# pool: one a hostile rewrote is not ours to remove any more).
POOL_PREFIXES = ("luna_audio_", "hostpool_")


def signal_of(seed: int, frames: int, channels: int, dtype: str) -> np.ndarray:
    """Seeded audio, (frames,) for mono or (frames, channels), of dtype."""
    return seeded_audio(seed, frames, channels, dtype)


def _foreign_sources() -> list[bytes]:
    """What a hostile writes: at offset o of a file, FOREIGN[k][o] for some k."""
    rng = np.random.default_rng(20261206)
    sources = [rng.integers(0, 256, 2 * MAX_BYTES, dtype=np.uint8).tobytes() for _ in range(2)]
    sig = rng.integers(-30000, 30000, (MAX_BYTES // 4, 2)).astype(np.int16)
    for data, rate, subtype in ((sig, 22050, "PCM_16"),
                                (sig[:, :1].astype(np.float32) / 32768, 44100, "FLOAT")):
        out = io.BytesIO()
        soundfile.write(out, data, rate, format="WAV", subtype=subtype)
        wav = bytearray(out.getvalue())
        # A float WAV's PEAK chunk holds the time it was written (id, size, version,
        # then the timestamp): the same in every process.
        peak = wav.find(b"PEAK")
        if peak >= 0:
            wav[peak + 12:peak + 16] = bytes(4)
        sources.append(bytes(wav))
    return sources


FOREIGN = _foreign_sources()
FOREIGN_WAVS = (2, 3)  # the sources that are WAVs (soundfile.write writes them)
# Where a WAV's data starts, in a file of ours (by dtype) or a FOREIGN WAV.
OUR_DATA_OFFSETS = {"uint8": 44, "int16": 44, "int32": 44, "float32": 68, "float64": 72}
# ... and in a WavWriter's stream (its header has a state chunk more).
STREAM_DATA_OFFSETS = {"uint8": 60, "int16": 60, "int32": 60, "float32": 76, "float64": 80}
FOREIGN_DATA_OFFSETS = sorted({FOREIGN[k].find(b"data") + 8 for k in FOREIGN_WAVS})
_LONGEST = 4 * MAX_BYTES
_FOREIGN_TABLE = np.full((len(FOREIGN), _LONGEST), -1, dtype=np.int16)
for _k, _src in enumerate(FOREIGN):
    _FOREIGN_TABLE[_k, :len(_src)] = np.frombuffer(_src, dtype=np.uint8)


def plausible(got: bytes, ours: bytes, our_offset: int) -> bool:
    """Whether got (the data bytes a read returned) is, byte by byte, what we wrote (ours,
    at file offset our_offset), zeros, or a hostile's FOREIGN bytes, read from a data
    offset where a WAV of ours or a FOREIGN WAV has its data."""
    g = np.frombuffer(got, dtype=np.uint8).astype(np.int16)
    n = g.size
    if n == 0:
        return True
    mine = np.full(_LONGEST + n, -1, dtype=np.int16)
    mine[our_offset:our_offset + len(ours)] = np.frombuffer(ours, dtype=np.uint8)
    for d in sorted({our_offset, *OUR_DATA_OFFSETS.values(), *STREAM_DATA_OFFSETS.values(),
                     *FOREIGN_DATA_OFFSETS}):
        if d + n > _LONGEST:
            return False
        ok = (g == 0) | (g == mine[d:d + n])
        for k in range(len(FOREIGN)):
            ok |= g == _FOREIGN_TABLE[k, d:d + n]
        if ok.all():
            return True
    return False


class Worker(Reporter):
    """What both roles share: the rng, the report file (out/ROLE-PID.jsonl) and its
    counts, the stop flag, the touched log, the hostile's moves."""

    def __init__(self, role: str, ctl: str, seed: int) -> None:
        super().__init__(role, ctl)
        self.rng = random.Random(seed)
        self.dirs = [os.environ["LUNA_SHM_DIR"], os.environ["TMPDIR"]]
        self._touched = os.open(os.path.join(ctl, "touched"),
                                os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.report(event="start", seed=seed)

    # ---- the hostile's moves (a process, or a thread inside a user) ----

    def hostile_loop(self, rng: random.Random, stop: threading.Event | None = None) -> None:
        while not self.stopping() and not (stop is not None and stop.is_set()):
            try:
                self.hostile_move(rng)
            except Exception as exc:  # the hostile's own errors are not the library's
                if not isinstance(exc, OSError):
                    self.violation(f"hostile: unexpected {type(exc).__name__}: {exc}",
                                   traceback=traceback.format_exc())
            time.sleep(rng.choice([0, 0.0005, 0.002, 0.01]))

    def hostile_move(self, rng: random.Random) -> None:
        names = []
        for directory in self.dirs:
            names += [os.path.join(directory, n) for n in os.listdir(directory)]
        if not names:
            time.sleep(0.005)
            return
        if rng.random() < 0.7:
            # Mostly the newest files: those a user is mapping and reading right now.
            def made(name: str) -> float:
                try:
                    return os.stat(name).st_mtime
                except OSError:
                    return 0.0
            names = sorted(names, key=made)[-4:]
        path = rng.choice(names)
        # Only regular files of the private dirs, never through a symlink.
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            size = st.st_size
            what = rng.choices(["truncate", "cut_and_extend", "rewrite", "soundfile",
                                "append", "extend"], [30, 20, 20, 10, 10, 10])[0]
            k = rng.randrange(len(FOREIGN))
            # By name and by identity: a cleanup moves a file to a hidden name of its own
            # for an instant before the unlink, and a hostile may cut it there.
            os.write(self._touched, (json.dumps([path, what, st.st_dev, st.st_ino])
                                     + "\n").encode())
            self.count(f"hostile {what}")
            if what == "truncate":
                os.ftruncate(fd, rng.choice([0, rng.randrange(1, 45), rng.randrange(0, size + 1),
                                             size // 4096 * 4096]))
            elif what == "cut_and_extend":
                os.ftruncate(fd, rng.choice([0, rng.randrange(0, size + 1)]))
                if rng.random() < 0.5:
                    time.sleep(rng.uniform(0, 0.003))
                os.ftruncate(fd, size)
            elif what == "rewrite":  # open(path, "wb") and other bytes
                os.ftruncate(fd, 0)
                n = rng.choice([size, rng.randrange(0, size + 1), rng.randrange(0, 2 * size + 1)])
                os.pwrite(fd, FOREIGN[k][:min(n, len(FOREIGN[k]))], 0)
            elif what == "soundfile":
                k = rng.choice(FOREIGN_WAVS)
                os.ftruncate(fd, 0)
                os.pwrite(fd, FOREIGN[k], 0)  # the bytes soundfile.write makes (see below)
            elif what == "append":
                os.pwrite(fd, FOREIGN[k][size:size + rng.randrange(1, 5000)], size)
            else:
                os.ftruncate(fd, min(size + rng.randrange(1, 9000), len(FOREIGN[0])))
        finally:
            os.close(fd)
        # soundfile.write itself, at the path: its 16-bit WAV is FOREIGN[2] byte for byte
        # (a float WAV is not: its PEAK chunk holds the time of writing). Never through a
        # symlink planted meanwhile.
        if (what == "soundfile" and k == 2 and rng.random() < 0.3
                and not os.path.islink(path) and os.path.isfile(path)):
            data, rate = soundfile.read(io.BytesIO(FOREIGN[k]), dtype="int16")
            soundfile.write(path, data, rate, format="WAV", subtype="PCM_16")

    def touched(self) -> set[Any]:
        """The paths and the (st_dev, st_ino) of the files a hostile touched so far."""
        found: set[Any] = set()
        with open(os.path.join(self.ctl, "touched"), encoding="utf-8") as f:
            for line in f.read().splitlines(keepends=True):
                if line.endswith("\n"):
                    path, _, dev, ino = json.loads(line)
                    found.update((path, (dev, ino)))
        return found


class Hostile(Worker):
    def run(self) -> None:
        self.hostile_loop(self.rng)
        self.report_counts(event="end")


def _fd_and_map_counts(dirs: list[str]) -> dict[str, int]:
    """This process's fds and mapping lines: all of them, and those of our files."""
    fds = os.listdir("/proc/self/fd")
    ours_fd = 0
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(tuple(dirs)) or target.startswith("/memfd:"):
            ours_fd += 1
    with open("/proc/self/maps", encoding="utf-8") as f:
        maps = f.read().splitlines()
    ours_map = sum(1 for line in maps if any(d in line for d in dirs) or "/memfd:" in line)
    return {"fds": len(fds), "our_fds": ours_fd, "maps": len(maps), "our_maps": ours_map}


class User(Worker):
    """Threads of random users of mappings, checked against the oracle."""

    def __init__(self, role: str, ctl: str, seed: int) -> None:
        super().__init__(role, ctl, seed)
        self.held: list[tuple[str, np.ndarray, Any]] = []  # (what, array, check)
        self.identities: dict[str, tuple[int, int]] = {}  # path -> (st_dev, st_ino)
        self.held_lock = threading.Lock()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock_path = os.path.join(ctl, "sock", f"{os.getpid()}")
        self.listener.bind(self.sock_path)
        self.listener.listen(16)
        self.listener.settimeout(0.2)

    # ---- checks ----

    def mine(self, path: str) -> str:
        """path, a file this process just made; its identity is remembered (see touched)."""
        try:
            st = os.stat(path)
        except OSError:
            return path
        with self.held_lock:
            self.identities[path] = (st.st_dev, st.st_ino)
        return path

    def check_array(self, what: str, path: str | tuple[str, ...] | None, got: np.ndarray,
                    rate: int, data: np.ndarray, samplerate: int, *, exact: bool = False,
                    stream: bool = False, identities: tuple[Any, ...] = ()) -> None:
        """got (read from path, or through each of several paths) against data, written
        there: exact, or (one of them touched) plausible byte by byte."""
        same = (got.dtype == data.dtype and got.shape == data.shape and rate == samplerate
                and np.ascontiguousarray(got).tobytes() == data.tobytes())
        if same:
            self.count(f"{what} exact")
            return
        paths = (path,) if isinstance(path, str) else path or ()
        with self.held_lock:
            keys = {*paths, *(self.identities[p] for p in paths if p in self.identities),
                    *(tuple(i) for i in identities)}
        if exact or not self.touched().intersection(keys):
            self.violation(f"{what}: not what was written, and nothing touched it", path=path,
                           dtype=str(got.dtype), shape=list(got.shape), rate=rate,
                           want_dtype=str(data.dtype), want_shape=list(data.shape),
                           want_rate=samplerate, dump=self.dump(got, data))
            return
        offsets = STREAM_DATA_OFFSETS if stream else OUR_DATA_OFFSETS
        if not plausible(np.ascontiguousarray(got).tobytes(), data.tobytes(),
                         offsets[str(data.dtype)]):
            self.violation(f"{what}: garbage (neither what was written, zeros, nor a "
                           "hostile's bytes)", path=path, dtype=str(got.dtype),
                           shape=list(got.shape), rate=rate, want_dtype=str(data.dtype),
                           want_shape=list(data.shape), want_rate=samplerate,
                           dump=self.dump(got, data))
            return
        self.count(f"{what} touched")

    def dump(self, got: np.ndarray, data: np.ndarray) -> str:
        """Save what was read and what was written, to look at after a violation."""
        name = os.path.join(self.ctl, f"dump-{os.getpid()}-{time.monotonic_ns()}.npz")
        np.savez(name, got=np.ascontiguousarray(got), data=data)
        return name

    def documented(self, what: str, exc: BaseException, path: str | None, *,
                   stale: bool = False, wav: bool = True) -> None:
        """exc, out of a call on path, must be one the docs promise; else a violation."""
        if isinstance(exc, WavError) and wav:
            if path is None or path in str(exc):
                self.count(f"{what} WavError")
                return
        elif isinstance(exc, OSError) and not isinstance(exc, (TimeoutError,)):
            if exc.errno == errno.ESTALE and not stale:
                pass
            elif path is None or exc.filename == path:
                self.count(f"{what} OSError {errno.errorcode.get(exc.errno or 0, exc.errno)}")
                return
        self.violation(f"{what}: undocumented {type(exc).__name__}: {exc}", path=path,
                       filename=getattr(exc, "filename", None),
                       traceback="".join(traceback.format_exception(exc)))

    def hold(self, what: str, array: np.ndarray, check: Any) -> None:
        """Keep array for a while, for another thread to check and drop."""
        with self.held_lock:
            self.held.append((what, array, check))
            if len(self.held) > 12:
                self.held.pop(self.rng.randrange(len(self.held)))

    def data(self, max_bytes: int = MAX_BYTES - 100) -> tuple[np.ndarray, int]:
        rng = self.rng
        dtype = rng.choice(DTYPES)
        channels = rng.choice([1, 2])
        frames = rng.randrange(1, max_bytes // (channels * np.dtype(dtype).itemsize) + 1)
        samplerate = rng.randrange(8000, 48001)
        return signal_of(samplerate, frames, channels, dtype), samplerate

    # ---- the moves ----

    def do_plain(self, rng: random.Random) -> None:
        data, rate = self.data()
        path = self.mine(write_wav(None, data, rate))
        try:
            mmap = rng.random() < 0.7
            try:
                got, got_rate = read_wav(path, mmap=mmap)
            except (WavError, OSError) as exc:
                self.documented("read_wav", exc, path)
                return
            self.check_array(f"read_wav mmap={mmap}", path, got, got_rate, data, rate)
            if mmap and rng.random() < 0.5:
                # A view lives on after the cleanup: another thread checks and drops it.
                self.hold("held read_wav view", got,
                          lambda a, p=path, g=got_rate, d=data, r=rate:
                          self.check_array("held read_wav view", p, a, g, d, r))
        finally:
            cleanup_temp_audio(path)

    def do_linger(self, rng: random.Random) -> None:
        """A view read again and again for a while: the hostile cuts it meanwhile, and
        the other threads map and unmap while this one faults."""
        data, rate = self.data()
        path = self.mine(write_wav(None, data, rate))
        try:
            try:
                got, got_rate = read_wav(path)
            except (WavError, OSError) as exc:
                self.documented("read_wav", exc, path)
                return
            until = time.monotonic() + rng.uniform(0.01, 0.1)
            while time.monotonic() < until:
                self.check_array("lingering read_wav view", path, got, got_rate, data, rate)
                time.sleep(rng.choice([0, 0.001]))
        finally:
            cleanup_temp_audio(path)

    def do_copy(self, rng: random.Random) -> None:
        """write_wav of a view of a file the hostile may cut meanwhile: the C layer's
        writev meets the lost pages (EFAULT), which the guard makes zeros."""
        data, rate = self.data()
        first = self.mine(write_wav(None, data, rate))
        second = None
        try:
            try:
                view, view_rate = read_wav(first)
            except (WavError, OSError) as exc:
                self.documented("read_wav", exc, first)
                return
            time.sleep(rng.choice([0, 0.001, 0.005]))
            second = self.mine(write_wav(None, view, view_rate))
            try:
                got, got_rate = read_wav(second, mmap=rng.random() < 0.5)
            except (WavError, OSError) as exc:
                self.documented("read_wav of a copy", exc, second)
                return
            self.check_array("write_wav of a view", (first, second), got, got_rate, data,
                             rate)
        finally:
            cleanup_temp_audio(first)
            if second is not None:
                cleanup_temp_audio(second)

    def do_read_into(self, rng: random.Random) -> None:
        """read_wav(out=) into a named buffer's array: pread meets lost pages of the
        buffer (EFAULT) when the hostile cut its file."""
        data, rate = self.data()
        source = self.mine(write_wav(None, data, rate))
        frames = data.shape[0]
        channels = 1 if data.ndim == 1 else data.shape[1]
        try:
            if data.dtype == np.uint8:
                return  # out= takes int16, int32, float32 or float64
            with create_wav_buffer(frames, rate, channels, data.dtype) as buf:
                self.mine(buf.path)
                out = None
                try:
                    try:
                        out = buf.array
                        read_wav(source, out=out)
                        got = buf.array
                    except OSError as exc:  # ESTALE from the buffer, or the source's
                        named = exc.filename if exc.filename in (source, buf.path) else source
                        self.documented("read_wav(out=buffer)", exc, named,
                                        stale=named == buf.path, wav=False)
                        return
                    except WavError as exc:
                        self.documented("read_wav(out=buffer)", exc, source)
                        return
                    except ValueError as exc:
                        # out no longer fits the source: a hostile rewrote it as another WAV
                        if not self.touched().intersection(
                                {source, self.identities.get(source)}):
                            self.violation(f"read_wav(out=): ValueError for an untouched "
                                           f"file: {exc}", path=source)
                        return
                    self.check_array("read_wav(out=buffer)", (source, buf.path), got, rate,
                                     data, rate)
                finally:
                    del out
                    buf.close()
                    cleanup_temp_audio(buf.path)
        finally:
            cleanup_temp_audio(source)

    def do_buffer(self, rng: random.Random) -> None:
        data, rate = self.data()
        anonymous = rng.random() < 0.3
        frames = data.shape[0]
        channels = 1 if data.ndim == 1 else data.shape[1]
        with create_wav_buffer(frames, rate, channels, data.dtype, anonymous=anonymous) as buf:
            if not anonymous:
                self.mine(buf.path)
            try:
                self.use_buffer(rng, buf, data, rate, anonymous)
            finally:
                buf.close()
                if not anonymous:
                    cleanup_temp_audio(buf.path)  # False while a held array keeps it

    def use_buffer(self, rng: random.Random, buf: luna_shm.WavBuffer, data: np.ndarray,
                   rate: int, anonymous: bool) -> None:
        frames = data.shape[0]
        path = None if anonymous else buf.path
        what = "anonymous buffer" if anonymous else "named buffer"
        try:
            buf.array[...] = data
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.01))
            got = buf.array
        except OSError as exc:
            self.documented(f"{what}.array", exc, buf.path, stale=True, wav=False)
            return
        self.check_array(f"{what}.array", path, got, rate, data, rate, exact=anonymous)
        if rng.random() < 0.3:
            keep = rng.randrange(1, frames + 1)
            try:
                buf.truncate(keep)
            except OSError as exc:
                self.documented(f"{what}.truncate", exc, buf.path, stale=True, wav=False)
                return
            data = data[:keep]
            try:
                got = buf.array
            except OSError as exc:
                self.documented(f"{what}.array", exc, buf.path, stale=True, wav=False)
                return
            self.check_array(f"{what}.array truncated", path, got, rate, data, rate,
                             exact=anonymous)
        if not anonymous and rng.random() < 0.5:
            try:
                got, got_rate = read_wav(buf.path, mmap=rng.random() < 0.5)
            except (WavError, OSError) as exc:
                self.documented("read_wav of a buffer", exc, buf.path)
            else:
                self.check_array("read_wav of a buffer", buf.path, got, got_rate, data, rate)
        if rng.random() < 0.3:
            # The array outlives the buffer's close: another thread checks it later.
            try:
                array = buf.array
            except OSError as exc:
                self.documented(f"{what}.array", exc, buf.path, stale=True, wav=False)
                return
            self.hold(f"held {what} array", array,
                      lambda a, p=path, d=data, r=rate, x=anonymous:
                      self.check_array("held buffer array", p, a, r, d, r, exact=x))

    def do_pool(self, rng: random.Random, pools: list[AudioPool]) -> None:
        if not pools or rng.random() < 0.05:
            if pools:
                pools.pop().close()
            pools.append(AudioPool(slots=rng.randrange(1, 4), max_bytes=MAX_BYTES,
                                   prefix=rng.choice(POOL_PREFIXES), timeout=30,
                                   anonymous=rng.random() < 0.15))
        pool = pools[0]
        held = []
        try:
            for _ in range(rng.randrange(1, pool.slots + 1)):
                data, rate = self.data()
                if rng.random() < 0.4:
                    pooled = self.acquired(rng, pool, data, rate)
                    if pooled is None:
                        continue
                    data = data[:pooled.frames]
                else:
                    try:
                        pooled = pool.write_wav(data, rate)
                        self.mine(pooled.path)
                    except OSError as exc:
                        self.documented("pool.write_wav", exc,
                                        exc.filename or "(no file named)", stale=True, wav=False)
                        continue
                held.append((pooled, data, rate))
            for pooled, data, rate in held:
                if rng.random() < 0.5:
                    time.sleep(rng.uniform(0, 0.005))
                anonymous = pool.anonymous
                try:
                    got = pooled.array
                except OSError as exc:
                    self.documented("PooledWav.array", exc, pooled.path, stale=True,
                                    wav=False)
                    continue
                self.check_array("PooledWav.array", None if anonymous else pooled.path, got,
                                 rate, data, rate, exact=anonymous)
                if not anonymous and rng.random() < 0.3:
                    try:
                        got, got_rate = read_wav(pooled.path, mmap=rng.random() < 0.5)
                    except (WavError, OSError) as exc:
                        self.documented("read_wav of a slot", exc, pooled.path)
                    else:
                        self.check_array("read_wav of a slot", pooled.path, got, got_rate,
                                         data, rate)
                    del got
        finally:
            for pooled, _, _ in held:
                pooled.release()

    def do_shared_pool(self, rng: random.Random) -> None:
        """A pool that every thread of the process uses, which one of them now and then
        closes (and replaces) while others write, read or fault in its slots."""
        with self.held_lock:
            pool = self.shared_pool
            if pool is None or pool.closed:
                pool = self.shared_pool = AudioPool(
                    slots=rng.randrange(2, 5), max_bytes=MAX_BYTES,
                    prefix=rng.choice(POOL_PREFIXES), timeout=30)
        if rng.random() < 0.05:
            pool.close()
            self.count("shared pool closed")
            return
        data, rate = self.data()
        pooled = None
        try:
            if rng.random() < 0.4:
                pooled = self.acquired(rng, pool, data, rate)
                if pooled is None:
                    return
                data = data[:pooled.frames]
            else:
                pooled = pool.write_wav(data, rate)
                self.mine(pooled.path)
            time.sleep(rng.choice([0, 0.001, 0.005, 0.03]))
            got = pooled.array
            self.check_array("shared PooledWav.array", pooled.path, got, rate, data, rate)
        except ValueError as exc:
            # Another thread closed the pool: documented, "AudioPool is closed" for a
            # write_wav/acquire, "PooledWav was released" for a slot it held.
            if not ("closed" in str(exc) or "released" in str(exc)):
                raise
            self.count("shared pool: closed under a user")
        except OSError as exc:
            self.documented("shared PooledWav", exc,
                            pooled.path if pooled is not None else exc.filename or "?",
                            stale=True, wav=False)
        finally:
            if pooled is not None:
                pooled.release()

    def acquired(self, rng: random.Random, pool: AudioPool, data: np.ndarray,
                 rate: int) -> luna_shm.PooledWav | None:
        """A slot from acquire, rendered into through its array and maybe truncated; None
        (released) when the slot's file was cut meanwhile (ESTALE, checked)."""
        channels = 1 if data.ndim == 1 else data.shape[1]
        pooled = pool.acquire(data.shape[0], rate, channels, data.dtype)
        self.mine(pooled.path)
        try:
            pooled.array[...] = data
            if rng.random() < 0.4:
                pooled.truncate(rng.randrange(0, data.shape[0] + 1))
        except OSError as exc:
            self.documented("PooledWav (acquired)", exc, pooled.path, stale=True, wav=False)
            pooled.release()
            return None
        return pooled

    def do_handoff(self, rng: random.Random) -> None:
        data, rate = self.data()
        frames = data.shape[0]
        channels = 1 if data.ndim == 1 else data.shape[1]
        anonymous = rng.random() < 0.6
        peers = os.listdir(os.path.join(self.ctl, "sock"))
        far = rng.random() < 0.5 and len(peers) > 1
        if far:
            with create_wav_buffer(frames, rate, channels, data.dtype,
                                   anonymous=anonymous) as buf:
                ident = self.identities.get(self.mine(buf.path)) if not anonymous else None
                try:
                    buf.array[...] = data
                except OSError as exc:
                    self.documented("buffer.array", exc, buf.path, stale=True, wav=False)
                    return
                # To another user: it checks by the samplerate, our signal's seed.
                peer = os.path.join(self.ctl, "sock", rng.choice(peers))
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(HANDOFF_TIMEOUT)
                    try:
                        sock.connect(peer)
                        send_wav(sock, buf)
                        # What was sent, after the message: the receiver's oracle.
                        sock.sendall((json.dumps([rate, frames, channels, str(data.dtype),
                                                  None if anonymous else buf.path, ident])
                                      + "\n").encode())
                    except OSError as exc:
                        if exc.errno == errno.ESTALE:
                            self.documented("send_wav", exc, buf.path, stale=True, wav=False)
                        # else: the peer is gone, stopped or busy (ECONNREFUSED, ENOENT,
                        # EPIPE, a timeout): not the library's business
                    self.count("handoff sent far")
                return
        left, right = socket.socketpair()
        with left, right:
            right.settimeout(HANDOFF_TIMEOUT)
            with create_wav_buffer(frames, rate, channels, data.dtype,
                                   anonymous=anonymous) as buf:
                path = None if anonymous else self.mine(buf.path)
                try:
                    buf.array[...] = data
                    send_wav(left, buf)
                except OSError as exc:
                    self.documented("send_wav", exc, buf.path, stale=True, wav=False)
                    return
            # The buffer is closed: what recv_wav maps or copies outlives it.
            try:
                got, got_rate = recv_wav(right)
            except WavError as exc:
                self.documented("recv_wav", exc, None)
                return
        self.check_array("recv_wav near", path, got, got_rate, data, rate, exact=anonymous)
        if rng.random() < 0.5:
            self.hold("held recv_wav array", got,
                      lambda a, p=path, g=got_rate, d=data, r=rate, x=anonymous:
                      self.check_array("held recv_wav array", p, a, g, d, r, exact=x))

    def listen(self) -> None:
        """Take hand-offs from other users, checked by what the sender says it sent."""
        while not self.stopping():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(HANDOFF_TIMEOUT)
                try:
                    got, rate = recv_wav(conn)
                    said = b""
                    while not said.endswith(b"\n"):
                        more = conn.recv(4096)
                        if not more:
                            break
                        said += more
                except (EOFError, TimeoutError, ConnectionError):
                    continue  # the sender was killed or stopped
                except (WavError, HandoffError, OSError) as exc:
                    self.documented("recv_wav far", exc, None)
                    continue
            if not said.endswith(b"\n"):
                continue  # the sender was killed before it said what it sent
            seed, frames, channels, dtype, path, ident = json.loads(said)
            want = signal_of(seed, frames, channels, dtype)
            ids = () if ident is None else (ident,)
            # A named buffer is copied at the hand-off, as its file was then.
            self.check_array("recv_wav far", path, got, rate, want, seed, exact=path is None,
                             identities=ids)
            if self.rng.random() < 0.5:
                self.hold("held far array", got,
                          lambda a, p=path, g=rate, d=want, r=seed, i=ids:
                          self.check_array("held far array", p, a, g, d, r,
                                           exact=p is None, identities=i))

    def do_stream(self, rng: random.Random, streams: list[Any]) -> None:
        data, rate = self.data()
        channels = 1 if data.ndim == 1 else data.shape[1]
        path = None
        try:
            with WavWriter(None, rate, channels, data.dtype) as writer:
                path = self.mine(writer.path)
                with self.held_lock:
                    streams.append((path, data, rate))
                    del streams[:-6]
                done = 0
                while done < data.shape[0]:
                    size = rng.randrange(1, 3000)
                    try:
                        writer.write(data[done:done + size])
                    except OSError as exc:
                        self.documented("WavWriter.write", exc, path, stale=True, wav=False)
                        writer.abort()
                        return
                    done += size
                    if rng.random() < 0.5:
                        time.sleep(rng.uniform(0, 0.005))
            try:
                got, got_rate = read_wav(path, mmap=rng.random() < 0.5)
            except (WavError, OSError) as exc:
                self.documented("read_wav of a stream", exc, path)
            else:
                self.check_array("read_wav of a stream", path, got, got_rate, data, rate,
                                 stream=True)
        finally:
            if path is not None:
                cleanup_temp_audio(path)

    def do_follow(self, rng: random.Random, streams: list[Any]) -> None:
        with self.held_lock:
            if not streams:
                return
            path, data, _ = rng.choice(streams)
        if not os.path.exists(path):
            return
        got = bytearray()
        try:
            for block in follow_wav(path, timeout=FOLLOW_TIMEOUT):
                got += np.ascontiguousarray(block).tobytes()
        except (StreamAbandoned, WavError) as exc:
            if path not in str(exc):
                self.violation(f"follow_wav: {type(exc).__name__} not naming the file: {exc}",
                               path=path)
            self.count(f"follow_wav {type(exc).__name__}")
        except TimeoutError as exc:
            if exc.filename != path:
                self.documented("follow_wav", exc, path)
        except OSError as exc:
            self.documented("follow_wav", exc, path)
        want = data.tobytes()
        if bytes(got) == want[:len(got)]:
            self.count("follow_wav exact")
        elif not self.touched().intersection({path, self.identities.get(path)}):
            self.violation("follow_wav: not what was written, and nothing touched it",
                           path=path, got=len(got), want=len(want))
        elif not plausible(bytes(got), want, STREAM_DATA_OFFSETS[str(data.dtype)]):
            self.violation("follow_wav: garbage", path=path, got=len(got),
                           dump=self.dump(np.frombuffer(got, dtype=np.uint8), data))
        else:
            self.count("follow_wav touched")

    def check_held(self, rng: random.Random) -> None:
        with self.held_lock:
            if not self.held:
                return
            _, array, check = self.held.pop(rng.randrange(len(self.held)))
        check(array)
        del array, check

    def thread_loop(self, index: int) -> None:
        rng = random.Random(self.rng.getrandbits(64))
        pools: list[AudioPool] = []
        moves = ["plain", "linger", "copy", "read_into", "buffer", "pool", "shared_pool",
                 "handoff", "stream", "follow", "held"]
        weights = [12, 10, 6, 6, 18, 12, 10, 12, 8, 8, 12]
        try:
            while not self.stopping():
                move = rng.choices(moves, weights)[0]
                try:
                    if move == "pool":
                        self.do_pool(rng, pools)
                    elif move == "stream":
                        self.do_stream(rng, self.streams)
                    elif move == "follow":
                        self.do_follow(rng, self.streams)
                    elif move == "held":
                        self.check_held(rng)
                    elif move == "shared_pool":
                        self.do_shared_pool(rng)
                    else:
                        getattr(self, f"do_{move}")(rng)
                    self.count(move)
                except Exception as exc:  # an undocumented exception is a violation
                    self.violation(f"{move}: unexpected {type(exc).__name__}: {exc}",
                                   traceback=traceback.format_exc())
                if rng.random() < 0.05:
                    gc.collect()
        finally:
            for pool in pools:
                pool.close()

    def run(self) -> None:
        self.streams: list[Any] = []
        self.shared_pool: AudioPool | None = None
        prefault = self.rng.random() < 0.4
        if prefault:
            luna_shm.prefault_wav_buffers(2 * 1024 * 1024)
        # The baseline once every kind of move ran once (lazy imports, a pool's
        # inotify instance, the reserve's files are made for good then).
        warm = random.Random(self.rng.getrandbits(64))
        for move in ("plain", "buffer", "handoff"):
            getattr(self, f"do_{move}")(warm)
        gc.collect()
        before = _fd_and_map_counts(self.dirs)
        threads = [threading.Thread(target=self.thread_loop, args=(i,))
                   for i in range(self.rng.randrange(2, 5))]
        threads.append(threading.Thread(target=self.listen))
        hostile_stop = threading.Event()
        if self.rng.random() < 0.4:
            threads.append(threading.Thread(
                target=self.hostile_loop, args=(random.Random(self.rng.getrandbits(64)),
                                                hostile_stop)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.listener.close()
        os.unlink(self.sock_path)
        with self.held_lock:
            self.held.clear()
            self.streams.clear()
            if self.shared_pool is not None:
                self.shared_pool.close()
        if prefault:
            luna_shm.prefault_wav_buffers(0)
        gc.collect()
        after = _fd_and_map_counts(self.dirs)
        self.report_counts(event="end", before=before, after=after, threads=len(threads))
        slack = {"fds": 4, "our_fds": 0, "maps": 40 + 8 * len(threads), "our_maps": 0}
        for key, extra in slack.items():
            if after[key] > before[key] + extra:
                self.violation(f"{key} grew over the soak: {before[key]} -> {after[key]}",
                               before=before, after=after)


def main() -> None:
    role, ctl, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    private_dirs_only()  # the hostile cuts every file in them
    {"user": User, "hostile": Hostile}[role](role, ctl, seed).run()


if __name__ == "__main__":
    main()
