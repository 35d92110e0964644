"""No luna_shm mapping can kill its process with SIGBUS (csrc/guard.c).

Every victim runs in a child process (a SIGBUS there fails the test instead of killing
pytest); the file under it is truncated or rewritten for real by another process (this
one, or a forked sender). Each is run with faulthandler off, enabled before luna_shm is
imported (``-X faulthandler``), enabled after the import (before the mapping: our
handler is put back in front when the mapping is registered) and enabled after the
mapping was made (faulthandler then runs first and re-raises the signal without its
address). The controls check that every other SIGBUS still kills the process as before.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable

import numpy as np
import pytest
import soundfile as sf

from helpers import LIBRARY_PATH, samples
from luna_shm import create_wav_buffer, read_wav, write_wav
from luna_shm._lowlevel import HAS_MEMFD, STALE_MESSAGE

RATE = 16000
FAULTHANDLER = ["off", "before-import", "after-import", "after-mapping"]

TRUNCATIONS: dict[str, Callable[[str], object]] = {
    "os.truncate": lambda path: os.truncate(path, 44),
    "open-wb": lambda path: open(path, "wb").close(),
    "soundfile.write": lambda path: sf.write(path, np.ones(10, np.int16), RATE),
}


def _child(body: str, faulthandler: str) -> subprocess.Popen[str]:
    """Start a child running body (dedented) under the given faulthandler set-up.

    body may hold the markers ``#AFTER_IMPORT`` and ``#AFTER_MAPPING`` on lines of
    their own: faulthandler is enabled there for those two modes."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONDEVMODE", "PYTHONFAULTHANDLER")}
    env["PYTHONPATH"] = LIBRARY_PATH
    code = textwrap.dedent(body)
    enable = "import faulthandler; faulthandler.enable()"
    code = code.replace("#AFTER_IMPORT", enable if faulthandler == "after-import" else "pass")
    code = code.replace("#AFTER_MAPPING", enable if faulthandler == "after-mapping" else "pass")
    flags = ["-X", "faulthandler"] if faulthandler == "before-import" else []
    return subprocess.Popen([sys.executable, *flags, "-c", code], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _run(body: str, faulthandler: str, meddle: Callable[[], object] = lambda: None,
         ) -> tuple[int, str, str]:
    """Run a child that prints "ready" once its mappings exist and waits for a line;
    meddle runs in between. Return its exit code, stdout and stderr."""
    child = _child(body, faulthandler)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if line == "ready\n":
            meddle()
        out, err = child.communicate("go\n", timeout=120)
        out = line + out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, out, err


def _ok(code: int, out: str, err: str) -> dict[str, object]:
    """The child's last stdout line as JSON; fail with its output unless it exited 0."""
    assert code == 0, f"the child died ({code}):\n{out}\n{err}"
    result: dict[str, object] = json.loads(out.splitlines()[-1])
    return result


# ---- read_wav views -----------------------------------------------------------------------


@pytest.mark.parametrize("faulthandler", FAULTHANDLER)
@pytest.mark.parametrize("truncation", list(TRUNCATIONS))
def test_a_mapped_read_wav_array_survives_its_file_being_truncated_by_another_process(
        private_dirs, truncation, faulthandler) -> None:
    path = f"{private_dirs.ram}/shared.wav"
    original = (np.arange(300_000) % 9000 + 1).astype(np.int16)
    write_wav(path, original, RATE)
    body = f"""
        import json, sys
        import numpy as np
        from luna_shm import read_wav
        #AFTER_IMPORT
        data, rate = read_wav({path!r})
        first = int(data[:1000].astype(np.int64).sum())  # pages that were read before
        #AFTER_MAPPING
        print("ready", flush=True)
        sys.stdin.readline()
        total = int(data.astype(np.int64).sum())  # every page, most of them gone
        print(json.dumps({{"first": first, "total": total, "frames": len(data)}}))
    """
    result = _ok(*_run(body, faulthandler, lambda: TRUNCATIONS[truncation](path)))
    # At the first page that is gone the whole mapping became zeros; only what the pages
    # before held by then was read (soundfile.write's ten new samples of 1, on the first).
    new_samples = 10 if truncation == "soundfile.write" else 0
    assert result == {"first": int(original[:1000].astype(np.int64).sum()),
                      "total": new_samples, "frames": len(original)}


CUT_VIEW_USES = {
    # A view of a cut file handed to a call whose system call reads or writes it: the kernel
    # answers EFAULT there instead of a SIGBUS, which the guard would have absorbed.
    "write_wav": "write_wav(out_path, view, 16000)",
    "write_wav-temp": "out_path = write_wav(None, view, 16000)",
    "write_wav-atomic": "write_wav(out_path, view, 16000, atomic=True)",
    "WavWriter.write": "w = WavWriter(out_path, 16000); w.write(view); w.close()",
    "read_wav-out": "read_wav(out_path, out=view)",
}


@pytest.mark.parametrize("use", list(CUT_VIEW_USES))
def test_a_view_of_a_cut_file_given_to_a_system_call_reads_or_writes_as_numpy_would(
        private_dirs, use) -> None:
    # The kernel reads or writes the view's memory itself and answers EFAULT at a lost page
    # instead of raising SIGBUS: these calls raised OSError(EFAULT, "Bad address") naming
    # the other file (the destination, or the source read), where numpy reads zeros.
    path, out_path = f"{private_dirs.ram}/cut.wav", f"{private_dirs.ram}/out.wav"
    reading = use == "read_wav-out"
    if reading:
        write_wav(out_path, np.full(300_000, 6, np.int16), RATE)
    else:
        write_wav(path, np.full(300_000, 5, np.int16), RATE)
    body = f"""
        import json, sys
        import numpy as np
        from luna_shm import WavWriter, create_wav_buffer, read_wav, write_wav
        path, out_path = {path!r}, {out_path!r}
        if {reading}:
            buf = create_wav_buffer(300_000, 16000, path=path)
            view = buf.array
        else:
            view = read_wav(path)[0]
        print("ready", flush=True)
        sys.stdin.readline()
        {CUT_VIEW_USES[use]}
        result = {{"view": np.unique(view).tolist()}}
        if {reading}:
            try:
                buf.array
            except OSError as exc:
                result["error"] = exc.errno
            buf.close()
        else:
            written = read_wav(out_path, mmap=False)[0]
            fives = int(np.count_nonzero(written == 5))
            result["written"] = [len(written), fives, bool((written[fives:] == 0).all())]
        print(json.dumps(result))
    """
    result = _ok(*_run(body, "off", lambda: os.truncate(path, 44)))
    if reading:
        # Read in whole, into zero pages that no file sees; the buffer says its file was cut.
        assert result == {"view": [6], "error": errno.ESTALE}
    else:
        # What a copy gives: the samples before the first lost page (at most the first
        # page's), then zeros.
        assert result["view"] == [0]
        frames, fives, zeros_after = result["written"]
        assert frames == 300_000 and fives <= (4096 - 44) // 2 and zeros_after


def test_thousands_of_mapped_arrays_are_guarded_and_only_the_truncated_one_reads_zeros(
        private_dirs) -> None:
    # The registry grows in blocks: 3000 views span many; the truncated one is in the middle.
    paths = [f"{private_dirs.ram}/f{i}.wav" for i in range(3)]
    for i, path in enumerate(paths):
        write_wav(path, np.full(5000, i + 1, np.int16), RATE)
    body = f"""
        import json, sys
        import numpy as np
        from luna_shm import read_wav
        paths = {paths!r}
        views = [read_wav(paths[i * 3 // 3000])[0] for i in range(3000)]
        print("ready", flush=True)
        sys.stdin.readline()
        sums = [int(v.astype(np.int64).sum()) for v in views]
        print(json.dumps({{"sums": sorted(set(sums))}}))
    """
    result = _ok(*_run(body, "off", lambda: os.truncate(paths[1], 0)))
    assert result == {"sums": [0, 5000, 15000]}


@pytest.mark.parametrize("faulthandler", FAULTHANDLER)
def test_faults_in_several_threads_at_once_are_all_absorbed(private_dirs,
                                                             faulthandler) -> None:
    shared = f"{private_dirs.ram}/shared.wav"
    own = [f"{private_dirs.ram}/t{i}.wav" for i in range(4)]
    for path in [shared, *own]:
        write_wav(path, np.ones(400_000, np.int16), RATE)
    body = f"""
        import json, sys, threading
        import numpy as np
        from luna_shm import read_wav
        #AFTER_IMPORT
        views = [read_wav(p)[0] for p in {[shared, *own]!r}]
        #AFTER_MAPPING
        barrier = threading.Barrier(8)
        sums = []
        def touch(view):
            barrier.wait()
            sums.append(int(view.astype(np.int64).sum()))
        # Four threads on the shared file, one on each own file: all fault together.
        threads = [threading.Thread(target=touch, args=(views[0],)) for _ in range(4)]
        threads += [threading.Thread(target=touch, args=(v,)) for v in views[1:]]
        print("ready", flush=True)
        sys.stdin.readline()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(json.dumps({{"sums": sums}}))
    """

    def truncate_all() -> None:
        for path in [shared, *own]:
            os.truncate(path, 44)

    result = _ok(*_run(body, faulthandler, truncate_all))
    assert result == {"sums": [0] * 8}


def test_faults_in_other_threads_while_faulthandler_reports_the_first_are_all_absorbed(
        private_dirs) -> None:
    # faulthandler, enabled after the mapping, takes the first fault: it puts our handler
    # back, prints its traceback, and re-raises without the address. A thread that faults
    # meanwhile comes to us with its address and breaks the mapping; the re-raised signal
    # then found the mapping broken by a kernel fault (which did not count), took itself
    # for a SIGBUS that is not ours, and killed the process (about 2 runs in 3 here).
    # faulthandler prints the faulting thread only: printing the others while they run
    # Python code can crash faulthandler itself (SIGSEGV in its traceback dump).
    path = f"{private_dirs.ram}/shared.wav"
    body = f"""
        import faulthandler, json, sys, threading, time
        import numpy as np
        from luna_shm import read_wav
        view = read_wav({path!r})[0]
        faulthandler.enable(all_threads=False)
        barrier = threading.Barrier(8)
        sums = []
        def touch(i):
            barrier.wait()
            time.sleep(i / 10_000)  # one after the other, while the first is reported
            sums.append(int(view[1000 * i:].astype(np.int64).sum()))
        threads = [threading.Thread(target=touch, args=(i,)) for i in range(8)]
        print("ready", flush=True)
        sys.stdin.readline()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(json.dumps({{"sums": sums}}))
    """
    for _ in range(6):
        write_wav(path, np.ones(400_000, np.int16), RATE)
        result = _ok(*_run(body, "off", lambda: os.truncate(path, 44)))
        assert result == {"sums": [0] * 8}


# ---- controls: every other SIGBUS still kills ------------------------------------------------


@pytest.mark.parametrize("faulthandler", FAULTHANDLER)
@pytest.mark.parametrize("luna_fault_first", [False, True], ids=["fresh", "after-a-luna-fault"])
@pytest.mark.parametrize("other", ["numpy.memmap", "os.kill", "signal.raise_signal"])
def test_a_sigbus_that_is_not_ours_still_kills_the_process(private_dirs, tmp_path, other,
                                                           luna_fault_first,
                                                           faulthandler) -> None:
    ours = f"{private_dirs.ram}/ours.wav"
    theirs = tmp_path / "theirs.raw"
    write_wav(ours, np.ones(100_000, np.int16), RATE)
    theirs.write_bytes(b"\1" * 1_000_000)
    body = f"""
        import os, signal, sys
        import numpy as np
        from luna_shm import read_wav
        #AFTER_IMPORT
        data = read_wav({ours!r})[0]
        theirs = np.memmap({str(theirs)!r}, dtype=np.uint8, mode="r")
        #AFTER_MAPPING
        print("ready", flush=True)
        sys.stdin.readline()
        if {luna_fault_first}:
            os.truncate({ours!r}, 44)
            print("ours", int(data.astype(np.int64).sum()), flush=True)
        if {other!r} == "numpy.memmap":
            os.truncate({str(theirs)!r}, 0)
            print(int(theirs.astype(np.int64).sum()))
        elif {other!r} == "os.kill":
            os.kill(os.getpid(), signal.SIGBUS)
        else:
            signal.raise_signal(signal.SIGBUS)
        print("survived", flush=True)
    """
    code, out, err = _run(body, faulthandler)
    assert code == -signal.SIGBUS, f"exit {code}:\n{out}\n{err}"
    assert "survived" not in out
    if luna_fault_first:
        assert "ours 0" in out


@pytest.mark.parametrize("faulthandler", ["off", "after-mapping"])
def test_a_raised_sigbus_long_after_another_threads_fault_in_a_mapping_still_kills(
        private_dirs, faulthandler) -> None:
    # A mapping another thread broke explains a re-raised signal only for as long as the
    # handler that re-raises can take (guard.c RECENT_NS, 2 s): later, raise() is not ours.
    path = f"{private_dirs.ram}/ours.wav"
    write_wav(path, np.ones(100_000, np.int16), RATE)
    body = f"""
        import signal, sys, threading, time
        import numpy as np
        from luna_shm import read_wav
        view = read_wav({path!r})[0]
        #AFTER_MAPPING
        print("ready", flush=True)
        sys.stdin.readline()
        worker = threading.Thread(target=lambda: print("ours", int(view.sum()), flush=True))
        worker.start()
        worker.join()
        time.sleep(2.5)
        signal.raise_signal(signal.SIGBUS)
        print("survived", flush=True)
    """
    code, out, err = _run(body, faulthandler, lambda: os.truncate(path, 44))
    assert code == -signal.SIGBUS, f"exit {code}:\n{out}\n{err}"
    assert "ours 0" in out and "survived" not in out


# ---- WavBuffer --------------------------------------------------------------------------------


BUFFER_PRODUCER = """
    import errno, json, sys
    import numpy as np
    from luna_shm import create_wav_buffer
    #AFTER_IMPORT
    buf = create_wav_buffer(300_000, 16000, 1, "int16")
    view = buf.array
    view[:] = 3
    #AFTER_MAPPING
    print(buf.path, flush=True)
    print("ready", flush=True)
    sys.stdin.readline()
    view[:] = 4  # the producer writes again, into every page
    errors = []
    for use in (lambda: buf.array, lambda: buf.truncate(10)):
        try:
            use()
        except OSError as exc:
            errors.append([exc.errno, exc.strerror, exc.filename == buf.path])
    buf.close()
    print(json.dumps({"errors": errors}))
"""


@pytest.mark.parametrize("faulthandler", FAULTHANDLER)
@pytest.mark.parametrize("truncation", list(TRUNCATIONS))
def test_a_buffer_whose_file_a_consumer_rewrote_raises_estale_instead_of_dying(
        private_dirs, truncation, faulthandler) -> None:
    child = _child(BUFFER_PRODUCER, faulthandler)
    try:
        assert child.stdout is not None and child.stdin is not None
        path = child.stdout.readline().strip()
        assert child.stdout.readline() == "ready\n"
        TRUNCATIONS[truncation](path)  # the consumer, another process
        out, err = child.communicate("go\n", timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    result = _ok(child.returncode, out, err)
    stale = [errno.ESTALE, STALE_MESSAGE, True]
    assert result == {"errors": [stale, stale]}


def test_the_stale_error_names_the_file_and_says_what_happened(private_dirs) -> None:
    body = """
        import sys
        from luna_shm import create_wav_buffer
        buf = create_wav_buffer(100_000, 16000)
        view = buf.array
        print(buf.path, flush=True)
        print("ready", flush=True)
        sys.stdin.readline()
        view[:] = 1
        try:
            buf.array
        except OSError as exc:
            print(exc)
        buf.close()
    """
    child = _child(body, "off")
    assert child.stdout is not None
    path = child.stdout.readline().strip()
    assert child.stdout.readline() == "ready\n"
    os.truncate(path, 0)
    out, err = child.communicate("go\n", timeout=120)
    assert child.returncode == 0, err
    assert out.strip() == (f"[Errno {errno.ESTALE}] truncated or rewritten by another process "
                           f"while mapped here; its mapping was replaced with zeros: {path!r}")


def test_a_rewrite_that_puts_every_byte_back_before_a_touch_is_not_an_error(private_dirs) -> None:
    # What the docs promise, and no more: ESTALE needs a touch of a page that was gone.
    # soundfile.write of the same length (truncate, then write) by another process while
    # the owner touched nothing: the mapping shows the new samples, writes reach the file.
    body = """
        import sys
        import numpy as np
        from luna_shm import create_wav_buffer
        buf = create_wav_buffer(100_000, 16000)
        buf.array[:] = 1
        print(buf.path, flush=True)
        sys.stdin.readline()
        view = buf.array  # no ESTALE
        print(int(view[0]), int(view[-1]), flush=True)
        view[:] = 3
        buf.close()
    """
    child = _child(body, "off")
    try:
        assert child.stdout is not None and child.stdin is not None
        path = child.stdout.readline().strip()
        sf.write(path, np.full(100_000, 2, np.int16), 16000, subtype="PCM_16")
        child.stdin.write("go\n")
        child.stdin.flush()
        seen = child.stdout.readline().split()
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert seen == ["2", "2"]
    back, _ = sf.read(path, dtype="int16")
    assert back.shape == (100_000,) and set(np.unique(back)) == {3}


@pytest.mark.parametrize("faulthandler", ["off", "after-mapping"])
def test_truncating_a_named_buffer_never_kills_a_process_that_mapped_its_file(
        private_dirs, faulthandler) -> None:
    owner_code = """
        import json, os, sys
        import numpy as np
        from luna_shm import create_wav_buffer, read_wav
        #AFTER_IMPORT
        buf = create_wav_buffer(300_000, 16000)
        buf.array[:] = np.arange(300_000) % 1000
        own = read_wav(buf.path)[0]  # the owner maps its own file too
        #AFTER_MAPPING
        size = os.path.getsize(buf.path)
        print(buf.path, flush=True)
        print("ready", flush=True)
        sys.stdin.readline()
        buf.truncate(1000)
        print(json.dumps({"own": int(own.astype(np.int64).sum()),
                          "kept": read_wav(buf.path, mmap=False)[0].tolist(),
                          "same_size": os.path.getsize(buf.path) == size}), flush=True)
        buf.close()
    """
    owner = _child(owner_code, faulthandler)
    try:
        assert owner.stdout is not None
        path = owner.stdout.readline().strip()
        reader_code = f"""
            import json, sys
            import numpy as np
            from luna_shm import read_wav
            #AFTER_IMPORT
            view = read_wav({path!r})[0]
            #AFTER_MAPPING
            print("ready", flush=True)
            sys.stdin.readline()
            print(json.dumps({{"head": view[:1000].tolist(), "frames": len(view),
                              "total": int(view.astype(np.int64).sum())}}))
        """
        reader = _child(reader_code, faulthandler)
        assert reader.stdout is not None
        assert owner.stdout.readline() == "ready\n"
        assert reader.stdout.readline() == "ready\n"
        owner_out, owner_err = owner.communicate("go\n", timeout=120)
        reader_out, reader_err = reader.communicate("go\n", timeout=120)
    finally:
        for child in (owner, reader):
            if child.poll() is None:
                child.kill()
                child.wait()
    owner_result = _ok(owner.returncode, owner_out, owner_err)
    reader_result = _ok(reader.returncode, reader_out, reader_err)
    expected_head = (np.arange(1000) % 1000).tolist()
    assert owner_result["kept"] == expected_head and owner_result["same_size"]
    # Every page of the file is still there: both views read all of it, the same.
    assert reader_result["head"] == expected_head and reader_result["frames"] == 300_000
    assert reader_result["total"] == owner_result["own"] > 0


@pytest.mark.parametrize("frames_kept", [0, 1, 997, 999, 1000])
@pytest.mark.parametrize("kind", ["named", "anonymous"])
def test_a_truncated_buffer_keeps_its_length_and_every_reader_sees_exactly_the_kept_frames(
        ram, kind, frames_kept) -> None:
    # 1000 int16 frames after a 44-byte header: keeping 999 or 1000 leaves a tail too
    # small for a chunk (2 or 0 bytes), kept past the RIFF chunk's end.
    import wave

    from scipy.io import wavfile

    if kind == "anonymous" and not HAS_MEMFD:
        pytest.skip("memfd is not available")
    data = samples("int16", 1000, 1)
    with create_wav_buffer(1000, RATE, anonymous=kind == "anonymous") as buf:
        buf.array[:] = data
        before = os.fstat(buf.fileno()).st_size
        buf.truncate(frames_kept)
        assert os.fstat(buf.fileno()).st_size == before
        back, _ = sf.read(buf.path, dtype="int16")
        rate, scipy_back = wavfile.read(buf.path)
        with wave.open(buf.path, "rb") as w:
            wave_back = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        ours, _ = read_wav(buf.path)
    for got in (back, scipy_back, wave_back, ours):
        np.testing.assert_array_equal(got, data[:frames_kept], strict=True)
    assert rate == RATE


REWRITES: dict[str, Callable[[str], object]] = {
    "os.truncate-to-the-header": lambda path: os.truncate(path, 44),
    "soundfile.write-shorter": lambda path: sf.write(path, np.full(10, 7, np.int16), RATE),
    "soundfile.write-longer": lambda path: sf.write(
        path, np.full(os.path.getsize(path), 7, np.int16), RATE),
}

TRUNCATING_OWNER = """
    import json, os, sys
    from luna_shm import AudioPool, create_wav_buffer
    if {kind!r} == "WavBuffer":
        owner = create_wav_buffer(100_000, 16000)
    else:
        owner = AudioPool(1, 1_000_000).acquire(100_000, 16000)
    owner.array[:] = 3
    print(owner.path, flush=True)
    sys.stdin.readline()
    errors = []
    for use in (lambda: owner.truncate(5), lambda: owner.array):
        try:
            use()
        except OSError as exc:
            errors.append([exc.errno, exc.filename == owner.path])
    print(json.dumps({{"errors": errors}}), flush=True)
    os._exit(0)  # nothing more touches the file (a pool's close would remove it)
"""


@pytest.mark.parametrize("rewrite", list(REWRITES))
@pytest.mark.parametrize("kind", ["WavBuffer", "PooledWav"])
def test_truncate_after_another_process_rewrote_the_file_raises_estale_and_leaves_it_alone(
        private_dirs, kind, rewrite) -> None:
    # The rewrite keeps the first page (the header's), so no page the owner touches is
    # gone: no fault tells the guard. truncate() wrote its header and JUNK chunk into the
    # other program's file and returned as if all was well.
    child = _child(TRUNCATING_OWNER.format(kind=kind), "off")
    try:
        assert child.stdout is not None
        path = child.stdout.readline().strip()
        REWRITES[rewrite](path)
        with open(path, "rb") as f:
            theirs = f.read()
        out, err = child.communicate("go\n", timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    result = _ok(child.returncode, out, err)
    assert result == {"errors": [[errno.ESTALE, True], [errno.ESTALE, True]]}
    with open(path, "rb") as f:
        assert f.read() == theirs


# ---- AudioPool ------------------------------------------------------------------------------


@pytest.mark.parametrize("faulthandler", FAULTHANDLER)
@pytest.mark.parametrize("truncation", list(TRUNCATIONS))
def test_a_pooled_wav_whose_file_a_consumer_rewrote_raises_estale_and_the_slot_is_replaced(
        private_dirs, truncation, faulthandler) -> None:
    body = """
        import errno, json, sys
        import numpy as np
        from luna_shm import AudioPool, read_wav
        #AFTER_IMPORT
        pool = AudioPool(1, 1_000_000)
        held = pool.acquire(300_000, 16000)
        view = held.array
        #AFTER_MAPPING
        print(held.path, flush=True)
        print("ready", flush=True)
        sys.stdin.readline()
        view[:] = 4  # the producer writes again
        errors = []
        for use in (lambda: held.array, lambda: held.truncate(10)):
            try:
                use()
            except OSError as exc:
                errors.append(exc.errno)
        held.release()
        fresh = pool.write_wav(np.full(1000, 7, np.int16), 16000)
        back = read_wav(fresh.path, mmap=False)[0]
        print(json.dumps({"errors": errors, "back": int(back.sum()), "slots": pool.slots,
                          "new_path": fresh.path != held.path}))
        fresh.release()
        pool.close()
    """
    child = _child(body, faulthandler)
    try:
        assert child.stdout is not None
        path = child.stdout.readline().strip()
        assert child.stdout.readline() == "ready\n"
        TRUNCATIONS[truncation](path)
        out, err = child.communicate("go\n", timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    result = _ok(child.returncode, out, err)
    assert result == {"errors": [errno.ESTALE, errno.ESTALE], "back": 7000, "slots": 1,
                      "new_path": True}
    assert os.listdir(private_dirs.ram) == []  # the dropped slot's file went too


def test_pool_write_wav_into_a_slot_a_consumer_truncated_after_release_writes_a_fresh_slot(
        private_dirs) -> None:
    body = """
        import json, sys
        import numpy as np
        from luna_shm import AudioPool, read_wav
        pool = AudioPool(1, 1_000_000)
        first = pool.write_wav(np.ones(300_000, np.int16), 16000)
        path = first.path
        first.release()
        print(path, flush=True)
        print("ready", flush=True)
        sys.stdin.readline()
        # The slot's file is gone under the pool's mapping: the copy faults in the middle.
        again = pool.write_wav(np.full(300_000, 2, np.int16), 16000)
        back = read_wav(again.path, mmap=False)[0]
        print(json.dumps({"sum": int(back.astype(np.int64).sum()), "slots": pool.slots,
                          "new_path": again.path != path}))
        again.release()
        pool.close()
    """
    child = _child(body, "off")
    assert child.stdout is not None
    path = child.stdout.readline().strip()
    assert child.stdout.readline() == "ready\n"
    os.truncate(path, 0)
    out, err = child.communicate("go\n", timeout=120)
    assert _ok(child.returncode, out, err) == {"sum": 600_000, "slots": 1, "new_path": True}


# ---- recv_wav -------------------------------------------------------------------------------


RECEIVER = """
    import io, json, os, socket, sys
    import numpy as np
    import soundfile as sf
    from luna_shm import recv_wav
    #AFTER_IMPORT
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the sender, a process of its own
        here.close()
        fd = os.memfd_create("sender", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        wav = io.BytesIO()
        sf.write(wav, (np.arange(300_000) % 1000).astype(np.int16), 16000, format="WAV",
                 subtype="PCM_16")
        os.write(fd, wav.getvalue())
        #SEAL_IT
        socket.send_fds(there, [b"LUNAWAV1"], [fd])
        there.recv(1)           # the receiver has its array
        os.ftruncate(fd, 0)     # and the sender shrinks the memfd under it
        there.send(b"k")
        os._exit(0)
    there.close()
    data, rate = recv_wav(here)
    #AFTER_MAPPING
    here.send(b"k")
    here.recv(1)
    os.waitpid(pid, 0)
    print("ready", flush=True)
    sys.stdin.readline()
    base = data
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    # A copy's memory is a numpy array's own; a mapping's is a buffer over the mapped file.
    print(json.dumps({"sum": int(data.astype(np.int64).sum()),
                      "owned": isinstance(base, np.ndarray),
                      "writeable": bool(data.flags.writeable)}))
"""


@pytest.mark.skipif(not HAS_MEMFD, reason="memfd is not available")
@pytest.mark.parametrize("faulthandler", FAULTHANDLER)
def test_recv_wav_of_an_unsealed_memfd_the_sender_then_shrinks_keeps_its_samples(
        faulthandler) -> None:
    expected = int((np.arange(300_000) % 1000).sum())
    result = _ok(*_run(RECEIVER.replace("#SEAL_IT", "pass"), faulthandler))
    # Not trusted, so copied: the sender's ftruncate cannot reach it.
    assert result == {"sum": expected, "owned": True, "writeable": False}


@pytest.mark.skipif(not HAS_MEMFD, reason="memfd is not available")
def test_recv_wav_maps_a_memfd_sealed_against_shrinking_with_zero_copies() -> None:
    import fcntl

    seal = f"fcntl.fcntl(fd, {fcntl.F_ADD_SEALS}, {fcntl.F_SEAL_SHRINK})"
    code, out, err = _run(RECEIVER.replace("#SEAL_IT", f"import fcntl; {seal}")
                          .replace("os.ftruncate(fd, 0)", "pass"), "off")
    expected = int((np.arange(300_000) % 1000).sum())
    assert _ok(code, out, err) == {"sum": expected, "owned": False, "writeable": False}


def test_a_mapping_is_unmapped_even_when_python_code_would_raise_as_it_goes(ram) -> None:
    # A signal handler that raises runs at the next Python call: if a mapping's
    # destructor were a Python function, that call would raise, Python would only print
    # it, and the mapping (and its file's pages) would stay until the process ends. Here
    # every Python call raises while the last reference to the mapped array goes.
    path = str(ram / "mapped.wav")
    write_wav(path, np.arange(1000, dtype=np.int16), 16000)
    data, _ = read_wav(path)
    with open("/proc/self/maps", encoding="ascii") as maps:
        assert path in maps.read()

    def every_call_raises(frame, event, arg):
        if event == "call":
            raise RuntimeError("a signal handler raised here")

    unraised: list[object] = []
    previous_hook = sys.unraisablehook
    sys.unraisablehook = unraised.append
    sys.setprofile(every_call_raises)
    try:
        del data
    finally:
        sys.setprofile(None)
        sys.unraisablehook = previous_hook
    assert unraised == []
    with open("/proc/self/maps", encoding="ascii") as maps:
        assert path not in maps.read()


def _mapped_lines(marker: str) -> int:
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        return sum(marker in line for line in maps)


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize(("c_function", "what"), [
    ("luna_wav_map", "read_wav"),
    ("luna_map", "create_wav_buffer"),
    ("luna_map", "create_wav_buffer(anonymous=True)"),
])
def test_a_mapping_is_not_lost_when_python_code_raises_right_after_the_c_call_that_made_it(
        ram, c_function: str, what: str) -> None:
    # A signal that arrives during a C call runs its Python handler as soon as the call
    # returns, before Python stores the result: a handler that raises there (a timeout,
    # Ctrl-C) lost the new mapping when only the Python object made after the call owned
    # it (55 mappings in 400 buffers made under random raising SIGALRM handlers). Here a
    # profile hook raises at the first Python-level call after the C call returns.
    path = str(ram / "mapped.wav")
    write_wav(path, np.arange(1000, dtype=np.int16), 16000)
    marker = "memfd:" if "anonymous" in what else str(ram)
    before = _mapped_lines(marker)
    returned = [False]

    def raise_after_the_c_call(frame, event, arg):
        if event == "c_return" and getattr(arg, "__name__", "") == c_function:
            returned[0] = True
        elif returned[0] and event in ("call", "c_call"):
            sys.setprofile(None)
            raise _Interrupted(what)

    sys.setprofile(raise_after_the_c_call)
    try:
        with pytest.raises(_Interrupted):
            if what == "read_wav":
                read_wav(path)
            elif what == "create_wav_buffer":
                create_wav_buffer(1000, 16000, path=str(ram / "buffer.wav"))
            else:
                create_wav_buffer(1000, 16000, anonymous=True)
    finally:
        sys.setprofile(None)
    assert returned == [True]
    gc.collect()
    assert _mapped_lines(marker) == before
