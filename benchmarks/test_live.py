"""Live streams (issue 11, section 5): hand-off latency, first audio, idle CPU, throughput.

The measurements are in live.py (``python benchmarks/live.py`` prints them as a table);
here they run under ``make bench`` and their targets are recorded (never failed on:
the machine is a shared 2-core VM). What is checked is correctness: no frame lost.
"""

from __future__ import annotations

from typing import Any

import live
import pytest

import cases as bench

US = 1e-6


def _record(record_target: Any, text: str, kind: str, value: float, limit: float) -> None:
    target = bench.Target(text, kind, (f"live: {text}",), limit)
    met = value <= limit if kind == "under" else value >= limit
    # A value of exactly 0 (below a clock's resolution) has no ratio to its limit.
    record_target(bench.TargetResult(target, max(value, 1e-9), met))


@pytest.mark.parametrize("followers", [1, 8])
@pytest.mark.parametrize("gap", [live.REAL_TIME, 0.001], ids=["real-time", "1ms-apart"])
def test_handoff_latency(workspace: bench.Workspace, record_target: Any, followers: int,
                         gap: float, capsys: pytest.CaptureFixture[str]) -> None:
    ours = live.handoff_latency(workspace.ram, followers, 300, gap)
    pipe = live.pipe_latency(followers, 300, gap)
    where = f"{followers} follower(s), chunks {gap * 1e3:g} ms apart"
    _record(record_target, f"hand-off p50, {where}, at most 100 µs", "under", ours.p50, 100 * US)
    _record(record_target, f"hand-off p99, {where}, at most 1 ms", "under", ours.p99, 1000 * US)
    with capsys.disabled():
        print(f"\n{where}: follow_wav p50 {ours.p50 / US:.1f} µs p99 {ours.p99 / US:.1f} µs; "
              f"pipe p50 {pipe.p50 / US:.1f} µs p99 {pipe.p99 / US:.1f} µs")


def test_first_audio(workspace: bench.Workspace, record_target: Any,
                     capsys: pytest.CaptureFixture[str]) -> None:
    fa = live.first_audio(workspace.ram, runs=3)
    ours = bench.percentile(fa.live, 50)
    whole = bench.percentile(fa.whole_file, 50)
    _record(record_target, "first audio of a 3 s utterance: live at least 20x sooner",
            "faster", whole / ours, 20)
    with capsys.disabled():
        print(f"\nfirst audio: live {ours * 1e3:.2f} ms, whole file {whole * 1e3:.1f} ms")


def test_idle_follower_cpu(workspace: bench.Workspace, record_target: Any,
                           capsys: pytest.CaptureFixture[str]) -> None:
    used = live.idle_cpu(workspace.ram, 10.0)
    _record(record_target, "idle follower CPU over 10 s, at most 1% of a core (100 ms)",
            "under", used, 0.1)
    with capsys.disabled():
        print(f"\nidle follower: {used * 1e6:.0f} µs of CPU in 10 s")


def test_throughput(workspace: bench.Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    ours, pipe = live.throughput(workspace.ram, 20000)  # asserts that no frame is lost
    with capsys.disabled():
        for t in (ours, pipe):
            print(f"\n{t.method}: {t.mb_per_s:.0f} MB/s, lag at the end "
                  f"{t.lag_seconds * 1e3:.2f} ms")
