"""Turn pytest-benchmark's JSON into bench-report/report.md and bench-report/size_scaling.png.

Usage::

    python benchmarks/report.py [bench-report/benchmarks.json] [bench-report]

The JSON comes from ``pytest benchmarks --benchmark-json=...`` (``make bench``
does both steps). Every number in the report is from that one run: medians and
99th percentiles per call, ratios within a group of the same run (against
python-soundfile and against the floor), every target of the issue with its
measured value and verdict, the machine it ran on, and how far the same
operation measured twice in the run disagrees with itself.
The plot needs matplotlib; without it the report says so and skips the plot.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cases as bench

KIND_TITLES = {
    "write": "Writes, 500 KB",
    "convert": "Convert-on-write: float32 in, 500 KB of PCM_16 out",
    "read": "Reads, 500 KB",
    "read-convert": "Convert-on-read: 500 KB of PCM read as float32",
    "read-out": "Reads into a caller's array, 50 MB",
    "per-call": "Fixed cost per call: a 16-sample WAV, one 20 ms chunk",
    "roundtrip": "Write + read back, 500 KB",
    "roundtrip+cleanup": "Write + read back + cleanup, 500 KB",
    "stream": "Streaming: one 20 ms chunk (960 bytes) per call",
    "temp-path": "get_temp_audio_path() with the file created",
    "cleanup": f"cleanup_all_temp_audio() on {bench.CLEANUP_FILES:,} files",
    "scale-write": "Scaling: writes",
    "scale-read": "Scaling: reads",
    "tail-write": "Tail latency: 500 KB writes while another process writes and fsyncs to disk",
}


@dataclass(frozen=True)
class Row:
    """One benchmark of the JSON: its case description and its statistics."""

    case: str
    group: str
    method: str
    kind: str
    variant: str
    location: str
    nbytes: int
    role: str
    median: float
    p99: float
    rounds: int
    target_check: bool
    drift: float  # median of the last third of the rounds / median of the first third


def load_rows(data: dict[str, Any]) -> list[Row]:
    """The benchmarks of a pytest-benchmark JSON that came from luna_shm cases."""
    rows = []
    for entry in data.get("benchmarks", []):
        info, stats = entry.get("extra_info", {}), entry["stats"]
        if "case" not in info:
            continue
        times = stats.get("data") or [stats["median"]]
        third = max(1, len(times) // 3)
        first, last = sorted(times[:third]), sorted(times[-third:])
        drift = last[len(last) // 2] / first[len(first) // 2] if first[0] > 0 else 1.0
        rows.append(Row(
            case=info["case"], group=info["group"], method=info["method"], kind=info["kind"],
            variant=info["variant"], location=info["location"], nbytes=int(info["nbytes"]),
            role=info["role"], median=float(stats["median"]),
            p99=bench.percentile(times, 99), rounds=int(stats["rounds"]),
            target_check=bool(info.get("target_check", False)), drift=drift,
        ))
    return rows


# A case whose first and last thirds of rounds differ more than this changed
# speed while it ran (the machine's state, not the code): its median is suspect.
DRIFT_LIMIT = 1.25


def unstable(row: Row) -> bool:
    """True when the case's speed changed while it ran (see DRIFT_LIMIT)."""
    return max(row.drift, 1 / row.drift) > DRIFT_LIMIT


def fmt(seconds: float | None) -> str:
    """Seconds as the report shows them."""
    return "-" if seconds is None else bench.format_seconds(seconds)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _group_refs(rows: Sequence[Row]) -> dict[str, dict[str, float]]:
    refs: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.role in (bench.SOUNDFILE, bench.FLOOR):
            refs.setdefault(r.group, {}).setdefault(r.role, r.median)
    return refs


