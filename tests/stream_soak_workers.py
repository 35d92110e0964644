"""The worker processes of tests/test_stream_soak.py (run as a script, one role a process).

    python stream_soak_workers.py ROLE CTL_DIR SEED

ROLE is writer, follower, pool or cleaner. Every worker loops until CTL_DIR/stop exists,
then finishes what it is doing and exits 0. It appends JSON lines to CTL_DIR/out/ROLE-PID.jsonl:
{"violation": ...} the moment it sees a broken promise (so a worker killed later still
reports it), and {"outcome": ...} records the test cross-checks at the end. Only outcomes
the README and the docstrings document are accepted; anything else is a violation.

Writers publish each stream in CTL_DIR/streams.jsonl: {"path", "seed", ...} when it starts
(before the file exists, for a given path), then {"path", "end": "done"|"abort", "frames"}
when it ends on purpose. A stream's audio is a function of its seed (stream_signal), so a
follower in another process knows every frame it must get.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
from soak_worker import DTYPES, Reporter, private_dirs_only, seeded_audio

import luna_shm
from luna_shm import (
    AudioPool,
    StreamAbandoned,
    WavWriter,
    cleanup_all_temp_audio,
    cleanup_temp_audio,
    create_wav_buffer,
    follow_wav,
    get_temp_audio_path,
    iter_unused_temp_audio,
    iter_wav_stream,
    read_wav,
    recv_wav,
    send_wav,
    write_wav,
)

# A follower's timeout: far above the longest SIGSTOP the test's chaos thread sends (2 s),
# so that a stopped writer never makes a follower time out on a loaded machine.
FOLLOW_TIMEOUT = 10.0
# asyncio's debug mode (on under PYTHONDEVMODE) logs every step of a task longer than
# slow_callback_duration (0.1 s) to stderr, which the test fails on. The chaos thread stops
# this process for up to 2 s in the middle of any step, and a loaded machine delays it more:
# only a step longer than that says something about afollow_wav.
SLOW_STEP = 5.0
# The pools' two prefixes: the default one (cleanup_all_temp_audio removes a dead pool's
# slots) and one that only a new pool's reclaim removes.
POOL_PREFIXES = ("luna_audio_", "soakpool_")


def stream_signal(seed: int, frames: int, channels: int, dtype: str) -> np.ndarray:
    """The audio of a stream, a function of its seed: (frames, channels) of dtype."""
    return seeded_audio(seed, frames, channels, dtype).reshape(frames, channels)


class Worker(Reporter):
    """What every role shares: its rng, its report file (out/ROLE-PID.jsonl), the stop
    flag, and its loop of steps."""

    def __init__(self, role: str, ctl: str, seed: int) -> None:
        super().__init__(role, ctl)
        self.rng = random.Random(seed)
        self.seed = seed
        self.report(event="start", seed=seed)

    def run(self) -> None:
        while not self.stopping():
            try:
                self.step()
            except Exception as exc:  # an undocumented exception is a violation
                self.violation(f"unexpected {type(exc).__name__}: {exc}",
                               traceback=traceback.format_exc())
        self.report(event="end")

    def step(self) -> None:
        raise NotImplementedError


class Writer(Worker):
    """Streams of a seeded signal in random chunks and pauses, ended on purpose as
    done (mostly) or aborted, or by its own SIGKILL now and then."""

    def step(self) -> None:
        rng = self.rng
        seed = rng.getrandbits(48)
        frames = rng.choice([0, rng.randrange(1, 200), rng.randrange(200, 30000)])
        channels = rng.choice([1, 1, 2, 3])
        dtype = rng.choice(DTYPES)
        samplerate = rng.choice([8000, 16000, 22050, 24000, 48000])
        fate = rng.choices(["done", "abort", "raise", "die"], [80, 8, 7, 5])[0]
        cut = rng.randrange(0, frames + 1)  # where abort, raise and die happen
        signal = stream_signal(seed, frames, channels, dtype)
        if channels == 1 and rng.random() < 0.5:
            signal = signal[:, 0]  # mono chunks of shape (frames,) too
        streams = os.path.join(self.ctl, "streams.jsonl")
        record = dict(seed=seed, frames=frames, channels=channels, dtype=dtype,
                      samplerate=samplerate)
        path: str | None = None
        if rng.random() < 0.5:
            # A given path is published before its file exists: followers wait for it.
            path = get_temp_audio_path()
            publish(streams, dict(record, path=path))
        try:
            with WavWriter(path, samplerate, channels, dtype) as writer:
                if path is None:
                    path = writer.path
                    publish(streams, dict(record, path=path))
                done = self.stream(writer, path, signal, fate, cut)
                if fate == "die":
                    os.kill(os.getpid(), 9)
                if fate == "abort":
                    writer.abort()
                elif fate == "raise":
                    raise _Planned  # out of the with block: the stream is aborted
        except _Planned:
            pass
        publish(streams, dict(path=path, end="done" if fate == "done" else "abort",
                              frames=done))

    def stream(self, writer: WavWriter, path: str, signal: np.ndarray, fate: str,
               cut: int) -> int:
        """Write signal (up to cut unless fate is done) in random chunks; the frames written."""
        rng = self.rng
        identity = os.fstat(writer.fileno()).st_ino
        end = signal.shape[0] if fate == "done" else cut
        done = 0
        while done < end:
            size = rng.choice([1, rng.randrange(1, 500), rng.randrange(1, 2000)])
            size = min(size, end - done)
            writer.write(signal[done:done + size])
            done += size
            if writer.frames != done:
                self.violation("writer.frames is not what was written",
                               path=path, frames=writer.frames, written=done)
            self.check_named(path, identity)
            if rng.random() < 0.6:
                time.sleep(rng.uniform(0, 0.03))
            elif rng.random() < 0.02:
                time.sleep(rng.uniform(0.1, 0.5))  # a slow renderer
        self.check_named(path, identity)
        return done

    def check_named(self, path: str, identity: int) -> None:
        """A live writer's file is never removed (its path still names it)."""
        try:
            named = os.stat(path).st_ino
        except FileNotFoundError:
            named = None
        if named != identity:
            self.violation("a live WavWriter's file was removed or replaced", path=path)


