"""The main job that ``make demo`` runs: one utterance through the RAM disk and back.

It synthesizes speech with espeak-ng when that is installed (else a tone),
writes it through the zero-copy paths, reads it back, verifies every sample,
and times each step on the RAM disk and on the disk temp dir.
"""

from __future__ import annotations

import os as _os
import shutil as _shutil
import subprocess as _subprocess
import tempfile as _tempfile
import time as _time
from collections.abc import Callable
from typing import TextIO

import numpy as np

from luna_shm import _newfile, placement, temp_audio
from luna_shm.buffer import create_wav_buffer
from luna_shm.wav import read_wav, write_wav

SENTENCE = "Hello from luna shm. This sentence travelled through a RAM disk."
SAMPLERATE = 22050


def _tone(seconds: float = 2.0) -> tuple[np.ndarray, int]:
    t = np.arange(int(SAMPLERATE * seconds)) / SAMPLERATE
    wave = 0.3 * np.sin(2 * np.pi * 440.0 * t) * np.minimum(1.0, t * 20)
    return (wave * 32767).astype(np.int16), SAMPLERATE


def _free_bytes(directory: str) -> int | None:
    try:
        return _shutil.disk_usage(directory).free
    except OSError:
        return None


def _espeak_into(espeak: str, path: str) -> tuple[np.ndarray, int] | str:
    """Speak SENTENCE into path and read it back: the audio, or why that failed."""
    try:
        done = _subprocess.run([espeak, "-w", path, SENTENCE], capture_output=True,
                               timeout=60)
        if done.returncode != 0:
            last = (done.stderr or b"").decode("utf-8", "replace").strip().splitlines()
            return f"espeak-ng exited with {done.returncode}" + (f": {last[-1]}" if last else "")
        data, rate = read_wav(path, mmap=False)
    except (OSError, ValueError, _subprocess.SubprocessError) as exc:
        # espeak-ng exits 0 on a full disk, leaving an empty or cut file: this says so.
        return " ".join(str(exc).split()) or type(exc).__name__
    if data.dtype != np.int16 or data.ndim != 1 or not len(data):
        return f"espeak-ng wrote no usable audio ({data.dtype}, shape {data.shape})"
    return data, rate


def synthesize() -> tuple[np.ndarray, int, str]:
    """(int16 samples, samplerate, where they came from): espeak-ng, or a tone.

    espeak-ng writes into a temp path on the RAM disk; when that fails there (a
    full RAM disk: espeak-ng exits 0 with an empty or cut file), it speaks again
    into the disk temp dir, as the library sends such files there, and the
    source says why. The tone says why espeak-ng could not be used.
    """
    espeak = _shutil.which("espeak-ng")
    if espeak is None:
        data, rate = _tone()
        return data, rate, "a 440 Hz tone (espeak-ng is not installed)"
    where = placement.current()
    path = temp_audio.get_temp_audio_path(".wav")
    try:
        first = _espeak_into(espeak, path)
    finally:
        temp_audio.cleanup_temp_audio(path)
    if not isinstance(first, str):
        return first[0], first[1], f"espeak-ng: {SENTENCE!r}"
    problem = f"in {_os.path.dirname(path)}"
    if _os.path.dirname(path) == where.ram_dir and where.fallback_dir != where.ram_dir:
        free = _free_bytes(where.ram_dir)
        problem += "" if free is None else f" ({free} bytes free)"
        problem += f": {first}"
        path = _newfile.new_temp_name(".wav", on_disk=True)
        try:
            second = _espeak_into(espeak, path)
        finally:
            temp_audio.cleanup_temp_audio(path)
        if not isinstance(second, str):
            return (second[0], second[1], f"espeak-ng: {SENTENCE!r}, written to "
                    f"{where.fallback_dir} because it failed {problem}")
        problem += f"; in {where.fallback_dir}: {second}"
    else:
        problem += f": {first}"
    data, rate = _tone()
    return data, rate, f"a 440 Hz tone (espeak-ng is installed but failed {problem})"


