"""Objects that own open files in this process are never pickled or copied.

A pickle would carry fd numbers that mean nothing in another process (a
multiprocessing worker, a spawn); a copy would share the object's fds, lock and
mapping with a second owner, and each would close them under the other.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import numpy as np
import pytest

from luna_shm import (
    AudioCache,
    AudioPool,
    WavWriter,
    afollow_wav,
    create_wav_buffer,
    read_wav,
    write_wav,
)

AUDIO = np.arange(16, dtype=np.int16)


def _objects(stack: ExitStack) -> Iterator[tuple[str, Any]]:
    """Each kind of object that owns files, made and closed by stack."""
    buffer = stack.enter_context(create_wav_buffer(16, 8000))
    yield "WavBuffer", buffer
    yield "WavWriter", stack.enter_context(WavWriter(None, samplerate=8000))
    pool = stack.enter_context(AudioPool(slots=2, max_bytes=4096))
    yield "AudioPool", pool
    yield "PooledWav", stack.enter_context(pool.write_wav(AUDIO, 8000))
    cache = AudioCache("notcopied", max_bytes=1 << 20)
    stack.callback(cache.destroy)
    yield "AudioCache", cache
    yield "CachedAudio", stack.enter_context(cache.put("a" * 64, AUDIO, 8000))
    follower = afollow_wav(write_wav(None, AUDIO, 8000))
    stack.callback(follower.close)
    yield "AsyncFollower", follower


KINDS = ["WavBuffer", "WavWriter", "AudioPool", "PooledWav", "AudioCache", "CachedAudio",
         "AsyncFollower"]
WAYS: dict[str, Callable[[Any], object]] = {
    "pickle": pickle.dumps, "copy.copy": copy.copy, "copy.deepcopy": copy.deepcopy}


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("kind", KINDS)
def test_an_object_that_owns_files_refuses_pickle_and_copy_naming_its_class(
        private_dirs: Any, kind: str, way: str) -> None:
    with ExitStack() as stack:
        obj = dict(_objects(stack))[kind]
        with pytest.raises(TypeError, match=rf"^a {kind} cannot be pickled or copied: it "
                                            r"owns open files in this process"):
            WAYS[way](obj)
        assert not getattr(obj, "closed", False)  # the refusal touched nothing
    assert getattr(obj, "closed", True)


def test_a_buffer_passed_to_a_spawned_worker_is_refused_in_the_parent(
        private_dirs: Any) -> None:
    # What a user of multiprocessing meets: the argument is pickled at start(), in this
    # process, and the refusal says what to pass instead; the buffer stays usable here.
    with create_wav_buffer(16, 8000) as buffer:
        worker = multiprocessing.get_context("spawn").Process(target=print, args=(buffer,))
        with pytest.raises(TypeError, match="give another process the path"):
            worker.start()
        buffer.array[:] = AUDIO
        assert np.array_equal(read_wav(buffer.path)[0], AUDIO)
        assert os.path.exists(buffer.path)
