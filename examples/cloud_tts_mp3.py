"""Encoded audio from a cloud TTS (MP3 bytes or a stream of chunks) into a RAM-disk file.

Cloud clients such as ElevenLabs return an iterator of MP3 chunks;
luna_shm.save_temp_audio writes them to a new temp file (RAM disk first, mode
0600) in a few writev calls and returns the path for a player.

Run: python examples/cloud_tts_mp3.py
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import luna_shm
from luna_shm.saved import save_temp_audio


def fake_tts_stream(chunks: int = 40, chunk_size: int = 4096) -> Iterator[bytes]:
    """Stand-in for a cloud client's stream: an ID3 tag, then MPEG frame-like chunks."""
    yield b"ID3\x04\x00\x00\x00\x00\x00\x00"
    for i in range(chunks):
        yield b"\xff\xfb\x90\x64" + bytes([i % 256]) * (chunk_size - 4)


def main() -> int:
    expected = b"".join(fake_tts_stream())

    streamed = save_temp_audio(fake_tts_stream(), ".mp3")  # an iterator of chunks
    whole = save_temp_audio(expected, ".mp3")  # or all the bytes at once
    try:
        for path in (streamed, whole):
            with open(path, "rb") as f:
                assert f.read() == expected, f"{path} does not hold the stream"
            mode = os.stat(path).st_mode & 0o777
            print(f"saved {os.path.getsize(path)} bytes to {path} (mode {mode:o})")
        # ... hand `streamed` to a player (mpv, ffplay, sox with libsox-fmt-mp3) here ...
    finally:
        luna_shm.cleanup_temp_audio(streamed)
        luna_shm.cleanup_temp_audio(whole)
    print("cleaned up both files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