def _median_ms(step: Callable[[], object], repeat: int = 50) -> float:
    times = []
    for _ in range(repeat):
        start = _time.perf_counter_ns()
        step()
        times.append(_time.perf_counter_ns() - start)
    return float(np.median(times)) / 1e6


def _time_steps(path: str, audio: np.ndarray, rate: int) -> dict[str, float]:
    try:
        results = {
            "write_wav": _median_ms(lambda: write_wav(path, audio, rate)),
            "read_wav (mmap)": _median_ms(lambda: read_wav(path)),
            "read_wav (copy)": _median_ms(lambda: read_wav(path, mmap=False)),
        }
        results["write + read (copy)"] = _median_ms(
            lambda: (write_wav(path, audio, rate), read_wav(path, mmap=False)))
    finally:
        if _os.path.exists(path):
            _os.unlink(path)
    return results


def _ram_timings(audio: np.ndarray, rate: int) -> tuple[dict[str, float], str]:
    """The timings in a new temp file, and its path: on the RAM disk when the audio fits
    there, else in the disk temp dir (as write_wav(None, ...) decides)."""

    def attempt(on_disk: bool) -> tuple[dict[str, float], str]:
        path = _newfile.new_temp_name(".wav", size_hint=audio.nbytes + 44, on_disk=on_disk)
        return _time_steps(path, audio, rate), path

    return _newfile.with_disk_fallback(attempt)


def run(out: TextIO) -> int:
    """Run the demo, printing to out; 0 when every check passed."""
    where = placement.current()
    print(f"luna_shm demo: temp dir {where.directory} "
          f"({'RAM disk' if where.in_ram else 'not in RAM'}: {where.reason})", file=out)
    audio, rate, source = synthesize()
    print(f"audio: {len(audio)} frames at {rate} Hz, {audio.nbytes} bytes, from {source}",
          file=out)

    start = _time.perf_counter_ns()
    with create_wav_buffer(len(audio), rate, dtype=np.int16) as buf:
        buf.array[:] = audio  # the "TTS model" renders straight into the file
        path = buf.path
    render_ms = (_time.perf_counter_ns() - start) / 1e6
    start = _time.perf_counter_ns()
    back, back_rate = read_wav(path)
    read_ms = (_time.perf_counter_ns() - start) / 1e6
    ok = back_rate == rate and np.array_equal(back, audio)
    print(f"wrote {path} through a mapped WavBuffer in {render_ms:.3f} ms; read it back "
          f"(zero-copy) in {read_ms:.3f} ms: {'every sample matches' if ok else 'MISMATCH'}",
          file=out)
    del back
    temp_audio.cleanup_temp_audio(path)

    print("\nmedian of 50 runs, ms:", file=out)
    ram, ram_path = _ram_timings(audio, rate)
    ram_used = _os.path.dirname(ram_path)
    with _tempfile.TemporaryDirectory(dir=where.fallback_dir) as disk_dir:
        disk = _time_steps(_os.path.join(disk_dir, "demo.wav"), audio, rate)
    first = "RAM disk" if ram_used == where.ram_dir else "fallback"
    print(f"  {'step':<22}{first:>10}{'disk temp':>11}", file=out)
    for step in ram:
        print(f"  {step:<22}{ram[step]:>10.4f}{disk[step]:>11.4f}", file=out)
    if ram_used == where.ram_dir:
        print(f"  (RAM disk: {ram_used}; disk temp dir: {where.fallback_dir})", file=out)
    else:
        free = _free_bytes(where.ram_dir)
        print(f"  (the RAM disk {where.ram_dir} has no room for {audio.nbytes + 44} bytes"
              f"{'' if free is None else f' ({free} bytes free)'} or is not in use: the first "
              f"column ran in {ram_used}; disk temp dir: {where.fallback_dir})", file=out)
    return 0 if ok else 1
