"""The TTS-daemon pattern: a daemon renders into an anonymous buffer and hands it over.

The daemon process renders each request into an anonymous WavBuffer (a memfd:
no file name anywhere, nothing to clean up, nothing leaked if it crashes) and
sends its file descriptor over a Unix socket with luna_shm.handoff.send_wav.
The client maps the same memory with recv_wav: the samples never travel
through the socket and are never copied.

Run: python examples/daemon_handoff.py
"""

from __future__ import annotations

import multiprocessing
import socket

import numpy as np

import luna_shm
from luna_shm.handoff import recv_wav, send_wav

RATE = 16000


def daemon(sock: socket.socket) -> None:
    """Serve requests ("<frequency in Hz>") until the client hangs up."""
    with sock:
        while request := sock.recv(64):
            frequency = float(request.decode())
            with luna_shm.create_wav_buffer(RATE // 2, RATE, dtype="int16",
                                            anonymous=True) as buf:
                t = np.arange(buf.frames) / RATE
                # "The TTS model" renders straight into the shared memory.
                buf.array[:] = 0.3 * 32767 * np.sin(2 * np.pi * frequency * t)
                send_wav(sock, buf)
            # Closed here, yet the client's view stays valid: it holds the memory now.


def main() -> int:
    client, daemon_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process = multiprocessing.get_context("spawn").Process(target=daemon, args=(daemon_end,))
    process.start()
    daemon_end.close()
    try:
        for frequency in (220, 440, 880):
            client.sendall(str(frequency).encode())
            data, rate = recv_wav(client)
            peak = np.argmax(np.abs(np.fft.rfft(data))) * rate / len(data)
            print(f"asked for {frequency} Hz: got {len(data)} frames at {rate} Hz, peak "
                  f"{peak:.0f} Hz, zero-copy view: {not data.flags.owndata}, "
                  f"read-only: {not data.flags.writeable}")
            assert abs(peak - frequency) < 5
    finally:
        client.close()  # the daemon sees EOF and exits
        process.join(timeout=30)
    print(f"daemon exited with code {process.exitcode}")
    return 0 if process.exitcode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