def results_section(rows: Sequence[Row], kinds: Sequence[str]) -> list[str]:
    """One table per group: median, p99, rounds, x faster than soundfile, x the floor."""
    refs = _group_refs(rows)
    lines: list[str] = []
    for kind in kinds:
        groups: dict[str, list[Row]] = {}
        for r in rows:
            if r.kind == kind:
                groups.setdefault(r.group, []).append(r)
        if not groups:
            continue
        lines += [f"### {KIND_TITLES.get(kind, kind)}", ""]
        for group, members in groups.items():
            sf = refs.get(group, {}).get(bench.SOUNDFILE)
            floor = refs.get(group, {}).get(bench.FLOOR)
            where = "RAM disk" if members[0].location == "ram" else "disk temp dir"
            lines += [f"`{group}` ({where})", ""]
            body = []
            for r in members:
                name = f"**{r.method}**" if r.role == bench.OURS else r.method
                if r.role == bench.FLOOR:
                    name += " *(floor)*"
                if unstable(r):
                    name += f" ⚠ (drift {r.drift:.2f}x)"
                body.append([name, fmt(r.median), fmt(r.p99), str(r.rounds),
                             f"{sf / r.median:.2f}x" if sf else "-",
                             f"{r.median / floor:.2f}x" if floor else "-"])
            lines += _table(["method", "median", "p99", "rounds",
                             "faster than soundfile", "x floor"], body)
            lines.append("")
    return lines


def target_rows(rows: Sequence[Row]) -> list[bench.TargetResult]:
    """Every target evaluated on this run's medians.

    The documented (hard) target uses test_target.py's own measurement when
    the run has one; everything else the first measurement of each case.
    """
    medians: dict[str, float] = {}
    checks: dict[str, float] = {}
    p99s: dict[str, float] = {}
    for r in rows:
        if r.target_check:
            checks.setdefault(r.case, r.median)
        else:
            medians.setdefault(r.case, r.median)
            p99s.setdefault(r.case, r.p99)
    outcomes = []
    for target in bench.TARGETS:
        source = {**medians, **checks} if target.hard else {**checks, **medians}
        outcomes.extend(bench.evaluate_targets(source, [target], p99s))
    return outcomes


def unstable_cases(rows: Sequence[Row]) -> set[str]:
    """Names of the cases whose speed drifted while they ran."""
    return {r.case for r in rows if not r.target_check and unstable(r)}


def targets_section(outcomes: Sequence[bench.TargetResult], shaky: set[str]) -> list[str]:
    """The targets table: what, measured, limit, verdict (⚠: an input drifted while it ran)."""
    body = []
    for o in outcomes:
        verdict = f"**{o.verdict}**" if o.met is False else o.verdict
        if shaky.intersection(o.target.cases):
            verdict += " ⚠ drifted: not a result"
        body.append([o.target.text, o.measured, o.limit, verdict])
    met = sum(1 for o in outcomes if o.met)
    missed = sum(1 for o in outcomes if o.met is False)
    unmeasured = sum(1 for o in outcomes if o.met is None)
    lines = [f"{met} met, {missed} missed, {unmeasured} not measured.", ""]
    return lines + _table(["target", "measured", "limit", "verdict"], body, "lrrl")


def scaling_section(rows: Sequence[Row], plot_note: str) -> list[str]:
    """Medians per size and method, with the 50 MB / 5 MB time ratio (10.0 = linear)."""
    lines = ["## Size scaling", "", plot_note, ""]
    sizes = list(bench.SCALING_SIZES)
    labels = [f"{s // bench.MIB}M" if s % bench.MIB == 0 else f"{s // bench.KIB}K" for s in sizes]
    for kind in ("scale-write", "scale-read"):
        for location in bench.LOCATIONS:
            series: dict[str, dict[int, float]] = {}
            for r in rows:
                if r.kind == kind and r.location == location:
                    series.setdefault(r.method, {})[r.nbytes] = r.median
            if not series:
                continue
            where = "RAM disk" if location == "ram" else "disk temp dir"
            lines += [f"{KIND_TITLES[kind]}, {where} (median per call)", ""]
            body = []
            for method, points in series.items():
                ratio = "-"
                if 5 * bench.MIB in points and 50 * bench.MIB in points:
                    ratio = f"{points[50 * bench.MIB] / points[5 * bench.MIB]:.1f}"
                body.append([method, *[fmt(points.get(s)) for s in sizes], ratio])
            lines += _table(["method", *labels, "50M / 5M (10.0 = linear)"], body)
            lines.append("")
    return lines


