"""Calls cut short anywhere: no fd, no mapping and no locked file outlives them.

A signal that arrives while a call runs C code runs its Python handler as soon as that
C call returns; a handler that raises (a timeout, Ctrl-C) cuts the call there, or at
any later function call or return. Each case below runs one producer once per such
point, in a child process, cut there by a profile hook (call, return and C-return
events: where CPython runs pending handlers), and counts what stayed behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import LIBRARY_PATH

CUT_EVERYWHERE = r"""
import gc, json, os, socket, sys, warnings
import numpy as np
from luna_shm.handoff import recv_wav, send_wav
warnings.simplefilter("ignore", ResourceWarning)  # the objects a cut leaves half made
from luna_shm import (AudioCache, AudioPool, WavWriter, cleanup_all_temp_audio,
                      create_wav_buffer, follow_wav, get_temp_audio_path, read_wav,
                      save_temp_audio, write_wav)

DIRS = [os.environ["LUNA_SHM_DIR"], os.environ["TMPDIR"]]
data = np.arange(4000, dtype=np.int16)
source = os.path.join(DIRS[0], "source.wav")
write_wav(source, data, 16000)

def writer(path):
    w = WavWriter(path, 16000)
    w.write(data)
    w.close()

# Made once, outside the cuts: socket.socketpair's own Python code is not ours to test. A
# message that a cut left in the socket is received by a later round (its fd, in flight,
# is in no process's table meanwhile).
PAIR = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

def hand_over():
    with create_wav_buffer(100, 16000, anonymous=True) as buf:
        send_wav(PAIR[0], buf)
        recv_wav(PAIR[1])

def cache_round():
    # Made and closed in each round; a cut leaves it to the garbage collector (closing
    # it could hang: a cut in its lock's two open windows leaves its mutex held). Room
    # for one WAV in RAM: the render evicts "k" to the disk tier, the get reloads it.
    cache = AudioCache("cut", max_bytes=10000, disk_dir=DIRS[1])
    cache.put("k", data, 16000).release()
    cache.get("k").release()
    cache.put_bytes("b", b"encoded audio").release()
    cache.get_or_render("r", lambda writer: writer.write(data), samplerate=16000).release()
    cache.get("k").release()
    cache.close()

def destroy_cache():
    # What a round left (entries, partials, .live files, notes) goes unless still held.
    try:
        AudioCache("cut", disk_dir=DIRS[1]).destroy()
    except OSError:
        return 1
    return 0

OPERATIONS = {
    "write_wav(None)": lambda: write_wav(None, data, 16000),
    "WavWriter(None)": lambda: writer(None),
    "WavWriter(path)": lambda: writer(os.path.join(DIRS[0], "given.wav")),
    "save_temp_audio(bytes)": lambda: save_temp_audio(b"x" * 5000),
    "save_temp_audio(chunks)": lambda: save_temp_audio(iter([b"x" * 100] * 3)),
    "get_temp_audio_path(create=True)": lambda: get_temp_audio_path(create=True),
    "create_wav_buffer": lambda: create_wav_buffer(1000, 16000).close(),
    "create_wav_buffer(path)": lambda: create_wav_buffer(
        1000, 16000, path=os.path.join(DIRS[0], "given.wav")).close(),
    "create_wav_buffer(anonymous=True)": lambda: create_wav_buffer(
        1000, 16000, anonymous=True).close(),
    "read_wav": lambda: read_wav(source),
    "read_wav(mmap=False)": lambda: read_wav(source, mmap=False),
    "read_wav(dtype=float32)": lambda: read_wav(source, dtype="float32"),
    "send_wav + recv_wav": lambda: hand_over(),
    "AudioPool": lambda: AudioPool(slots=2, max_bytes=4096).close(),
    "follow_wav": lambda: list(follow_wav(source, timeout=5)),
    # An unused file of ours to examine and remove, then the scan of both dirs.
    "cleanup_all_temp_audio": lambda: (get_temp_audio_path(create=True),
                                       cleanup_all_temp_audio()),
    "AudioCache": cache_round,
}

class Cut(Exception):
    pass

def run(operation, cut_at):
    seen = [0]
    def hook(frame, event, arg):
        if event in ("call", "return", "c_return"):
            if seen[0] == cut_at:
                sys.setprofile(None)
                raise Cut
            seen[0] += 1
    sys.setprofile(hook)
    try:
        OPERATIONS[operation]()
    except Cut:
        return None
    finally:
        sys.setprofile(None)
    return seen[0]

def fds():
    return len(os.listdir("/proc/self/fd"))

def mappings():
    with open("/proc/self/maps") as maps:
        return sum(d in line or "memfd:" in line for line in maps for d in DIRS)

operation = sys.argv[1]
points = run(operation, -1)  # never cut: how many points the call has
if operation == "AudioCache":
    destroy_cache()