class _Planned(Exception):
    """The exception a writer raises out of its with block on purpose."""


def publish(streams: str, record: dict[str, Any]) -> None:
    """Append one line to the streams file (one write: appends never interleave)."""
    fd = os.open(streams, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def read_streams(streams: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The published streams (whole lines only), and the ends recorded by path."""
    try:
        with open(streams, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return [], {}
    starts, ends = [], {}
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        record = json.loads(line)
        if "end" in record:
            ends[record["path"]] = record
        else:
            starts.append(record)
    return starts, ends


class Follower(Worker):
    """Follows published streams (mostly recent ones) with follow_wav or iter_wav_stream
    and checks that what it got is an exact prefix of the stream's signal."""

    def __init__(self, role: str, ctl: str, seed: int) -> None:
        super().__init__(role, ctl, seed)
        self.followed: set[str] = set()

    def step(self) -> None:
        rng = self.rng
        starts, ends = read_streams(os.path.join(self.ctl, "streams.jsonl"))
        if not starts:
            time.sleep(0.05)
            return
        stream = rng.choice(starts[-4:] if rng.random() < 0.8 else starts)
        path = stream["path"]
        if path in self.followed and rng.random() < 0.8:
            time.sleep(0.01)  # mostly others' streams: a dead one would be picked again
            return
        if not os.path.exists(path) and (path in ends or rng.random() < 0.8):
            # Ended and cleaned up (nothing will appear), or not there yet, or removed
            # after its writer died: sometimes waited for (a follower that starts before
            # the file exists), mostly not (each such wait costs a whole timeout).
            time.sleep(0.01)
            return
        self.followed.add(path)
        expected = stream_signal(stream["seed"], stream["frames"], stream["channels"],
                                 stream["dtype"])
        how = rng.choice(["follow_wav", "afollow_wav", "iter_raw", "iter_wav"])
        frame_bytes = stream["channels"] * np.dtype(stream["dtype"]).itemsize
        # Now and then a player leaves mid-stream (barge-in): after this many bytes.
        leave_at = (rng.randrange(0, stream["frames"] + 1) * frame_bytes
                    if rng.random() < 0.1 else None)
        got = bytearray()
        chunk_frames = None
        short_piece: int | None = None
        outcome, error = "complete", None

        def take(block: np.ndarray) -> bool:
            """Add a block of follow_wav or afollow_wav; True when the player leaves."""
            shape_ok = (block.dtype == np.dtype(stream["dtype"]) and
                        block.ndim == (1 if stream["channels"] == 1 else 2) and
                        (block.ndim == 1 or block.shape[1] == stream["channels"]))
            if not shape_ok:
                self.violation("a followed block is not shaped like read_wav's result",
                               path=path, how=how, dtype=str(block.dtype),
                               shape=list(block.shape))
            got.extend(np.ascontiguousarray(block).tobytes())
            return leave_at is not None and len(got) >= leave_at

        async def follow_async() -> bool:
            async with luna_shm.afollow_wav(path, timeout=FOLLOW_TIMEOUT) as blocks:
                async for block in blocks:
                    if take(block):
                        return True
            return False

        try:
            if how == "follow_wav":
                for block in follow_wav(path, timeout=FOLLOW_TIMEOUT):
                    if take(block):
                        outcome = "left"
                        break
            elif how == "afollow_wav":
                with asyncio.Runner() as runner:
                    runner.get_loop().slow_callback_duration = SLOW_STEP
                    if runner.run(follow_async()):
                        outcome = "left"
            else:
                chunk_frames = rng.choice([None, 1, rng.randrange(1, 3000)])
                header = "wav" if how == "iter_wav" else "raw"
                first = header == "wav"
                for piece in iter_wav_stream(path, header=header, chunk_frames=chunk_frames,
                                             timeout=FOLLOW_TIMEOUT):
                    if first:
                        first = False
                        self.check_stream_header(piece, stream)
                        continue
                    if short_piece is not None:  # only the last piece may be short
                        self.violation("iter_wav_stream yielded a short piece before others",
                                       path=path, bytes=short_piece, chunk_frames=chunk_frames)
                    got += piece
                    if chunk_frames is not None and len(piece) != chunk_frames * frame_bytes:
                        short_piece = len(piece)
                    if leave_at is not None and len(got) >= leave_at:
                        outcome = "left"
                        break
        except StreamAbandoned as exc:
            outcome, error = "abandoned", str(exc)
        except TimeoutError as exc:
            outcome, error = "timeout", str(exc)
        except luna_shm.WavError as exc:
            # "the file is not a WAV we can read": documented, and right only for the
            # empty file that a writer killed between making it at its given path and
            # writing its header leaves (checked below, with the timeout's case).
            outcome, error = "not a wav", str(exc)
        if len(got) % frame_bytes:
            self.violation("a follower got a partial frame", path=path, how=how,
                           bytes=len(got), frame_bytes=frame_bytes)
        want = np.ascontiguousarray(expected).tobytes()
        if bytes(got) != want[:len(got)]:
            self.violation("a follower got audio that is not the stream's", path=path,
                           how=how, bytes=len(got), frames=len(got) // frame_bytes)
        frames = len(got) // frame_bytes
        try:
            exists, size = True, os.stat(path).st_size
        except FileNotFoundError:
            exists, size = False, None
        if outcome == "complete" and len(got) != len(want):
            self.violation("a follower ended normally before the end of the stream",
                           path=path, how=how, frames=frames, of=stream["frames"])
        if outcome in ("timeout", "not a wav") and (frames or size):
            # Only a file that never appeared (or was removed, or left empty by a writer
            # killed before its header) may time out: a live writer makes progress
            # within the timeout, and a dead one's stream is abandoned at once.
            self.violation(f"a follower's outcome was {outcome} on a stream that was there",
                           path=path, how=how, frames=frames, size=size, error=error)
        if short_piece is not None and short_piece > chunk_frames * frame_bytes:
            self.violation("iter_wav_stream yielded a piece longer than chunk_frames",
                           path=path, bytes=short_piece, chunk_frames=chunk_frames)
        self.report(outcome=outcome, path=path, how=how, chunk_frames=chunk_frames,
                    frames=frames, error=error, exists=exists, size=size)

    def check_stream_header(self, header: bytes, stream: dict[str, Any]) -> None:
        """iter_wav_stream's first piece: a WAV header with the streamed-WAV sizes."""
        ok = (header[:4] == b"RIFF" and header[8:12] == b"WAVE"
              and struct.unpack_from("<I", header, 4)[0] == 0xFFFFFFFF
              and header[-8:-4] == b"data"
              and struct.unpack_from("<I", header, len(header) - 4)[0] == 0xFFFFFFFF
              and struct.unpack_from("<H", header, 22)[0] == stream["channels"]
              and struct.unpack_from("<I", header, 24)[0] == stream["samplerate"])
        if not ok:
            self.violation("iter_wav_stream's header is not the streamed-WAV header",
                           path=stream["path"], header=header.hex())


class PoolUser(Worker):
    """Pools (reused slots, written and read back while held), buffers, plain write_wav
    files and send_wav/recv_wav hand-offs, each checked for content."""

    def __init__(self, role: str, ctl: str, seed: int) -> None:
        super().__init__(role, ctl, seed)
        self.pool: AudioPool | None = None
        self.slots = 0

    def audio(self, max_bytes: int) -> np.ndarray:
        rng = self.rng
        dtype = rng.choice(DTYPES)
        channels = rng.choice([1, 2])
        frames = rng.randrange(0, max_bytes // (channels * np.dtype(dtype).itemsize) + 1)
        data = stream_signal(rng.getrandbits(48), frames, channels, dtype)
        return data[:, 0] if channels == 1 else data

    def step(self) -> None:
        rng = self.rng
        what = rng.choices(["pool", "buffer", "plain", "handoff", "new_pool"],
                           [60, 12, 12, 10, 6])[0]
        getattr(self, f"do_{what}")()

    def do_new_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
        rng = self.rng
        self.slots = rng.randrange(1, 4)
        self.pool = AudioPool(slots=self.slots, max_bytes=rng.choice([4096, 40000]),
                              prefix=rng.choice(POOL_PREFIXES), timeout=30,
                              anonymous=rng.random() < 0.1)

    def do_pool(self) -> None:
        if self.pool is None:
            self.do_new_pool()
        assert self.pool is not None
        rng = self.rng
        held = []
        try:
            for _ in range(rng.randrange(1, self.slots + 1)):  # this process's slots only
                data = self.audio(self.pool.max_bytes)
                pooled = self.pool.write_wav(data, 16000)
                held.append((pooled, data))
                if pooled.path in [p.path for p, _ in held[:-1]]:
                    self.violation("a pool handed out a slot twice", path=pooled.path)
                self.check_file(pooled.path, data, "pool slot")
                if rng.random() < 0.3:
                    time.sleep(rng.uniform(0, 0.05))
            for pooled, data in held:
                self.check_file(pooled.path, data, "pool slot")
        finally:
            for pooled, _ in held:
                pooled.release()

    def check_file(self, path: str, data: np.ndarray, what: str) -> None:
        """A held file is still named and holds exactly data."""
        try:
            got, _ = read_wav(path, mmap=self.rng.random() < 0.5)
        except FileNotFoundError:
            self.violation(f"a held {what} was removed", path=path)
            return
        if got.shape != data.shape or got.tobytes() != data.tobytes():
            self.violation(f"a held {what} does not hold what was written", path=path)

    def do_buffer(self) -> None:
        data = self.audio(40000)
        frames = data.shape[0]
        channels = 1 if data.ndim == 1 else data.shape[1]
        with create_wav_buffer(frames, 16000, channels, data.dtype) as buf:
            buf.array[...] = data
            if self.rng.random() < 0.3:
                time.sleep(self.rng.uniform(0, 0.05))
            self.check_file(buf.path, data, "WavBuffer")

    def do_plain(self) -> None:
        # write_wav(None) files are not held: any cleanup may remove them (documented),
        # so FileNotFoundError on reading one back is accepted; read whole, they match.
        data = self.audio(40000)
        path = write_wav(None, data, 16000)
        try:
            got, _ = read_wav(path, mmap=False)
        except FileNotFoundError:
            self.report(outcome="plain file removed before read back")
        else:
            if got.tobytes() != data.tobytes() or got.shape != data.shape:
                self.violation("write_wav's file does not read back", path=path)
        cleanup_temp_audio(path)

    def do_handoff(self) -> None:
        data = self.audio(40000)
        frames = data.shape[0]
        if frames == 0:
            return  # an empty buffer cannot be made (frames >= 1)
        channels = 1 if data.ndim == 1 else data.shape[1]
        left, right = socket.socketpair()
        try:
            right.settimeout(30)
            with create_wav_buffer(frames, 24000, channels, data.dtype, anonymous=True) as buf:
                buf.array[...] = data
                send_wav(left, buf)
            got, samplerate = recv_wav(right)
            if samplerate != 24000 or got.tobytes() != data.tobytes():
                self.violation("recv_wav got other audio than send_wav sent")
            del got
        finally:
            left.close()
            right.close()

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.pool is not None:
                self.pool.close()


class Cleaner(Worker):
    """cleanup_all_temp_audio in a loop (sometimes older_than=0), with now and then a
    cleanup_temp_audio of a published stream, a dry run and a new pool's reclaim."""

    def step(self) -> None:
        rng = self.rng
        what = rng.choices(["all", "older", "one", "dry", "reclaim"], [60, 15, 15, 5, 5])[0]
        if what == "all":
            cleanup_all_temp_audio()
        elif what == "older":
            cleanup_all_temp_audio(older_than=rng.choice([0, 0.001, 0.5]))
        elif what == "one":
            starts, _ = read_streams(os.path.join(self.ctl, "streams.jsonl"))
            if starts:
                result = cleanup_temp_audio(rng.choice(starts[-6:])["path"])
                if not isinstance(result, bool):
                    self.violation("cleanup_temp_audio returned no bool", result=repr(result))
        elif what == "dry":
            for _ in iter_unused_temp_audio():
                pass
        else:
            with AudioPool(slots=1, max_bytes=4096, prefix=rng.choice(POOL_PREFIXES)):
                pass
        time.sleep(rng.uniform(0, 0.01))


ROLES: dict[str, Callable[[str, str, int], Worker]] = {
    "writer": Writer, "follower": Follower, "pool": PoolUser, "cleaner": Cleaner}


def main() -> None:
    role, ctl, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    private_dirs_only()  # the cleaner removes every unused file of ours in them
    ROLES[role](role, ctl, seed).run()


if __name__ == "__main__":
    main()