def tail_section(rows: Sequence[Row]) -> list[str]:
    """p50/p99 of each write with the disk quiet and, right after, with the disk busy."""
    pairs: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        if r.kind == "tail-write" and " | " in r.method:
            method, state = r.method.rsplit(" | ", 1)
            pairs.setdefault((r.location, method), {})[state] = r
    body = []
    for (location, method), states in pairs.items():
        q, b = states.get(bench.TAIL_QUIET), states.get(bench.TAIL_BUSY)
        where = "RAM disk" if location == "ram" else "disk temp dir"
        body.append([method, where, fmt(q.median if q else None), fmt(q.p99 if q else None),
                     fmt(b.median if b else None), fmt(b.p99 if b else None),
                     f"{b.p99 / q.p99:.1f}x" if q and b else "-"])
    if not body:
        return []
    lines = ["## Tail latency under disk load", "",
             "Each 500 KB write is timed with the disk quiet, then at once again while another "
             "process writes 1 MiB blocks to a file in the disk temp dir and fsyncs every "
             f"16 MiB (at most {bench.DISK_LOAD_MAX_BYTES // bench.MIB} MiB on disk, stopped "
             "with its case). The file written by the method is on the RAM disk or on the "
             "disk temp dir, as the \"where\" column says; the load is always on the disk.", ""]
    return lines + _table(["method", "where", "quiet p50", "quiet p99", "busy p50", "busy p99",
                           "p99 busy / quiet"], body, "llrrrrr")


def consistency_section(rows: Sequence[Row]) -> list[str]:
    """The same operation measured more than once in the run: how much do they disagree?"""
    same: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        if r.nbytes == bench.SIZE_500K and r.variant == "int16-500K" and r.kind in (
                "write", "scale-write", "read", "scale-read") and not r.target_check:
            family = r.kind.removeprefix("scale-")
            same.setdefault((family, r.location, r.method), []).append(r)
    body = []
    for (family, location, method), members in same.items():
        if len(members) < 2:
            continue
        values = [m.median for m in members]
        spread = max(values) / min(values)
        body.append([family, method, location, ", ".join(fmt(v) for v in values),
                     f"{spread:.2f}x"])
    if not body:
        return []
    lines = ["## How far to trust these numbers", "",
             "The 500 KB cases run twice in one run (in their own group and again in the "
             "scaling series, minutes apart). The spread between the two medians of the very "
             "same operation is the noise floor of this run: a ratio closer to its limit than "
             "this spread is not a result. Within a case, ⚠ marks a speed change while it ran "
             f"(the medians of its first and last thirds of rounds differ by more than "
             f"{DRIFT_LIMIT}x): the machine changed state, and ratios against a case timed "
             "at another moment mean little.", ""]
    return lines + _table(["", "method", "where", "medians", "spread"], body, "lllrr")


def machine_section(data: dict[str, Any]) -> list[str]:
    """What the run ran on."""
    extra = data.get("luna_shm", {})
    machine = dict(extra.get("machine", {}))
    if not machine:
        machine = bench.describe_machine()
        machine["note"] = "no machine description in the JSON: this is the machine of the report"
    if "load average at end" in extra:
        machine["load average at end"] = extra["load average at end"]
    commit = data.get("commit_info", {})
    if commit.get("id"):
        machine["source"] = (f"commit {commit['id'][:12]}"
                             f"{' with uncommitted changes' if commit.get('dirty') else ''}")
    if data.get("datetime"):
        machine["run at"] = data["datetime"]
    return ["## Machine", "", *_table(["", ""], [[k, str(v)] for k, v in machine.items()], "ll")]


