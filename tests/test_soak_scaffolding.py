"""The soaks' shared scaffolding (tests/soak.py, tests/soak_worker.py) fails a soak for each
thing it is meant to: a worker's stderr, its exit but 0 when the soak did not kill it, a
hang past the shutdown, a violation it reported; and it keeps what a soak's seed decides.

Real worker processes (a small script of roles), real signals; no soak runs here.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from soak import Soak, script_command, sweep, total_counts

from helpers import LIBRARY_PATH

TESTS = str(Path(__file__).resolve().parent)

# python roles.py ROLE CTL SEED: each role does one thing a soak's judge must see.
ROLES = textwrap.dedent('''
    import os, sys, time
    from soak_worker import Reporter

    role, ctl, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    me = Reporter(role, ctl)
    if role == "crash":
        sys.exit(3)
    if role == "noisy":
        print("a warning", file=sys.stderr)
    if role == "violator":
        me.violation("a broken promise", seed=seed)
        me.violation("a broken promise", seed=seed)
    if role == "counter":
        for _ in range(5):
            me.count("step")
        me.report_counts(event="end")
        pid = os.fork()
        if pid == 0:
            me.report(event="child")
            os._exit(0)
        os.waitpid(pid, 0)
    while not me.stopping() or role == "stubborn":
        time.sleep(0.01)
''')


def make_soak(tmp_path: Path, seed: int = 1) -> Soak:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "roles.py"
    script.write_text(ROLES)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([LIBRARY_PATH, TESTS]))
    ctl = tmp_path / "ctl"
    return Soak(ctl, env, random.Random(seed), script_command(str(script), ctl))


def test_a_quiet_worker_told_to_stop_fails_nothing(tmp_path: Path) -> None:
    soak = make_soak(tmp_path)
    soak.start_all({"quiet": 2})
    failures, records = soak.run(0.1, lambda done: None, shutdown=30)
    assert failures == []
    assert records == []
    assert [w.proc.returncode for w in soak.ended] == [0, 0]


def test_a_worker_that_writes_to_stderr_fails_the_soak_even_when_it_exits_0(
        tmp_path: Path) -> None:
    soak = make_soak(tmp_path)
    soak.start("noisy")
    failures, _ = soak.run(0.1, lambda done: None, shutdown=30)
    assert soak.ended[0].proc.returncode == 0
    assert failures == [f"noisy {soak.ended[0].pid} wrote to stderr: a warning\n"]


def test_an_exit_but_0_fails_the_soak_unless_the_soak_killed_it_or_allows_it(
        tmp_path: Path) -> None:
    soak = make_soak(tmp_path)
    soak.start("crash")
    failures, _ = soak.run(0.1, lambda done: None, shutdown=30)
    assert failures == [f"crash {soak.ended[0].pid} exited with 3"]

    soak = make_soak(tmp_path / "allowed")
    soak.start("crash")
    failures, _ = soak.run(0.1, lambda done: None, shutdown=30,
                           may_end=lambda w: w.proc.returncode == 3)
    assert failures == []


def test_a_worker_the_chaos_kills_is_replaced_by_one_of_its_role_and_fails_nothing(
        tmp_path: Path) -> None:
    soak = make_soak(tmp_path)
    first = soak.start("quiet")

    def chaos(done: threading.Event) -> None:
        soak.kill(first)

    failures, _ = soak.run(0.5, chaos, shutdown=30)
    assert failures == []
    assert soak.killed == {first.pid}
    assert first.proc.returncode == -signal.SIGKILL
    assert [w.role for w in soak.ended] == ["quiet", "quiet"]


def test_a_worker_that_does_not_stop_is_killed_after_the_shutdown_and_fails_the_soak(
        tmp_path: Path) -> None:
    soak = make_soak(tmp_path)
    soak.start("stubborn")
    failures, _ = soak.run(0.1, lambda done: None, shutdown=1)
    pid = soak.ended[0].pid
    assert failures == [f"stubborn {pid} did not stop within 1 s",
                        f"stubborn {pid} exited with {-signal.SIGKILL}"]


def test_each_kind_of_violation_fails_the_soak_once_with_how_often_it_was_seen(
        tmp_path: Path) -> None:
    soak = make_soak(tmp_path)
    soak.start("violator")
    failures, records = soak.run(0.1, lambda done: None, shutdown=30)
    assert len(records) == 2
    assert failures == [f'2 x {{"violation": "a broken promise", "seed": {records[0]["seed"]}, '
                        f'"role": "violator", "pid": {soak.ended[0].pid}}}']


def test_counts_sum_each_process_s_last_report_and_a_forked_child_names_its_worker(
        tmp_path: Path) -> None:
    soak = make_soak(tmp_path)
    soak.start_all({"counter": 2})
    failures, records = soak.run(0.1, lambda done: None, shutdown=30)
    assert failures == []
    assert total_counts(records) == {"step": 10}
    assert total_counts(records, by_role=True) == {"counter: step": 10}
    children = [r for r in records if r.get("event") == "child"]
    assert sorted(r["worker"] for r in children) == sorted(w.pid for w in soak.ended)


def test_the_same_seed_starts_the_same_workers(tmp_path: Path) -> None:
    names = []
    for run in ("a", "b"):
        soak = make_soak(tmp_path / run, seed=7)
        soak.start_all({"quiet": 2, "noisy": 1})
        soak.run(0.1, lambda done: None, shutdown=30)
        names.append([w.err.name for w in soak.ended])
    assert names[0] == names[1]
    other = make_soak(tmp_path / "c", seed=8)
    other.start("quiet")
    other.run(0.1, lambda done: None, shutdown=30)
    assert other.ended[0].err.name != names[0][0]


def test_the_sweep_leaves_only_what_no_cleanup_or_reclaim_removes(private_dirs) -> None:
    ram = private_dirs.ram
    for name in ("luna_audio_dead.wav", "mine.txt"):
        Path(ram, name).write_bytes(b"")
    os.utime(Path(ram, "luna_audio_dead.wav"), (0, 0))
    assert sweep(["luna_audio_"], ram) == ["mine.txt"]


@pytest.mark.parametrize("ram, fallback", [("/dev/shm/elsewhere", "/tmp/fallback"),
                                          ("/dev/shm/luna_shm_test_x", "/tmp/other")])
def test_a_destructive_worker_refuses_dirs_that_are_not_the_fixture_s(
        tmp_path: Path, ram: str, fallback: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import soak_worker; soak_worker.private_dirs_only()"],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([LIBRARY_PATH, TESTS]),
                 LUNA_SHM_DIR=ram, TMPDIR=fallback),
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"refusing to run outside the test's private dirs: {ram}, {fallback}" in done.stderr
