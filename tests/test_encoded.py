"""save_temp_audio: encoded audio (bytes or a stream of chunks) into a new temp file."""

from __future__ import annotations

import errno
import os
import socket
import ssl
import stat
from collections.abc import Iterator

import numpy as np
import pytest

from helpers import LIST_PRIVATE_TMP, assert_child_ok, run_in_private_shm
from luna_shm import cleanup_temp_audio
from luna_shm.saved import save_temp_audio

MP3ISH = b"ID3\x04\x00" + bytes(range(256)) * 40


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_like_data_is_written_exactly_to_a_new_file_in_the_ram_dir(
        private_dirs, kind) -> None:
    path = save_temp_audio(kind(MP3ISH))
    assert os.path.dirname(path) == private_dirs.ram
    assert os.path.basename(path).startswith("luna_audio_") and path.endswith(".mp3")
    assert read(path) == MP3ISH


def test_an_iterator_of_chunks_is_written_in_order(private_dirs) -> None:
    path = save_temp_audio(chunks_of(MP3ISH, 1000))
    assert read(path) == MP3ISH


def test_chunks_of_mixed_types_and_empty_chunks_are_written_in_order(private_dirs) -> None:
    parts = [b"abc", bytearray(b"def"), b"", memoryview(b"ghi"), bytearray(), b"j"]
    assert read(save_temp_audio(parts)) == b"abcdefghij"


def test_a_stream_longer_than_one_batch_and_than_iov_max_chunks_is_whole(private_dirs) -> None:
    data = os.urandom(3 * (1 << 20) + 12345)
    path = save_temp_audio(chunks_of(data, 700))  # ~4500 chunks: several writev batches
    assert read(path) == data


def test_a_producer_that_reuses_one_bytearray_gets_each_chunk_written(private_dirs) -> None:
    def reusing_producer() -> Iterator[bytearray]:
        buffer = bytearray(4)
        for i in range(100):
            buffer[:] = i.to_bytes(4, "little")
            yield buffer

    expected = b"".join(i.to_bytes(4, "little") for i in range(100))
    assert read(save_temp_audio(reusing_producer())) == expected


def test_a_strided_memoryview_writes_its_elements(private_dirs) -> None:
    assert read(save_temp_audio(memoryview(b"aXbXcX")[::2])) == b"abc"


def test_a_multibyte_memoryview_writes_its_bytes(private_dirs) -> None:
    words = memoryview(bytearray(b"\x01\x00\x02\x00")).cast("H")
    assert read(save_temp_audio(words)) == b"\x01\x00\x02\x00"


def test_empty_data_makes_an_empty_file(private_dirs) -> None:
    assert read(save_temp_audio(b"")) == b""
    assert read(save_temp_audio(iter([]))) == b""
    # An empty view whose shape has a zero in it (memoryview cannot cast it).
    empty_2d = memoryview(bytearray(6)).cast("B", (3, 2))[:0]
    assert empty_2d.shape == (0, 2)
    assert read(save_temp_audio(empty_2d)) == b""
    assert read(save_temp_audio([b"ab", empty_2d, b"c"])) == b"abc"


def test_suffix_and_prefix_name_the_file(private_dirs) -> None:
    path = save_temp_audio(b"x", ".opus", prefix="luna_daemon_")
    name = os.path.basename(path)
    assert name.startswith("luna_daemon_") and name.endswith(".opus")


def test_the_file_is_private_to_its_owner(private_dirs) -> None:
    path = save_temp_audio(MP3ISH)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_the_returned_path_is_ours_to_clean_up(private_dirs) -> None:
    path = save_temp_audio(MP3ISH)
    assert cleanup_temp_audio(path) is True
    assert os.listdir(private_dirs.ram) == []


def test_str_data_is_a_type_error_naming_str(private_dirs) -> None:
    with pytest.raises(TypeError, match="got str"):
        save_temp_audio("not audio")
    assert os.listdir(private_dirs.ram) == []


@pytest.mark.parametrize(("data", "name"), [
    (42, "42"), (None, "None"), (3.5, "3.5"),
    (np.zeros(4, np.int16), "a numpy array of shape (4,) and dtype int16"),
])
def test_data_that_is_neither_bytes_nor_iterable_is_a_type_error_naming_it(
        private_dirs, data, name: str) -> None:
    with pytest.raises(TypeError) as info:
        save_temp_audio(data)
    assert str(info.value).endswith(f", got {name}")
    assert os.listdir(private_dirs.ram) == []


@pytest.mark.parametrize(("data", "why"), [
    ({b"RIFF": 1, b"data": 2}, "iterating a mapping yields its keys"),
    ({b"one": b"two"}.keys(), "a set holds its items in no order"),
    ({b"one": b"two"}.items(), "a set holds its items in no order"),
    ({b"a", b"b"}, "a set holds its items in no order"),
    (frozenset({b"a"}), "a set holds its items in no order"),
    ({}, "iterating a mapping yields its keys"),
    (iter({b"a", b"b"}), "a set holds its items in no order"),
    (iter({b"RIFF": 1, b"data": 2}), "iterating a mapping yields its keys"),
], ids=["dict", "dict-keys", "dict-items", "set", "frozenset", "empty-dict", "iter-set",
        "iter-dict"])
def test_a_mapping_or_set_is_a_type_error_naming_its_type_and_saves_nothing(
        private_dirs, data, why: str) -> None:
    kind = type(data).__name__
    with pytest.raises(TypeError, match=rf"ordered iterable .* got a {kind} .*{why}"):
        save_temp_audio(data)
    assert os.listdir(private_dirs.ram) == []


