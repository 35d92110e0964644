"""A randomized soak of full disks: every producer at once while space comes and goes.

Each promise has a deterministic test in test_reliability_full_disk.py; this runs them
together, to find the interleavings those miss. In a private mount namespace
(helpers.run_in_private_shm) the RAM dir and the fallback dir are two small private tmpfs
(3 MiB each). Worker processes (one or two threads each) loop over the public producers:
write_wav(None) (atomic or not), write_wav at a get_temp_audio_path() (with a size hint or
not), create_wav_buffer (closed, or kept a while), WavWriter(None) and WavWriter(path)
streaming random chunks then close() or abort(), AudioPool writes (two prefixes, waiting or
growing), save_temp_audio of bytes, chunk lists and streams, get_temp_audio_path(create=True),
an AudioCache with small RAM and disk tiers in those dirs (put, get, get_or_render), and
cleanups of their own files and of everything. A filler process makes and removes balloon
files in both dirs, so ENOSPC appears at any step, mid-stream and mid-reservation too; the
test SIGKILLs (and replaces) workers now and then.

What is checked (tests/full_disk_soak_workers.py has the details):

- every call succeeds, and then what it made reads back exactly (read_wav, and
  python-soundfile or the stdlib wave module) from one of the two dirs, or raises a
  documented error: OSError ENOSPC/EDQUOT naming its file (in the fallback dir when the
  producer falls back, the path itself when one was given, with the --shm-size hint in
  the RAM dir), a cache's RenderError naming the renderer's full disk; a TimeoutError is a
  hang (no process is ever stopped here, and the calls wait 10 s);
- no process dies but by the test's SIGKILL (SIGBUS is the worst failure), and none writes
  to stderr (PYTHONDEVMODE: ResourceWarnings count);
- a watcher process scans both dirs at random moments: a file under one of our final names
  that no process holds (a shared flock, as every luna_shm object holds its file: the
  watcher takes it exclusively without waiting, as a cleanup does) is empty (a reserved
  name) or a complete WAV whose RIFF size covers the whole file;
- a live WavWriter's file stays named and locked; a failed producer at a given path leaves
  nothing there (a name reserved before the call may stay empty); a failed or closed pool
  leaves no slot file; the luna_shm logger says its once-a-process lines once;
- at the end, once every process is gone, one cleanup_all_temp_audio() and new pools'
  reclaims leave nothing of ours but the cache's directories; a fresh AudioCache on them
  gives each key it has that key's exact audio, and its destroy() leaves both dirs empty.

LUNA_SOAK_SEED and LUNA_SOAK_SECONDS (default 20) as for every soak (tests/soak.py).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from soak import assert_soak_passed, soak_settings

from helpers import run_in_private_shm

WORKERS = str(Path(__file__).resolve().parent / "full_disk_soak_workers.py")


def test_producers_cleanups_and_a_cache_on_two_small_disks_that_fill_at_random_break_no_promise(
) -> None:
    seed, seconds = soak_settings("full disk", 20)
    done = run_in_private_shm(f"""
        import subprocess, sys
        sys.exit(subprocess.call([sys.executable, {WORKERS!r}, "run", "{seed}", "{seconds}"]))
    """, timeout=seconds + 120)
    if done.returncode == -signal.SIGBUS:
        pytest.fail(f"LUNA_SOAK_SEED={seed}: the soak died of SIGBUS\n{done.stderr}")
    assert done.returncode == 0 and done.stdout.strip(), (
        f"LUNA_SOAK_SEED={seed}: the soak exited {done.returncode}\n{done.stdout}\n"
        f"{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    counts = result["counts"]
    summary = (f"seed {seed}: {result['processes']} processes, {result['killed']} killed; "
               + ", ".join(f"{what} {n}" for what, n in counts.items()))
    print(summary)
    assert_soak_passed(seed, summary, result["failures"])
    assert not done.stderr, done.stderr
    # The soak did something: files made and read back, and full disks met (a low bar:
    # on a loaded machine the workers spend much of their time starting again).
    assert sum(n for what, n in counts.items() if what.endswith(": ok")) >= 10, summary
    assert sum(n for what, n in counts.items() if "ENOSPC" in what) >= 1, summary
