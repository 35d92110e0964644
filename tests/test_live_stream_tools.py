"""Live streams proven with real parts: espeak-ng renders, a WavWriter streams, sox reads."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import numpy as np

from helpers import call_with_deadline, require_tool
from luna_shm import WavWriter, iter_wav_stream

TEXT = "Play while it renders: the player starts on the first twenty milliseconds."
SOX_RAW = ["-t", "raw", "-e", "signed-integer", "-b", "16", "-L", "-"]


def espeak_reference(espeak: str) -> tuple[bytes, int]:
    """What espeak-ng renders for TEXT: (its int16 samples, its sample rate)."""
    whole = subprocess.run([espeak, "--stdout", TEXT], capture_output=True, check=True,
                           timeout=60).stdout
    assert whole[36:40] == b"data"  # espeak-ng writes a plain 44-byte header
    return whole[44:], int.from_bytes(whole[24:28], "little")


def stream_espeak_into(writer_path: Path, espeak: str, rate: int,
                       after_chunk: object = None) -> int:
    """Pipe espeak-ng --stdout into a WavWriter chunk by chunk as it renders; chunks written."""
    chunks = 0
    with subprocess.Popen([espeak, "--stdout", TEXT], stdout=subprocess.PIPE) as speaker:
        assert speaker.stdout is not None
        header = speaker.stdout.read(44)
        assert int.from_bytes(header[24:28], "little") == rate
        carry = b""
        with WavWriter(writer_path, rate) as writer:
            while piece := speaker.stdout.read1(4096):
                piece = carry + piece
                whole = len(piece) - len(piece) % 2
                carry = piece[whole:]
                writer.write(np.frombuffer(piece[:whole], "<i2"))
                chunks += 1
                if callable(after_chunk):
                    after_chunk()
            assert carry == b""
    assert speaker.returncode == 0
    return chunks


def test_sox_reading_the_live_file_sees_a_prefix_each_time_and_all_of_espeak_at_the_end(ram):
    espeak, sox = require_tool("espeak-ng"), require_tool("sox")
    reference, rate = espeak_reference(espeak)
    path = ram / "live.wav"
    seen: list[int] = []

    def sox_reads_the_live_file() -> None:
        got = subprocess.run([sox, "-D", str(path), *SOX_RAW], capture_output=True,
                             check=True, timeout=60).stdout
        assert reference.startswith(got)  # a valid WAV of exactly the samples so far
        seen.append(len(got))

    chunks = call_with_deadline(lambda: stream_espeak_into(path, espeak, rate,
                                                           sox_reads_the_live_file))
    assert isinstance(chunks, int) and chunks > 1
    assert seen == sorted(seen) and seen[-1] == len(reference)
    final = subprocess.run([sox, "-D", str(path), *SOX_RAW], capture_output=True, check=True,
                           timeout=60).stdout
    assert final == reference


def test_sox_reading_iter_wav_stream_from_a_pipe_gets_exactly_what_espeak_rendered(ram):
    espeak, sox = require_tool("espeak-ng"), require_tool("sox")
    reference, rate = espeak_reference(espeak)
    path = ram / "live.wav"
    out = ram / "from-pipe.raw"
    # The producer's file exists (a placeholder) before the follower starts.
    path.write_bytes(b"")
    with subprocess.Popen([sox, "-q", "-t", "wav", "-", *SOX_RAW[:-1], str(out)],
                          stdin=subprocess.PIPE) as player:
        assert player.stdin is not None
        stdin = player.stdin

        def pump() -> None:
            for piece in iter_wav_stream(path, timeout=60):
                stdin.write(piece)
                stdin.flush()
            stdin.close()

        pumping = threading.Thread(target=pump, daemon=True)
        pumping.start()
        call_with_deadline(lambda: stream_espeak_into(path, espeak, rate))
        pumping.join(60)
        assert not pumping.is_alive()
    assert player.returncode == 0
    assert out.read_bytes() == reference
