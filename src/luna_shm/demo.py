"""The main job that ``make demo`` runs: one utterance through the RAM disk and back.

It synthesizes speech with espeak-ng when that is installed (else a tone),
writes it through a mapped WavBuffer, reads it back without a copy, verifies
every sample, and times write_wav and read_wav on the RAM disk and in the disk
temp dir (luna_shm's fallback dir: ``$TMPDIR`` or ``/tmp``, which
``tempfile.gettempdir()`` finds too). It uses only what ``luna_shm.__all__``
exports: a thin script over the public API, and an example of it.
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

from luna_shm import (
    cleanup_temp_audio,
    create_wav_buffer,
    get_temp_audio_path,
    is_using_ram_disk,
    read_wav,
    temp_dir,
    write_wav,
)

SENTENCE = "Hello from luna shm. This sentence travelled through a RAM disk."
SAMPLERATE = 22050


def _tone(seconds: float = 2.0) -> tuple[np.ndarray, int]:
    t = np.arange(int(SAMPLERATE * seconds)) / SAMPLERATE
    wave = 0.3 * np.sin(2 * np.pi * 440.0 * t) * np.minimum(1.0, t * 20)
    return (wave * 32767).astype(np.int16), SAMPLERATE


def _free(directory: str) -> str:
    """The note " (N bytes free)" for directory, or "" when that cannot be known."""
    try:
        return f" ({_shutil.disk_usage(directory).free} bytes free)"
    except OSError:
        return ""


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

    espeak-ng writes into a temp audio path (on the RAM disk); when that fails
    there (a full RAM disk: espeak-ng exits 0 with an empty or cut file), it
    speaks again into the disk temp dir, as the library sends such files there,
    and the source says why. The tone says why espeak-ng could not be used.
    """
    espeak = _shutil.which("espeak-ng")
    if espeak is None:
        return *_tone(), "a 440 Hz tone (espeak-ng is not installed)"
    path = get_temp_audio_path(".wav")
    try:
        spoken = _espeak_into(espeak, path)
    finally:
        cleanup_temp_audio(path)
    if not isinstance(spoken, str):
        return *spoken, f"espeak-ng: {SENTENCE!r}"
    first, disk = _os.path.dirname(path), _tempfile.gettempdir()
    problem = f"in {first}{_free(first)}: {spoken}"
    if _os.path.realpath(first) != _os.path.realpath(disk):
        with _tempfile.TemporaryDirectory(prefix="luna_shm_demo_") as own:
            spoken = _espeak_into(espeak, _os.path.join(own, "speech.wav"))
        if not isinstance(spoken, str):
            return (*spoken, f"espeak-ng: {SENTENCE!r}, written to {disk} because it failed "
                    f"{problem}")
        problem += f"; in {disk}: {spoken}"
    return *_tone(), f"a 440 Hz tone (espeak-ng is installed but failed {problem})"


def _round_trip(audio: np.ndarray, rate: int, out: TextIO) -> bool:
    """Render audio into a mapped WavBuffer, read it back zero-copy; True when it matches."""
    path = None
    try:
        start = _time.perf_counter_ns()
        with create_wav_buffer(len(audio), rate, dtype=np.int16) as buf:
            path = buf.path
            buf.array[:] = audio  # the "TTS model" renders straight into the file
        render_ms = (_time.perf_counter_ns() - start) / 1e6
        start = _time.perf_counter_ns()
        back, back_rate = read_wav(path)
        read_ms = (_time.perf_counter_ns() - start) / 1e6
        ok = back_rate == rate and np.array_equal(back, audio)
    finally:
        cleanup_temp_audio(path)
    print(f"wrote {path} through a mapped WavBuffer in {render_ms:.3f} ms; read it back "
          f"(zero-copy) in {read_ms:.3f} ms: {'every sample matches' if ok else 'MISMATCH'}",
          file=out)
    return ok


def _median_ms(step: Callable[[], object], repeat: int = 50) -> float:
    times = []
    for _ in range(repeat):
        start = _time.perf_counter_ns()
        step()
        times.append(_time.perf_counter_ns() - start)
    return float(np.median(times)) / 1e6


def _time_steps(path: str, audio: np.ndarray, rate: int) -> dict[str, float]:
    """Median ms of each step on path, a WAV of audio that exists already."""
    return {
        "write_wav": _median_ms(lambda: write_wav(path, audio, rate)),
        "read_wav (mmap)": _median_ms(lambda: read_wav(path)),
        "read_wav (copy)": _median_ms(lambda: read_wav(path, mmap=False)),
        "write + read (copy)": _median_ms(
            lambda: (write_wav(path, audio, rate), read_wav(path, mmap=False))),
    }


def run(out: TextIO) -> int:
    """Run the demo, printing to out; 0 when every sample read back matched."""
    where = temp_dir()
    in_ram = is_using_ram_disk()
    print(f"luna_shm demo: temp dir {where} ("
          f"{'a RAM disk' if in_ram else 'not in RAM; luna-shm status says why'})", file=out)
    audio, rate, source = synthesize()
    print(f"audio: {len(audio)} frames at {rate} Hz, {audio.nbytes} bytes, from {source}",
          file=out)
    ok = _round_trip(audio, rate, out)

    print("\nmedian of 50 runs, ms:", file=out)
    # A new temp file, on the RAM disk when the audio fits there, else where the
    # library falls back to: the first column runs wherever write_wav put it.
    path = write_wav(None, audio, rate)
    try:
        ram = _time_steps(path, audio, rate)
    finally:
        cleanup_temp_audio(path)
    with _tempfile.TemporaryDirectory(prefix="luna_shm_demo_") as own:
        disk = _time_steps(write_wav(_os.path.join(own, "demo.wav"), audio, rate), audio, rate)
    ran = _os.path.dirname(path)
    first = "RAM disk" if in_ram and ran == where else "fallback"
    print(f"  {'step':<22}{first:>10}{'disk temp':>11}", file=out)
    for step in ram:
        print(f"  {step:<22}{ram[step]:>10.4f}{disk[step]:>11.4f}", file=out)
    if first == "RAM disk":
        note = f"RAM disk: {ran}"
    elif in_ram:
        note = (f"the RAM disk {where} has no room for {audio.nbytes + 44} bytes{_free(where)}:"
                f" the first column ran in {ran}")
    else:
        note = f"no RAM disk in use: the first column ran in {ran}"
    print(f"  ({note}; disk temp dir: {_tempfile.gettempdir()})", file=out)
    return 0 if ok else 1