# Each round collects its garbage before it counts fds and mappings. Frozen, what was
# imported and made before the cuts is not scanned again each round: a full collection
# among numpy's objects took 7 ms, half the time of the cache's 7,000 rounds. The collector
# still scans everything a round makes, so it frees each cycle that a cut leaves as before;
# a frozen object that became garbage would keep its fd, which counts as a leak.
gc.collect()
gc.freeze()
leaks, locked = [], 0
for cut_at in range(points):
    before = (fds(), mappings())
    run(operation, cut_at)
    gc.collect()
    if (fds(), mappings()) != before:
        leaks.append(cut_at)
    left = [os.path.join(d, n) for d in DIRS for n in os.listdir(d)
            if n != "source.wav" and not n.startswith("luna_cache-")]
    cleanup_all_temp_audio()  # removes every file of ours that nobody holds
    locked += sum(os.path.exists(p) for p in left if os.path.basename(p) != "given.wav")
    if operation == "AudioCache":
        locked += destroy_cache()
    for p in left:
        if os.path.exists(p):
            os.unlink(p)
print(json.dumps({"points": points, "leaks": leaks, "locked": locked}))
"""

OPERATIONS = ["write_wav(None)", "WavWriter(None)", "WavWriter(path)", "save_temp_audio(bytes)",
              "save_temp_audio(chunks)", "get_temp_audio_path(create=True)",
              "create_wav_buffer", "create_wav_buffer(path)",
              "create_wav_buffer(anonymous=True)", "read_wav", "AudioPool", "follow_wav",
              "cleanup_all_temp_audio", "read_wav(mmap=False)", "read_wav(dtype=float32)",
              "send_wav + recv_wav", "AudioCache"]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_a_call_cut_short_at_any_point_leaves_no_fd_mapping_or_locked_file(private_dirs,
                                                                            operation):
    # Before fd cells (and struct luna_mapping), the fd a C call returned belonged to
    # nobody until a Python object took it several calls later: write_wav(None) leaked
    # it at 4 of its points, WavWriter(None) at 22, create_wav_buffer at 25; under random
    # raising SIGALRM handlers, 6 to 9 fds and 55 mappings in 400 calls. The cache,
    # whose fds were ints until a cell or a CachedAudio took them, leaked at 163 of its
    # 2029 points, and the entries those fds pinned kept every later round's destroy()
    # from removing it.
    done = subprocess.run(
        [sys.executable, "-c", CUT_EVERYWHERE, operation], capture_output=True, text=True,
        # A deadline for a hang, not a time target: the cache's round has some 7,000
        # points, one round each, and took 42-51 s on a loaded 2-core machine (3.11, 3.13).
        timeout=600,
        env={**os.environ, "PYTHONPATH": LIBRARY_PATH, "LUNA_SHM_DIR": private_dirs.ram,
             "TMPDIR": str(private_dirs.fallback)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["points"] >= 15  # the cuts really ran through the call
    assert result == {"points": result["points"], "leaks": [], "locked": 0}


# The sweep above leaves each cache it cut to the garbage collector (closing its fds drops
# its flocks), so it cannot check the cache's lock in a process that goes on using the
# cache: that lock is a Python-level context manager (a mutex and a flock), and no
# Python-level __enter__/__exit__ can close the instant after the mutex's acquire()
# returns or the entry into __exit__ (CPython runs pending handlers there; only a `with`
# on a C-level lock is safe). What is closed: a handler that raises right after the
# flock is granted.
FLOCK_GRANTED_THEN_RAISE = r"""
import os, subprocess, sys, warnings
import numpy as np
warnings.simplefilter("ignore", ResourceWarning)
from luna_shm import AudioCache

class Cut(Exception):
    pass

def raise_after_the_flock(frame, event, arg):
    if event == "c_return" and getattr(arg, "__name__", "") == "luna_lock":
        sys.setprofile(None)
        raise Cut

cache = AudioCache("flock")
sys.setprofile(raise_after_the_flock)
try:
    cache.put("k", np.arange(100, dtype=np.int16), 16000).release()
except Cut:
    print("cut")
finally:
    sys.setprofile(None)
# Another process takes the cache's lock (clear() does) while this one keeps it open.
other = subprocess.run([sys.executable, "-c",
                        "from luna_shm import AudioCache\n"
                        "with AudioCache('flock') as c: print(c.clear())"],
                       capture_output=True, text=True, timeout=20)
print(other.returncode, other.stdout.strip(), other.stderr.strip()[-200:])
cache.close()
"""


def test_a_handler_that_raises_as_the_cache_lock_is_granted_leaves_it_free(private_dirs):
    # Before: the flock was taken before the try that releases it, so the cut left it
    # held for as long as the cache stayed open, and every other process waited.
    done = subprocess.run(
        [sys.executable, "-c", FLOCK_GRANTED_THEN_RAISE], capture_output=True, text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": LIBRARY_PATH, "LUNA_SHM_DIR": private_dirs.ram,
             "TMPDIR": str(private_dirs.fallback)})
    assert (done.returncode, done.stdout) == (0, "cut\n0 0 \n"), done.stderr