@pytest.mark.parametrize(("data", "message"), [
    ((n for n in [1, 2]), "chunk 0 of data must be bytes, bytearray or memoryview, got 1$"),
    ([b"ok", None], "chunk 1 of data must be bytes, bytearray or memoryview, got None$"),
    ([[b"nested"]], r"chunk 0 of data must be .* got \[b'nested'\]$"),
], ids=["generator-of-ints", "list-with-none", "nested-list"])
def test_chunks_that_are_not_bytes_are_a_type_error_naming_the_chunk(
        private_dirs, data, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        save_temp_audio(data)
    assert os.listdir(private_dirs.ram) == []


def test_a_buffer_that_is_not_bytes_bytearray_or_memoryview_is_refused(private_dirs) -> None:
    import array

    with pytest.raises(TypeError, match=r"got array\('h', \[1, 2, 3\]\)$"):
        save_temp_audio(array.array("h", [1, 2, 3]))


def test_a_str_chunk_is_a_type_error_and_the_file_is_removed(private_dirs) -> None:
    with pytest.raises(TypeError, match=r"chunk 1 of data must be bytes.*got 'text'$"):
        save_temp_audio([b"ok", "text", b"never"])
    assert os.listdir(private_dirs.ram) == []


def test_an_exception_from_the_iterator_propagates_and_the_file_is_removed(
        private_dirs) -> None:
    def failing_stream() -> Iterator[bytes]:
        yield b"x" * 5000
        raise ConnectionResetError(errno.ECONNRESET, "the TTS service hung up")

    with pytest.raises(ConnectionResetError, match="the TTS service hung up"):
        save_temp_audio(failing_stream())
    assert os.listdir(private_dirs.ram) == []


class _ClientError(OSError):
    """An HTTP client's own error class, as some subclass OSError."""


@pytest.mark.parametrize("error", [
    ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
    socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    _ClientError(errno.EIO, "stream ended early"),
    ConnectionResetError(errno.ECONNRESET, "the TTS service hung up"),
], ids=["SSLError", "gaierror", "subclass", "ConnectionResetError"])
def test_an_oserror_from_the_iterator_propagates_as_itself_without_our_filename(
        private_dirs, error: OSError) -> None:
    # The TTS client's own error (an ssl.SSLError is an OSError with errno 1) must reach
    # the caller's `except ssl.SSLError`, not come back as PermissionError naming our file.
    def stream() -> Iterator[bytes]:
        yield b"ID3" + b"\0" * 100
        raise error

    with pytest.raises(OSError) as info:
        save_temp_audio(stream())
    assert info.value is error
    assert error.filename is None
    assert os.listdir(private_dirs.ram) == []


@pytest.mark.parametrize("wrap", [lambda view: view, lambda view: [b"ID3", view]],
                         ids=["data", "chunk"])
@pytest.mark.parametrize("array", [
    np.array([None, "x"], dtype=object),
    np.zeros(2, dtype=[("name", object), ("size", np.int32)]),
], ids=["object", "record-with-an-object"])
def test_a_memoryview_of_python_objects_is_refused_not_written_as_pointers(
        private_dirs, wrap, array) -> None:
    # Its bytes are the addresses of objects in this process: nothing any file should hold.
    with pytest.raises(TypeError, match=r"memoryview of Python objects \(format '.*O.*'\)"):
        save_temp_audio(wrap(memoryview(array)))
    assert os.listdir(private_dirs.ram) == []


def test_a_suffix_with_a_slash_is_refused_before_any_file_is_made(private_dirs) -> None:
    with pytest.raises(ValueError, match="suffix must not contain '/'"):
        save_temp_audio(b"x", "/../evil.mp3")
    assert os.listdir(private_dirs.ram) == []


@pytest.mark.parametrize("given", ["data", "[data[:1000], data[1000:]]",
                                   "(data[:1000], bytearray(data[1000:]))"],
                         ids=["bytes", "a-list-of-chunks", "a-tuple-of-chunks"])
def test_bytes_too_big_for_a_small_ram_disk_go_to_the_fallback_dir(given: str) -> None:
    # A list or tuple of chunks can be replayed and its size is known, as bytes; found in
    # review: it was taken for a stream, so a RAM disk without room raised ENOSPC.
    done = run_in_private_shm(f"""
        import os
        from luna_shm.saved import save_temp_audio
        data = os.urandom(256 * 1024)
        path = save_temp_audio({given})
        with open(path, "rb") as f:
            assert f.read() == data
        print(os.path.dirname(path), len(os.listdir("/dev/shm")))
    """, shm_size="64k")
    assert assert_child_ok(done).split() == ["/tmp", "0"]


def test_a_stream_that_fills_the_ram_disk_raises_enospc_and_leaves_nothing() -> None:
    done = run_in_private_shm("""
        import errno, os
        from luna_shm.saved import save_temp_audio
        chunks = (b"x" * 4096 for _ in range(64))
        try:
            save_temp_audio(chunks)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            assert exc.filename.startswith("/dev/shm/luna_audio_"), exc
            print("ENOSPC", os.listdir("/dev/shm"), """ + LIST_PRIVATE_TMP + """)
    """, shm_size="64k")
    assert assert_child_ok(done).strip() == "ENOSPC [] []"


def test_a_stream_being_saved_is_never_removed_by_a_concurrent_cleanup(private_dirs) -> None:
    from luna_shm import cleanup_all_temp_audio

    removed_midway: list[int] = []

    def chunks():
        yield b"ID3" + b"\0" * 1000
        # The file exists and is half written: a cleanup now must leave it alone.
        removed_midway.append(cleanup_all_temp_audio())
        yield b"\xff\xfb" * 500

    path = save_temp_audio(chunks(), suffix=".mp3")
    assert removed_midway == [0]
    with open(path, "rb") as saved:
        assert saved.read() == b"ID3" + b"\0" * 1000 + b"\xff\xfb" * 500
