"""Play while it renders: a renderer streams 20 ms chunks, a player process follows them.

The "TTS engine" renders a 3 s utterance (a gliding tone) in 20 ms chunks at real
time into a WavWriter on the RAM disk. A player in another process follows the
live file with luna_shm.follow_wav: it starts on the first chunk, while the rest
is still being rendered. For comparison, the same audio handed off as a whole file
(write_wav after rendering, read_wav in another process) reaches its player only
after the last chunk. The script prints both first-audio times.

Run: python examples/live_tts_to_player.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

import luna_shm

RATE = 24000
CHUNK = RATE // 50  # 20 ms
SECONDS = 3.0

# The player: follows the file and reports when it held the first block (CLOCK_MONOTONIC
# is one clock for every process of the machine) and how much audio it got.
LIVE_PLAYER = """
import json, sys, time
import luna_shm
print("ready", flush=True)
first, frames = None, 0
for block in luna_shm.follow_wav(sys.argv[1], timeout=30):
    if first is None:
        first = time.monotonic()
    frames += len(block)  # a real player would hand the block to its audio device here
print(json.dumps({"first": first, "frames": frames}))
"""

# Started beforehand too (no interpreter start-up in its time): it reads the file as
# soon as it is told that the whole file is there.
WHOLE_FILE_PLAYER = """
import json, sys, time
import luna_shm
print("ready", flush=True)
path = sys.stdin.readline().strip()
data, rate = luna_shm.read_wav(path)
print(json.dumps({"first": time.monotonic(), "frames": len(data)}))
"""


def render_chunk(index: int) -> np.ndarray:
    """20 ms of a tone gliding from 220 to 440 Hz (what a TTS engine would hand over)."""
    t = (np.arange(CHUNK) + index * CHUNK) / RATE
    freq = 220.0 * (1.0 + t / SECONDS)
    return (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)


def main() -> int:
    path = luna_shm.get_temp_audio_path(".wav")  # the player may open it before we write
    whole_path = luna_shm.get_temp_audio_path(".wav")
    player = subprocess.Popen([sys.executable, "-c", LIVE_PLAYER, path],
                              stdout=subprocess.PIPE, text=True)
    whole_player = subprocess.Popen([sys.executable, "-c", WHOLE_FILE_PLAYER],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert player.stdout is not None and whole_player.stdout is not None
        player.stdout.readline()  # "ready": it follows the (still empty) file
        whole_player.stdout.readline()
        chunks: list[np.ndarray] = []
        start = time.monotonic()
        first_ready = 0.0
        with luna_shm.WavWriter(path, RATE) as writer:
            for i in range(int(SECONDS * 50)):
                # Real time: chunk i is ready 20 ms after chunk i-1.
                time.sleep(max(0.0, start + (i + 1) * 0.020 - time.monotonic()))
                chunk = render_chunk(i)
                if i == 0:
                    first_ready = time.monotonic()
                writer.write(chunk)
                chunks.append(chunk)
        live = json.loads(player.communicate(timeout=60)[0])

        # Whole-file hand-off: the player gets the file when the utterance is rendered.
        luna_shm.write_wav(whole_path, np.concatenate(chunks), RATE)
        whole = json.loads(whole_player.communicate(whole_path + "\n", timeout=60)[0])
    finally:
        for child in (player, whole_player):
            if child.poll() is None:
                child.kill()
                child.communicate()
        luna_shm.cleanup_temp_audio(path)
        luna_shm.cleanup_temp_audio(whole_path)
    total = sum(len(c) for c in chunks)
    assert live["frames"] == whole["frames"] == total, (live, whole, total)
    live_ms = (live["first"] - first_ready) * 1000
    whole_ms = (whole["first"] - first_ready) * 1000
    print(f"rendered {total / RATE:.2f} s in 20 ms chunks at real time; the player got "
          f"all {total} frames both ways")
    print(f"first audio, live follow:        {live_ms:8.2f} ms after the first chunk was ready")
    print(f"first audio, whole-file hand-off: {whole_ms:8.2f} ms after the first chunk was ready")
    print(f"live follow played {whole_ms / max(live_ms, 1e-3):.0f}x sooner")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
