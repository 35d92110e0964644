"""Smoke test of an installed luna_shm (make dist-check runs it from outside the checkout).

Writes and reads a WAV in a private directory, checks the samples, and prints which
interpreter and which installed copy of the package did it.
"""

import os
import sys
import tempfile

import numpy as np

import luna_shm

assert "site-packages" in luna_shm.__file__, f"not the installed package: {luna_shm.__file__}"
with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "smoke.wav")
    audio = np.arange(-100, 100, dtype=np.int16)
    luna_shm.write_wav(path, audio, 16000)
    back, rate = luna_shm.read_wav(path, mmap=False)
    assert rate == 16000 and np.array_equal(back, audio), (rate, back[:5])
print(f"installed luna_shm works on Python {sys.version.split()[0]}: {luna_shm.__file__}")
