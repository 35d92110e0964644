"""A randomized soak: live streams, followers, pools, hand-offs and cleanups all at once,
with workers killed (SIGKILL) and paused (SIGSTOP/SIGCONT) at random.

Each promise has its own tests elsewhere (test_follow.py, test_pool.py, test_handoff.py,
test_reliability_*.py); this runs them together, in separate processes, in the private
dirs of the private_dirs fixture (the workers inherit LUNA_SHM_DIR and TMPDIR):

- writers stream a seeded signal through WavWriter (path=None, or a get_temp_audio_path
  published before its file exists) in random chunks and pauses, and end each stream as
  done, aborted (abort() or an exception out of the with block) or by their own SIGKILL;
- followers follow published streams (follow_wav, afollow_wav, iter_wav_stream raw and
  wav, now and then leaving mid-stream) with a timeout far above the longest SIGSTOP: what
  they get must be an exact prefix of the stream's signal, whole frames, ending at the
  full signal, or with StreamAbandoned when the writer died or aborted (after every frame
  it wrote, when it aborted); a TimeoutError only for a file that is not there;
- pool workers write into AudioPool slots (two prefixes, sometimes anonymous), WavBuffers
  and plain write_wav files and read them back, and hand buffers over with send_wav/recv_wav;
- a cleaner runs cleanup_all_temp_audio (sometimes older_than), cleanup_temp_audio of
  published streams, dry runs and new pools' reclaims the whole time.

Writers and pool workers check that a file they hold is never removed. Every worker reports
a violation the moment it sees one (tests/stream_soak_workers.py). At the end, once every
process is gone, one cleanup_all_temp_audio() and a new pool's reclaim must leave both dirs
empty.

LUNA_SOAK_SEED and LUNA_SOAK_SECONDS (default 25) as for every soak (tests/soak.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from typing import Any

from soak import Soak, assert_soak_passed, script_command, soak_settings, sweep

from helpers import LIBRARY_PATH

WORKERS = str(Path(__file__).resolve().parent / "stream_soak_workers.py")
ROLES = {"writer": 2, "follower": 3, "pool": 2, "cleaner": 1}
LONGEST_STOP = 2.0  # seconds; the followers' timeout (10 s) is far above it
SHUTDOWN = 90.0  # seconds a worker has to finish once told to stop: a hang, not a pace


def test_streams_pools_and_cleanups_soaked_with_kills_and_stops_break_no_promise(
        private_dirs, tmp_path) -> None:
    seed, seconds = soak_settings("stream", 25)
    ctl = tmp_path / "ctl"
    soak = Soak(ctl, dict(os.environ, PYTHONPATH=LIBRARY_PATH), random.Random(seed),
                script_command(WORKERS, ctl))
    soak.start_all(ROLES)
    # SIGKILL a random worker (and start another in its place), or SIGSTOP one for 0.1-2 s;
    # a writer that ended by its own SIGKILL is replaced. Writers stop first: their
    # streams end, so the followers' follows end too.
    failures, records = soak.run(
        seconds, lambda done: soak.kill_or_stop(
            done, every=(0.2, 0.8), kill_chance=0.35, longest_stop=LONGEST_STOP,
            replace_ended=True),
        shutdown=SHUTDOWN, first="writer",  # a writer may die by its own SIGKILL ("die")
        may_end=lambda w: w.role == "writer" and w.proc.returncode == -signal.SIGKILL)

    # Followers' outcomes against how each stream ended (known once every worker is gone).
    ends: dict[str, dict[str, Any]] = {}
    streams = (ctl / "streams.jsonl").read_text(encoding="utf-8").splitlines()
    for line in streams:
        record = json.loads(line)
        if "end" in record:
            ends[record["path"]] = record
    outcomes = [r for r in records if "outcome" in r and "path" in r]
    for r in outcomes:
        end = ends.get(r["path"])
        if end is None:
            continue  # its writer was killed: a prefix, then StreamAbandoned (checked there)
        if r["outcome"] == "abandoned" and end["end"] == "done":
            failures.append(f"a finished stream was abandoned under its follower: {r}")
        if r["outcome"] == "complete" and end["end"] == "abort":
            failures.append(f"an aborted stream ended normally under its follower: {r}")
        if (r["outcome"] == "abandoned" and end["end"] == "abort"
                and r["frames"] != end["frames"]):
            failures.append(f"a follower of an aborted stream got {r['frames']} frames "
                            f"of the {end['frames']} written: {r}")

    # Every process is gone: one cleanup and a new pool's reclaim leave nothing of ours.
    left = sweep(["soakpool_"], private_dirs.ram, private_dirs.fallback)
    if left:
        failures.append(f"files left after the final cleanup and reclaim: {left}")

    counts: dict[str, int] = {}
    for r in outcomes:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    summary = (f"seed {seed}: {len(soak.ended)} "
               f"processes, {len(soak.killed)} killed, {soak.stops} stopped; "
               f"{sum(1 for e in ends.values() if e['end'] == 'done')} streams done, "
               f"{sum(1 for e in ends.values() if e['end'] == 'abort')} aborted; "
               f"follows: {counts}")
    print(summary)
    for r in outcomes:  # shown with -s, or when the test fails
        if r["outcome"] != "complete":
            print("follow:", json.dumps(r))
    assert_soak_passed(seed, summary, failures)
    # The soak did something: at least one stream followed to its end.
    assert counts.get("complete", 0) >= 1, summary
