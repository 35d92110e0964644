"""luna_shm: temporary audio on a RAM disk, moved in and out of numpy without copies.

Temp files (a drop-in for the ``get_temp_audio_path`` helper):
    get_temp_audio_path, temp_audio_path (a context manager), cleanup_temp_audio,
    cleanup_all_temp_audio, is_using_ram_disk, temp_dir, refresh_temp_dir
WAV I/O:
    write_wav, read_wav, create_wav_buffer / WavBuffer, WavWriter, AudioPool;
    prefault_wav_buffers / prefault_stats (buffers from pre-faulted files)
Live streams (play while it renders):
    follow_wav, afollow_wav (an AsyncFollower), iter_wav_stream; StreamAbandoned
A TTS cache:
    AudioCache, CachedAudio, cache_key
Hand-offs:
    save_temp_audio (encoded bytes, e.g. MP3 from a cloud TTS), send_wav / recv_wav
Errors:
    WavError (a ValueError) for malformed WAV files, LunaShmError its base;
    OSError(errno, strerror, filename) for system failures.
"""

from luna_shm.buffer import (
    PrefaultStats,
    WavBuffer,
    create_wav_buffer,
    prefault_stats,
    prefault_wav_buffers,
)
from luna_shm.cache import AudioCache, CachedAudio, cache_key
from luna_shm.errors import HandoffError, LunaShmError, StreamAbandoned, WavError
from luna_shm.follow import AsyncFollower, afollow_wav, follow_wav, iter_wav_stream
from luna_shm.handoff import recv_wav, send_wav
from luna_shm.pool import AudioPool, PooledWav
from luna_shm.saved import save_temp_audio
from luna_shm.temp_audio import (
    AUDIO_PREFIX,
    DAEMON_PREFIX,
    FALLBACK_DIR,
    RAM_DISK_DIR,
    cleanup_all_temp_audio,
    cleanup_temp_audio,
    get_temp_audio_path,
    is_using_ram_disk,
    iter_unused_temp_audio,
    refresh_temp_dir,
    temp_audio_path,
    temp_dir,
)
from luna_shm.wav import read_wav, write_wav
from luna_shm.writer import WavWriter

__version__ = "0.1.0"

__all__ = [
    "AUDIO_PREFIX",
    "DAEMON_PREFIX",
    "FALLBACK_DIR",
    "RAM_DISK_DIR",
    "AsyncFollower",
    "AudioCache",
    "AudioPool",
    "CachedAudio",
    "HandoffError",
    "LunaShmError",
    "PooledWav",
    "PrefaultStats",
    "StreamAbandoned",
    "WavBuffer",
    "WavError",
    "WavWriter",
    "afollow_wav",
    "cache_key",
    "cleanup_all_temp_audio",
    "cleanup_temp_audio",
    "create_wav_buffer",
    "follow_wav",
    "get_temp_audio_path",
    "is_using_ram_disk",
    "iter_unused_temp_audio",
    "iter_wav_stream",
    "prefault_stats",
    "prefault_wav_buffers",
    "read_wav",
    "recv_wav",
    "refresh_temp_dir",
    "save_temp_audio",
    "send_wav",
    "temp_audio_path",
    "temp_dir",
    "write_wav",
]


def __dir__() -> list[str]:
    """Only the public API, not the submodules."""
    return list(__all__)
