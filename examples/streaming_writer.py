"""Streaming TTS into a WAV that is valid after every 20 ms chunk (luna_shm.WavWriter).

A player may open the file at any moment and reads a correct WAV of what is
there so far; here we check that mid-stream with read_wav.

Run: python examples/streaming_writer.py
"""

from __future__ import annotations

import numpy as np

import luna_shm

RATE = 16000
CHUNK = RATE * 20 // 1000  # 20 ms = 320 frames


def synth_chunks(seconds: float = 1.0) -> list[np.ndarray]:
    """A rising chirp cut into 20 ms int16 chunks, as a streaming TTS yields them."""
    t = np.arange(int(RATE * seconds)) / RATE
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t)
    audio = (chirp * 32767).astype(np.int16)
    return [audio[i:i + CHUNK] for i in range(0, len(audio), CHUNK)]


def main() -> int:
    chunks = synth_chunks()
    with luna_shm.WavWriter(None, RATE, channels=1, dtype="int16") as writer:
        path = writer.path
        try:
            for i, chunk in enumerate(chunks, 1):
                writer.write(chunk)
                if i % 10 == 0:  # what a player that opens the file now would see
                    so_far, _ = luna_shm.read_wav(path, mmap=False)
                    print(f"after {i:2d} chunks ({i * 20} ms): the file is a valid WAV "
                          f"of {len(so_far)} frames")
        except BaseException:
            writer.close()  # a file its writer still holds is not removed
            luna_shm.cleanup_temp_audio(path)
            raise
    try:
        data, rate = luna_shm.read_wav(path, mmap=False)
        assert rate == RATE and np.array_equal(data, np.concatenate(chunks))
        print(f"{path}: {len(chunks)} chunks, {len(data)} frames, every sample matches")
    finally:
        luna_shm.cleanup_temp_audio(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
