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

from luna_shm import placement, temp_audio
from luna_shm.buffer import create_wav_buffer
from luna_shm.wav import read_wav, write_wav

SENTENCE = "Hello from luna shm. This sentence travelled through a RAM disk."
SAMPLERATE = 22050


def _tone(seconds: float = 2.0) -> tuple[np.ndarray, int]:
    t = np.arange(int(SAMPLERATE * seconds)) / SAMPLERATE
    wave = 0.3 * np.sin(2 * np.pi * 440.0 * t) * np.minimum(1.0, t * 20)
    return (wave * 32767).astype(np.int16), SAMPLERATE


def synthesize() -> tuple[np.ndarray, int, str]:
    """(int16 samples, samplerate, where they came from): espeak-ng, or a tone."""
    espeak = _shutil.which("espeak-ng")
    if espeak:
        path = temp_audio.get_temp_audio_path(".wav")
        try:
            _subprocess.run([espeak, "-w", path, SENTENCE], check=True, capture_output=True,
                            timeout=60)
            data, rate = read_wav(path, mmap=False)
            if data.dtype == np.int16 and data.ndim == 1 and len(data):
                return data, rate, f"espeak-ng: {SENTENCE!r}"
        except (OSError, ValueError, _subprocess.SubprocessError):
            pass
        finally:
            temp_audio.cleanup_temp_audio(path)
    data, rate = _tone()
    return data, rate, "a 440 Hz tone (espeak-ng is not installed)"


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
    ram = _time_steps(temp_audio.get_temp_audio_path(".wav"), audio, rate)
    with _tempfile.TemporaryDirectory(dir=where.fallback_dir) as disk_dir:
        disk = _time_steps(_os.path.join(disk_dir, "demo.wav"), audio, rate)
    print(f"  {'step':<22}{'RAM disk':>10}{'disk temp':>11}", file=out)
    for step in ram:
        print(f"  {step:<22}{ram[step]:>10.4f}{disk[step]:>11.4f}", file=out)
    print(f"  (RAM disk: {where.directory}; disk temp dir: {where.fallback_dir})", file=out)
    return 0 if ok else 1