def plot_scaling(rows: Sequence[Row], path: Path) -> str:
    """Draw log-log time against size, one line per method; return the report's note on it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        message = (f"matplotlib is not installed: {path.name} was not drawn "
                   "(install the bench extra: pip install -e '.[bench]')")
        print(f"report: {message}", file=sys.stderr)
        return f"*{message}. The tables below have the same numbers.*"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    labels = list(dict.fromkeys(f"{r.kind.split('-')[1]}: {r.method}" for r in rows
                                if r.kind in ("scale-write", "scale-read")))
    palette = plt.get_cmap("tab20")
    colors = {label: palette(i % 20) for i, label in enumerate(labels)}
    for ax, location in zip(axes, bench.LOCATIONS, strict=True):
        for kind, style in (("scale-write", "-"), ("scale-read", "--")):
            series: dict[str, list[tuple[int, float]]] = {}
            for r in rows:
                if r.kind == kind and r.location == location:
                    series.setdefault(r.method, []).append((r.nbytes, r.median))
            for method, points in series.items():
                points.sort()
                label = f"{kind.split('-')[1]}: {method}"
                ax.plot([p[0] for p in points], [p[1] * 1e3 for p in points], style,
                        marker="o", markersize=3, label=label, color=colors[label])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes of audio (int16)")
        ax.set_title("RAM disk" if location == "ram" else "disk temp dir")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median time per call (ms)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("luna_shm: time against size (log-log), one line per method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"![time against size]({path.name})"


def build_report(data: dict[str, Any], out_dir: Path, source: Path) -> str:
    """The report's markdown (and the plot, written into out_dir)."""
    rows = load_rows(data)
    if not rows:
        raise SystemExit(f"report: {source} holds no luna_shm benchmark results")
    plot_note = plot_scaling(rows, out_dir / "size_scaling.png")
    outcomes = target_rows(rows)
    regular = [r for r in rows if not r.target_check]
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# luna_shm benchmarks", "",
        f"Generated {now} from `{source}` ({len(regular)} cases). Every number is from that "
        "one run on the machine described below: time per call, median and 99th percentile "
        "(nearest rank) of the rounds shown. \"faster than soundfile\" is python-soundfile's "
        "median divided by this method's, in the same group; \"x floor\" is this method's "
        "median divided by the floor's. The write floor is C open+writev+close of the same "
        "header and samples, the read floor C open+preadv+close into an array allocated "
        "(and touched) before the timing; both are a small cffi module of the benchmarks "
        "(benchmarks/floors.c, never shipped). Each write goes to a file that does not "
        "exist yet (the previous one is removed, untimed, between calls).", "",
        "## Targets", "",
    ]
    lines += targets_section(outcomes, unstable_cases(rows))
    lines += [""]
    lines += machine_section(data)
    lines += [""]
    lines += consistency_section(regular)
    lines += ["", "## Results", ""]
    lines += results_section(regular, ["per-call", "write", "convert", "read", "read-convert",
                                       "read-out",
                                       "roundtrip", "roundtrip+cleanup", "stream", "temp-path",
                                       "cleanup"])
    lines += scaling_section(regular, plot_note)
    lines += tail_section(regular)
    notes = Path(__file__).with_name("profile_notes.md")
    if notes.exists():
        lines += ["", "## Why the missed targets are missed", "",
                  f"*From `benchmarks/{notes.name}`: written by hand from profiles of one run; "
                  "its numbers are that run's, not necessarily this one's.*", "",
                  notes.read_text(encoding="utf-8").strip()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write report.md (and size_scaling.png) from a benchmark JSON; 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="?", default="bench-report/benchmarks.json", type=Path)
    parser.add_argument("out_dir", nargs="?", default="bench-report", type=Path)
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"report: cannot read {args.json}: {exc}", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(data, args.out_dir, args.json)
    (args.out_dir / "report.md").write_text(report, encoding="utf-8")
    print(f"report: wrote {args.out_dir / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
