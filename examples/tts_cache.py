"""A TTS cache: espeak-ng renders each sentence once, every later request plays it from RAM.

luna_shm.AudioCache keeps rendered utterances on the RAM disk, bounded (LRU, TTL)
and shared by every process of this user. get_or_render renders a missing
sentence once, however many threads or processes ask for it at the same time:
the others wait for that render and get the same entry.

Run: python examples/tts_cache.py  (espeak-ng speaks; without it, a tone stands in)
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import threading
import time

import numpy as np

import luna_shm
from luna_shm import AudioCache, WavWriter, cache_key

VOICE = "en-us"
SAMPLERATE = 22050  # espeak-ng's output rate


def espeak_render(text: str) -> object:
    """A render function: streams espeak-ng's WAV output into the cache's writer."""

    def render(writer: WavWriter) -> None:
        if shutil.which("espeak-ng") is None:
            t = np.arange(SAMPLERATE // 2) / SAMPLERATE
            writer.write((np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16))
            return
        with subprocess.Popen(["espeak-ng", "-v", VOICE, "--stdout", text],
                              stdout=subprocess.PIPE) as tts:
            assert tts.stdout is not None
            header = tts.stdout.read(44)  # RIFF/fmt/data: espeak-ng streams, sizes unknown
            if header[:4] != b"RIFF" or header[36:40] != b"data":
                raise RuntimeError(f"espeak-ng wrote an unexpected header: {header!r}")
            (rate,) = struct.unpack_from("<I", header, 24)
            if rate != SAMPLERATE:
                raise RuntimeError(f"espeak-ng speaks at {rate} Hz, expected {SAMPLERATE}")
            leftover = b""
            while chunk := tts.stdout.read(8192):  # ~190 ms of audio per chunk
                chunk = leftover + chunk
                usable = len(chunk) - len(chunk) % 2
                writer.write(np.frombuffer(chunk[:usable], np.int16))
                leftover = chunk[usable:]
            if tts.wait() != 0:
                raise RuntimeError(f"espeak-ng exited {tts.returncode}")

    return render


def say(cache: AudioCache, text: str) -> tuple[np.ndarray, float, bool]:
    """The audio of text (from the cache, or rendered into it), the seconds it took,
    and whether it was a hit."""
    key = cache_key(text, voice=VOICE, engine="espeak-ng")
    started = time.perf_counter()
    hit = key in cache
    with cache.get_or_render(key, espeak_render(text), samplerate=SAMPLERATE) as entry:
        audio = entry.array.copy()  # a player would read entry.path or entry.array here
    return audio, time.perf_counter() - started, hit


def main() -> int:
    cache = AudioCache("tts_cache_example", max_bytes=16 * 1024 * 1024, ttl=24 * 3600)
    try:
        first, first_time, _ = say(cache, "Timer set for five minutes.")
        again, again_time, hit = say(cache, "Timer set for five minutes.")
        assert hit and np.array_equal(first, again)
        print(f"rendered {len(first) / SAMPLERATE:.2f} s of speech in {first_time * 1e3:.1f} ms;"
              f" the second request was a hit in {again_time * 1e3:.2f} ms")

        # Four threads ask for a sentence nobody has rendered yet: one renders it.
        results: list[np.ndarray] = []
        threads = [threading.Thread(target=lambda: results.append(say(cache, "OK.")[0]))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(np.array_equal(results[0], r) for r in results)
        stats = cache.stats()
        print(f"4 threads, 1 render: {stats.renders} renders in all, {stats.entries} entries, "
              f"{stats.bytes} bytes, {stats.hits} hits, {stats.misses} misses")
        assert stats.renders == 2

        # Pinned while held: clear() spares an entry someone is playing.
        with cache.get(cache_key("OK.", voice=VOICE, engine="espeak-ng")) as playing:
            cache.clear()
            print(f"clear() kept the entry being played: {playing.path}")
        assert luna_shm.cleanup_all_temp_audio() == 0  # never touches cache entries
    finally:
        cache.destroy()  # the example leaves nothing behind
    print("removed the example's cache")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
