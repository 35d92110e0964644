"""A TTS engine writes a WAV to a luna_shm path on the RAM disk; a player reads it.

The engine is espeak-ng (``espeak-ng -w PATH TEXT``) when it is installed, else
a tone written with luna_shm.write_wav. The "player" is sox (``sox PATH -n
stat``: it decodes the whole file and prints statistics instead of playing).

Run: python examples/tts_to_player.py
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np

import luna_shm

TEXT = "The weather in Lisbon is sunny, twenty-two degrees."


def render(path: str) -> str:
    """Write speech (or a tone) to path; return what made it."""
    espeak = shutil.which("espeak-ng")
    if espeak is not None:
        subprocess.run([espeak, "-w", path, TEXT], check=True, capture_output=True, timeout=60)
        return "espeak-ng"
    rate = 22050
    t = np.arange(rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * t) * 32767).astype(np.int16)
    luna_shm.write_wav(path, tone, rate)
    return "a 440 Hz tone (espeak-ng is not installed)"


def main() -> int:
    # A new name on the RAM disk: the file appears when the engine writes it.
    path = luna_shm.get_temp_audio_path(".wav")
    try:
        source = render(path)
        data, rate = luna_shm.read_wav(path)  # zero-copy view of the file
        print(f"{source} wrote {path}: {len(data)} frames at {rate} Hz "
              f"({len(data) / rate:.2f} s), RAM disk: {luna_shm.is_using_ram_disk()}")
        del data  # drop the mapping before the file goes
        sox = shutil.which("sox")
        if sox is None:
            print("sox is not installed: skipping the player")
        else:
            done = subprocess.run([sox, path, "-n", "stat"], capture_output=True, text=True,
                                  check=True, timeout=60)
            stats = {" ".join(key.split()): value.strip() for key, value in
                     (line.split(":", 1) for line in done.stderr.splitlines() if ":" in line)}
            print(f"sox played it: length {stats['Length (seconds)']} s, "
                  f"RMS amplitude {stats['RMS amplitude']}")
    finally:
        luna_shm.cleanup_temp_audio(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
