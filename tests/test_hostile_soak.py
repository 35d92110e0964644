"""A randomized soak: users of mappings in threads while hostile processes cut and rewrite
their files, with workers killed (SIGKILL) and paused (SIGSTOP/SIGCONT) at random.

Each promise of the SIGBUS guard has its deterministic test (test_fault_guard.py,
test_reliability_hostile.py); this runs them together, to find the interleavings those
miss: a fault in one thread while another maps, unmaps, closes or collects a mapping.
In the private dirs of the private_dirs fixture (the workers inherit LUNA_SHM_DIR and
TMPDIR), tests/hostile_soak_workers.py runs:

- users (separate processes, 2-4 threads each, some with the prefault reserve on): read_wav
  of write_wav files (views, some read again and again for a while, some handed to
  another thread to check and drop, and copies), write_wav of such a view and
  read_wav(out=) into a named buffer (the C layer's EFAULT path), named and anonymous
  WavBuffers filled and read back (and truncated), AudioPool slots of two prefixes
  written (write_wav, or acquire and its array, then PooledWav.truncate) and read
  (PooledWav.array, read_wav of the slot), a pool shared by the threads that one of them
  closes now and then, send_wav/recv_wav inside a process and to another user's Unix
  socket, WavWriter streams read back and followed by follow_wav in another thread; about
  40% run a hostile thread too;
- a hostile process that picks files in the private dirs at random and truncates them
  (to 0, mid-header, anywhere, a page boundary), cuts and extends them back, rewrites
  them (truncate + other bytes; soundfile.write's bytes and soundfile.write itself),
  appends to them or extends them.

What is accepted (README "Errors" and "Limits", the docstrings of WavBuffer.array,
PooledWav, read_wav, WavWriter.write, follow_wav, send_wav, recv_wav):

- what a user reads back is exact (dtype, shape, samplerate, every byte) when no hostile
  touched its file (a hostile logs each file, by name and by st_dev/st_ino, before it
  touches it: a cleanup moves a file to a hidden name for an instant before the unlink,
  where a hostile may cut it) and always for anonymous buffers and slots (sealed memfds:
  they cannot be cut and are in no dir);
- a file a hostile touched may read, byte by byte, as what the user wrote, zeros (a
  mapping whose pages were cut became zero pages; a cut extended back reads zeros), or the
  hostile's bytes at that offset (a rewrite that put the bytes back before any touch is
  seen through the mapping; a read after a rewrite reads the new file), with the data
  starting where a WAV of ours or the hostile's WAV has it. Anything else is garbage.
  (A hostile's bytes are known to every process: seeded random bytes and soundfile WAVs;
  soundfile.write itself writes only the 16-bit one, since a float WAV's PEAK chunk holds
  the time it was written);
- errors: OSError(ESTALE) whose filename is the path from WavBuffer.array/.truncate,
  PooledWav.array, send_wav, WavWriter.write; WavError naming the path (a file that is
  no whole WAV any more, a follower's "shrank/cut/rewritten under its follower"); another
  OSError whose filename is the path. Any other exception, or one not naming the file,
  is a violation; so is any worker's death but by the test's SIGKILL, and anything on
  a worker's stderr (PYTHONDEVMODE: ResourceWarnings too);
- each user's fds and mappings of our files (/proc/self/fd, /proc/self/maps) are back
  to their number after a warm-up once it closed everything (+0), and its fds and
  mapping lines in all within a small slack (4 fds; 40 + 8 a thread lines: thread
  stacks and malloc arenas);
- at the end, every process gone, cleanup_all_temp_audio() and a new pool's reclaim (of
  each of the two pool prefixes) leave both private dirs empty (hidden .luna_audio_*
  names too), but for slots of dead pools of the second prefix that a hostile touched:
  a reclaim removes only files that still look made by a pool (reclaim_dead_pool_files:
  "a file that holds anything is never touched"), and cleanup_all_temp_audio only
  luna_audio_ names.

LUNA_SOAK_SEED and LUNA_SOAK_SECONDS (default 20) as for every soak (tests/soak.py).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from hostile_soak_workers import POOL_PREFIXES
from soak import Soak, assert_soak_passed, script_command, soak_settings, sweep, total_counts

from helpers import LIBRARY_PATH

WORKERS = str(Path(__file__).resolve().parent / "hostile_soak_workers.py")
ROLES = {"user": 3, "hostile": 1}
LONGEST_STOP = 2.0  # seconds; the follow and hand-off timeouts (10 s) are far above it
SHUTDOWN = 90.0  # seconds a worker has to finish once told to stop: a hang, not a pace


def test_mappings_used_in_threads_while_hostile_processes_cut_and_rewrite_their_files(
        private_dirs, tmp_path) -> None:
    seed, seconds = soak_settings("hostile", 20)
    ctl = tmp_path / "ctl"
    soak = Soak(ctl, dict(os.environ, PYTHONPATH=LIBRARY_PATH), random.Random(seed),
                script_command(WORKERS, ctl))
    (ctl / "sock").mkdir()
    (ctl / "touched").touch()
    soak.start_all(ROLES)
    # SIGKILL a random worker (and start another in its place), or SIGSTOP one for 0.1-2 s.
    failures, records = soak.run(seconds, lambda done: soak.kill_or_stop(
        done, every=(0.3, 1.2), kill_chance=0.3, longest_stop=LONGEST_STOP),
        shutdown=SHUTDOWN)

    # Every process is gone: one cleanup and a new pool's reclaim leave nothing of ours.
    sweep(POOL_PREFIXES)
    touched = {json.loads(line)[0] for line in
               (ctl / "touched").read_text(encoding="utf-8").splitlines()}
    left, kept = [], []
    for directory in (private_dirs.ram, private_dirs.fallback):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            # A dead pool's slot under a prefix of its own that a hostile rewrote: a
            # reclaim removes only files that still look made by a pool (documented).
            if name.startswith(f"{POOL_PREFIXES[1]}pool_") and path in touched:
                kept.append(name)
            else:
                left.append(name)
    if left:
        failures.append(f"files left after the final cleanup and reclaim: {left}")

    counts = total_counts(records)  # the last counts of each process (a killed one's too)
    ends = [r for r in records if r.get("event") == "end" and "before" in r]
    summary = (f"seed {seed}: {len(soak.ended)} processes, {len(soak.killed)} killed, "
               f"{soak.stops} stopped; {len(ends)} users ended normally; {len(kept)} dead "
               f"{POOL_PREFIXES[1]} slots a hostile touched left to their owner")
    print(summary)
    for key in sorted(counts):
        print(f"  {key}: {counts[key]}")
    for r in ends:
        print("  fds/maps before -> after:", r["before"], r["after"])
    assert_soak_passed(seed, summary, failures)
    # The soak did something: the hostiles touched files, and users read touched files.
    assert sum(n for k, n in counts.items() if k.startswith("hostile")) > 0, summary
    assert sum(n for k, n in counts.items() if k.endswith((" touched", "ESTALE"))) > 0, summary
