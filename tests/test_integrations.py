"""The programs users wire to luna_shm, for real: espeak-ng and soundfile write, sox plays."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from helpers import require_tool
from luna_shm import create_wav_buffer, get_temp_audio_path, read_wav
from luna_shm._lowlevel import HAS_MEMFD

SENTENCE = "Temporary audio on a RAM disk, read back without a copy."


def sox_stat(path: str) -> dict[str, str]:
    """What `sox PATH -n stat` (a player that decodes the whole file) reports."""
    sox = require_tool("sox")
    done = subprocess.run([sox, path, "-n", "stat"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pairs = (line.split(":", 1) for line in done.stderr.splitlines() if ":" in line)
    return {" ".join(key.split()): value.strip() for key, value in pairs}


@pytest.fixture
def spoken(private_dirs) -> str:
    """A luna_shm path that espeak-ng has written a sentence into."""
    espeak = require_tool("espeak-ng")
    path = get_temp_audio_path(".wav")
    subprocess.run([espeak, "-w", path, SENTENCE], check=True, capture_output=True, timeout=60)
    return path


def test_espeak_ng_speaks_into_a_luna_shm_path_that_read_wav_reads(
        private_dirs, spoken: str) -> None:
    assert spoken.startswith(private_dirs.ram + "/luna_audio_")
    data, rate = read_wav(spoken)
    assert rate == 22050 and data.dtype == np.int16 and data.ndim == 1
    assert 1.0 < len(data) / rate < 15.0  # a sentence of about ten words
    assert np.abs(data.astype(np.int32)).max() > 1000  # speech, not silence


def test_sox_plays_what_espeak_ng_wrote_for_as_long_as_read_wav_says(spoken: str) -> None:
    data, rate = read_wav(spoken)
    assert float(sox_stat(spoken)["Length (seconds)"]) == pytest.approx(len(data) / rate,
                                                                       abs=1e-5)


def test_soundfile_writes_into_a_luna_shm_path_that_read_wav_and_sox_read(
        private_dirs) -> None:
    soundfile = pytest.importorskip("soundfile")
    path = get_temp_audio_path(".wav")
    t = np.arange(24000) / 24000
    audio = (0.25 * np.sin(2 * np.pi * 330 * t) * 32767).astype(np.int16)
    soundfile.write(path, audio, 24000, subtype="PCM_16")
    data, rate = read_wav(path)
    assert rate == 24000
    np.testing.assert_array_equal(data, audio)
    assert float(sox_stat(path)["Length (seconds)"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("anonymous", [
    pytest.param(True, id="anonymous", marks=pytest.mark.skipif(
        not HAS_MEMFD, reason="no memfd_create on this platform")),
    pytest.param(False, id="named"),
])
def test_sox_plays_a_wav_buffer_by_its_path_while_it_is_open(
        private_dirs, anonymous: bool) -> None:
    with create_wav_buffer(16000, 16000, anonymous=anonymous) as buf:
        buf.array[:] = 16384  # half of full scale, every sample
        stats = sox_stat(buf.path)  # for an anonymous buffer: /proc/<pid>/fd/<n>
    assert float(stats["Length (seconds)"]) == pytest.approx(1.0, abs=1e-5)
    assert float(stats["Maximum amplitude"]) == pytest.approx(0.5, abs=1e-4)
