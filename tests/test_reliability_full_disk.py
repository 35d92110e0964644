"""A full or small RAM disk, a file size limit, a read-only RAM disk: real faults, no mocks.

Each test runs its scenario in a child process with its own mount namespace
(helpers.run_in_private_shm): /dev/shm there is a fresh tmpfs of 64 KiB to
1 MiB and /tmp a private tmpfs, so nothing touches the machine's shared dirs.
Every child must exit with code 0 exactly: a SIGBUS would show as -7.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import textwrap

import pytest

from helpers import LIST_PRIVATE_TMP, child_take_every_inode, run_in_private_shm

# Shared by every child: its report, its luna_shm log, and a way to fill a filesystem.
PREAMBLE = """
import errno, json, logging, os, resource, signal, subprocess, sys
import numpy as np
import soundfile as sf
import luna_shm
from luna_shm import AudioPool, WavWriter, create_wav_buffer, read_wav, write_wav

log = []
class Keep(logging.Handler):
    def emit(self, record):
        log.append(record.getMessage())
logging.getLogger("luna_shm").addHandler(Keep())
logging.getLogger("luna_shm").setLevel(logging.DEBUG)

def listing():
    return {"shm": sorted(os.listdir("/dev/shm")), "tmp": """ + LIST_PRIVATE_TMP + """}

def report(**values):
    print(json.dumps({**values, **listing(), "log": log,
                      "in_ram": luna_shm.is_using_ram_disk()}))

def error(exc):
    return {"errno": exc.errno, "filename": exc.filename, "text": str(exc),
            "type": type(exc).__name__}

def fill(directory, name="filler"):
    # Another process fills what is left, as a neighbour in the container would.
    done = subprocess.run(["dd", "if=/dev/zero", f"of={directory}/{name}", "bs=4k"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "No space left on device" in done.stderr, done.stderr
    assert os.statvfs(directory).f_bavail == 0

def same(path, data):
    back, rate = read_wav(path, mmap=False)
    sf_back, sf_rate = sf.read(path, dtype=data.dtype.name)
    return bool(np.array_equal(back, data) and np.array_equal(sf_back, data)
                and rate == sf_rate == 8000)

DATA = (np.arange(400_000) % 30_000).astype(np.int16)  # 800 KB of audio
"""


def run_child(body: str, **options) -> dict:
    """Run PREAMBLE + body in a private mount namespace; the child must exit 0 (no SIGBUS)."""
    done = run_in_private_shm(PREAMBLE + textwrap.dedent(body), **options)
    if done.returncode == -signal.SIGBUS:
        pytest.fail(f"the child died of SIGBUS\n{done.stdout}\n{done.stderr}")
    assert done.returncode == 0, f"child exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- a file the RAM disk cannot hold goes to the disk temp dir, per file ---------------------

PRODUCE_DATA = """
kind = os.environ["KIND"]
if kind == "write_wav":
    path = write_wav(None, DATA, 8000)
elif kind == "write_wav-atomic":
    path = write_wav(None, DATA, 8000, atomic=True)
elif kind == "create_wav_buffer":
    with create_wav_buffer(len(DATA), 8000) as buf:
        buf.array[:] = DATA
    path = buf.path
elif kind == "WavWriter":
    with WavWriter(None, 8000) as writer:
        writer.write(DATA)
    path = writer.path
elif kind == "AudioPool":
    pool = AudioPool(slots=2, max_bytes=DATA.nbytes)
    pooled = pool.write_wav(DATA, 8000)
    path = pooled.path
else:
    raise AssertionError(kind)
"""

SIZED_PRODUCERS = ["write_wav", "write_wav-atomic", "create_wav_buffer", "AudioPool"]


@pytest.mark.parametrize("kind", SIZED_PRODUCERS)
def test_a_file_the_small_ram_disk_cannot_hold_is_made_whole_in_the_disk_temp_dir(kind) -> None:
    out = run_child(PRODUCE_DATA + """
report(path=path, same=same(path, DATA))
""", shm_size="64k", env={"KIND": kind})
    assert out["path"].startswith("/tmp/luna_audio_")
    assert out["same"] is True
    assert out["shm"] == []  # no partial file left on the RAM disk
    slots = 2 if kind == "AudioPool" else 1
    assert len(out["tmp"]) == slots and os.path.basename(out["path"]) in out["tmp"]
    assert out["in_ram"] is True  # the RAM disk stays in use for files that fit
    fallbacks = [m for m in out["log"] if "does not fit in /dev/shm" in m]
    assert len(fallbacks) == 1 and "using /tmp for it" in fallbacks[0], out["log"]


def test_a_pool_keeps_the_slots_that_fit_on_the_ram_disk_and_makes_the_rest_on_disk() -> None:
    out = run_child("""
pool = AudioPool(slots=6, max_bytes=60_000)
held = [pool.write_wav(np.full(30_000, i, np.int16), 8000) for i in range(6)]
report(paths=[p.path for p in held],
       same=[same(p.path, np.full(30_000, i, np.int16)) for i, p in enumerate(held)])
""", shm_size="256k")
    in_ram = [p for p in out["paths"] if p.startswith("/dev/shm/luna_audio_pool_")]
    on_disk = [p for p in out["paths"] if p.startswith("/tmp/luna_audio_pool_")]
    assert len(in_ram) >= 1 and len(on_disk) >= 1 and len(in_ram) + len(on_disk) == 6
    assert out["same"] == [True] * 6


def test_a_buffer_that_cannot_be_reserved_says_how_to_give_the_container_more_shared_memory():
    out = run_child("""
try:
    create_wav_buffer(1_000_000, 8000, path="/dev/shm/big.wav")
    report(error=None)
except OSError as exc:
    report(error=error(exc))
""", shm_size="64k")
    assert out["error"]["errno"] == errno.ENOSPC
    assert out["error"]["filename"] == "/dev/shm/big.wav"
    assert "--shm-size" in out["error"]["text"]
    assert out["shm"] == []


# ---- a full RAM disk: writers, whose size nobody knows in advance ------------------------------


def test_a_writer_at_a_given_path_on_a_full_ram_disk_raises_enospc_naming_it_and_leaves_nothing():
    out = run_child("""
fill("/dev/shm")
try:
    WavWriter("/dev/shm/stream.wav", 8000)
    report(error=None)
except OSError as exc:
    report(error=error(exc))
""", shm_size="64k")
    assert out["error"]["errno"] == errno.ENOSPC
    assert out["error"]["filename"] == "/dev/shm/stream.wav"
    assert out["error"]["filename"] in out["error"]["text"]
    assert out["shm"] == ["filler"] and out["tmp"] == []


def test_a_new_writer_on_a_full_ram_disk_streams_into_the_disk_temp_dir() -> None:
    # The RAM disk still makes the file (tmpfs has inodes left) but refuses its
    # header: the writer starts again in the disk temp dir, and the RAM disk keeps
    # nothing of it.
    out = run_child("""
fill("/dev/shm")
with WavWriter(None, 8000) as writer:
    for chunk in np.split(DATA, 8):
        writer.write(chunk)
report(path=writer.path, same=same(writer.path, DATA))
""", shm_size="64k")
    assert out["path"].startswith("/tmp/luna_audio_")
    assert out["same"] is True
    assert out["shm"] == ["filler"]
    assert out["tmp"] == [os.path.basename(out["path"])]
    refusals = [m for m in out["log"] if "/dev/shm refused a new file" in m]
    assert len(refusals) == 1 and "using /tmp" in refusals[0], out["log"]


def test_a_new_writer_with_both_dirs_full_raises_enospc_naming_its_disk_file_and_leaves_nothing():
    out = run_child("""
subprocess.run(["mount", "-o", "remount,size=64k", "/tmp"], check=True)
fill("/dev/shm")
fill("/tmp")
try:
    WavWriter(None, 8000)
    report(error=None)
except OSError as exc:
    report(error=error(exc))
""", shm_size="64k")
    assert out["error"]["errno"] == errno.ENOSPC
    assert out["error"]["filename"].startswith("/tmp/luna_audio_")
    assert out["error"]["filename"] in out["error"]["text"]
    assert out["shm"] == ["filler"] and out["tmp"] == ["filler"]


@pytest.mark.parametrize("when", ["at-creation", "mid-stream"])
def test_a_writer_that_fills_the_ram_disk_says_how_to_give_the_container_more_memory(when):
    out = run_child(f"""
if {when!r} == "at-creation":
    fill("/dev/shm")
try:
    with WavWriter("/dev/shm/stream.wav", 8000) as writer:
        for _ in range(100):
            writer.write(np.ones(10_000, np.int16))
    report(error=None)
except OSError as exc:
    report(error=error(exc))
""", shm_size="64k")
    assert out["error"]["errno"] == errno.ENOSPC
    assert "--shm-size" in out["error"]["text"]


@pytest.mark.parametrize("kind", SIZED_PRODUCERS)
def test_with_both_dirs_full_each_producer_raises_enospc_naming_its_file_and_leaves_nothing(kind):
    out = run_child(f"""
subprocess.run(["mount", "-o", "remount,size=64k", "/tmp"], check=True)
try:
{textwrap.indent(PRODUCE_DATA, "    ")}
    report(error=None)
except OSError as exc:
    report(error=error(exc))
""", shm_size="64k", env={"KIND": kind})
    assert out["error"]["errno"] == errno.ENOSPC
    if kind == "AudioPool":  # refused before any slot is made: it names both dirs' room
        assert out["error"]["filename"] == "/dev/shm"
        assert "2 slots of " in out["error"]["text"] and "/tmp has " in out["error"]["text"]
    else:
        assert out["error"]["filename"].startswith("/tmp/luna_audio_")
        assert out["error"]["filename"] in out["error"]["text"]
    assert out["shm"] == [] and out["tmp"] == []


# ---- the space of a mapped file is reserved: a neighbour filling the disk cannot SIGBUS us ----

RESERVED_THEN_FILLED = """
kind = os.environ["KIND"]
data = (np.arange(300_000) % 20_000).astype(np.int16)  # 600 KB, most of the 1 MiB disk
if kind == "named-buffer":
    buf = create_wav_buffer(len(data), 8000)
    assert buf.path.startswith("/dev/shm/")
    fill("/dev/shm")
    buf.array[:] = data  # every page of the mapping is touched now, on a full disk
    buf.close()
    path = buf.path
else:
    pool = AudioPool(slots=1, max_bytes=data.nbytes)
    fill("/dev/shm")
    if kind == "pool-write_wav":
        pooled = pool.write_wav(data, 8000)
    else:
        pooled = pool.acquire(len(data), 8000)
        pooled.array[:] = data
    path = pooled.path
    assert path.startswith("/dev/shm/")
report(path=path, same=same(path, data), free=os.statvfs("/dev/shm").f_bavail)
"""


@pytest.mark.parametrize("kind", ["named-buffer", "pool-write_wav", "pool-acquire"])
def test_a_reserved_file_is_written_whole_after_another_process_fills_the_ram_disk(kind) -> None:
    out = run_child(RESERVED_THEN_FILLED, shm_size="1m", env={"KIND": kind})
    assert out["same"] is True
    assert out["free"] == 0
    assert "filler" in out["shm"]


def test_without_a_reservation_the_same_fill_kills_the_writer_with_sigbus() -> None:
    # The control for the test above: a file that is only ftruncate'd (sparse), mapped,
    # and written after the disk filled up dies of SIGBUS, so the fault is real.
    out = run_child("""
victim = '''
import mmap, os, subprocess
fd = os.open("/dev/shm/sparse.wav", os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 600_000)
view = mmap.mmap(fd, 600_000)
subprocess.run(["dd", "if=/dev/zero", "of=/dev/shm/filler", "bs=4k"], capture_output=True)
view[:] = b"x" * 600_000
print("survived")
'''
done = subprocess.run([sys.executable, "-c", victim], capture_output=True, text=True)
report(returncode=done.returncode, stdout=done.stdout)
""", shm_size="1m")
    assert out["returncode"] == -signal.SIGBUS
    assert out["stdout"] == ""


# ---- a file size limit (RLIMIT_FSIZE): EFBIG, named, nothing left ------------------------------

LIMITED = """
kind = os.environ["KIND"]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = 20 if kind == "WavWriter" else 4096  # the writer's 44-byte header must not fit
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    if kind == "write_wav":
        write_wav(None, DATA, 8000)
    elif kind == "write_wav-atomic":
        write_wav(None, DATA, 8000, atomic=True)
    elif kind in ("named-buffer", "anonymous-buffer"):
        create_wav_buffer(len(DATA), 8000, anonymous=kind == "anonymous-buffer")
    elif kind == "WavWriter":
        WavWriter(None, 8000)
    elif kind in ("named-pool", "anonymous-pool"):
        AudioPool(slots=2, max_bytes=DATA.nbytes, anonymous=kind == "anonymous-pool")
    result = None
except OSError as exc:
    result = error(exc)
report(error=result, fds=sorted(os.listdir("/proc/self/fd")))
"""


@pytest.mark.parametrize("kind", ["write_wav", "write_wav-atomic", "named-buffer",
                                  "anonymous-buffer", "WavWriter", "named-pool",
                                  "anonymous-pool"])
def test_a_file_size_limit_makes_each_producer_raise_efbig_naming_its_file_and_leave_nothing(
        kind) -> None:
    out = run_child(LIMITED, shm_size="4m", env={"KIND": kind})
    assert out["error"] is not None, "the limit did not apply"
    assert out["error"]["errno"] == errno.EFBIG
    if kind.startswith("anonymous"):
        assert out["error"]["filename"].startswith("/proc/")
    else:
        assert out["error"]["filename"].startswith("/dev/shm/luna_audio_")
        assert out["error"]["filename"] in out["error"]["text"]
    assert out["shm"] == [] and out["tmp"] == []
    assert len(out["fds"]) <= 4  # stdin, stdout, stderr and listdir's own: nothing leaked


# ---- a read-only RAM disk: EROFS ---------------------------------------------------------------

ALL_PRODUCERS = [*SIZED_PRODUCERS, "WavWriter"]


@pytest.mark.parametrize("kind", ALL_PRODUCERS)
@pytest.mark.parametrize("when", ["from-the-start", "remounted-while-in-use"])
def test_a_read_only_ram_disk_sends_each_producer_to_the_disk_temp_dir(kind, when):
    remount = ""
    if when == "remounted-while-in-use":
        remount = """
assert luna_shm.temp_dir() == "/dev/shm"  # chosen (and cached) while writable
subprocess.run(["mount", "-o", "remount,ro", "/dev/shm"], check=True)
"""
    out = run_child(remount + PRODUCE_DATA + """
report(path=path, same=same(path, DATA))
""", shm_size="4m", read_only=when == "from-the-start", env={"KIND": kind})
    assert out["path"].startswith("/tmp/luna_audio_")
    assert out["same"] is True
    assert out["shm"] == []
    assert any("/tmp" in m and "/dev/shm" in m for m in out["log"]), out["log"]


@pytest.mark.parametrize("kind", ["write_wav", "write_wav-atomic", "create_wav_buffer",
                                  "WavWriter"])
def test_a_given_path_on_a_read_only_ram_disk_raises_erofs_naming_it(kind) -> None:
    out = run_child(f"""
path = "/dev/shm/given.wav"
try:
    if {kind!r} == "write_wav":
        write_wav(path, DATA, 8000)
    elif {kind!r} == "write_wav-atomic":
        write_wav(path, DATA, 8000, atomic=True)
    elif {kind!r} == "create_wav_buffer":
        create_wav_buffer(10, 8000, path=path)
    else:
        WavWriter(path, 8000)
    report(error=None)
except OSError as exc:
    report(error=error(exc))
""", read_only=True)
    assert out["error"]["errno"] == errno.EROFS
    assert out["error"]["filename"] == "/dev/shm/given.wav"
    assert out["shm"] == [] and out["tmp"] == []



@pytest.mark.parametrize("kind", ["create_wav_buffer", "WavWriter", "write_wav"])
@pytest.mark.parametrize("fault", ["no-inode-left", "file-size-limit"])
def test_a_given_path_with_content_that_cannot_be_replaced_raises_naming_it_not_a_hidden_name(
        kind, fault) -> None:
    # Found in session 22: create_wav_buffer and WavWriter replace a file with content
    # through a new hidden file beside it (.luna_audio_.partial_<hex>), and an error while
    # making or filling that file named it: ENOSPC of a RAM disk with no inode left
    # (without the RAM disk's hint), EACCES of a directory the caller cannot write in,
    # EFBIG of a file size limit. write_wav named the path given, as the README's errors
    # table says every OSError does.
    limit = child_take_every_inode(16) if fault == "no-inode-left" else """
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20, resource.RLIM_INFINITY))  # no 44-byte header
"""
    out = run_child("""
path = "/dev/shm/given.wav"
write_wav(path, DATA[:10], 8000)
with open(path, "rb") as f:
    before = f.read()
""" + limit + f"""
try:
    if {kind!r} == "create_wav_buffer":
        create_wav_buffer(len(DATA), 8000, path=path)
    elif {kind!r} == "WavWriter":
        WavWriter(path, 8000).write(DATA)
    else:
        write_wav(path, DATA, 8000)
    result = None
except OSError as exc:
    result = error(exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
with open(path, "rb") as f:
    kept = f.read() == before
report(error=result, kept=kept)
""", shm_size="4m")
    expected = errno.ENOSPC if fault == "no-inode-left" else errno.EFBIG
    assert out["error"] is not None and out["error"]["errno"] == expected, out
    assert out["error"]["filename"] == "/dev/shm/given.wav"
    if fault == "no-inode-left":
        assert "--shm-size" in out["error"]["text"]  # the RAM disk's hint
    assert out["kept"] is True
    assert [n for n in out["shm"] if not n.startswith("filler")] == ["given.wav"]


# ---- save_temp_audio: bytes fall back whole, a stream only at its creation ---------------------

SAVE = """
from luna_shm import save_temp_audio
payload = bytes(range(256)) * 400  # 100 KB of "MP3"
data = payload if os.environ["KIND"] == "bytes" else iter([payload[:50_000], payload[50_000:]])
if os.environ["DISK"] == "full":
    fill("/dev/shm")
try:
    path = save_temp_audio(data, ".mp3")
    with open(path, "rb") as f:
        report(path=path, same=f.read() == payload, error=None)
except OSError as exc:
    report(path=None, error=error(exc))
"""


@pytest.mark.parametrize("kind", ["bytes", "stream"])
@pytest.mark.parametrize("disk", ["read-only", "full"])
def test_save_temp_audio_falls_back_whole_for_bytes_and_only_at_creation_for_a_stream(kind, disk):
    out = run_child(SAVE, shm_size="64k", read_only=disk == "read-only",
                    env={"KIND": kind, "DISK": disk})
    if kind == "stream" and disk == "full":
        # The RAM disk made the file but filled up while it streamed: a stream cannot
        # be replayed, so the error is raised, naming the file, and nothing is left.
        assert out["error"]["errno"] == errno.ENOSPC
        assert out["error"]["filename"].startswith("/dev/shm/luna_audio_")
        assert "--shm-size" in out["error"]["text"]
        assert out["shm"] == ["filler"] and out["tmp"] == []
        return
    assert out["error"] is None
    assert out["path"].startswith("/tmp/luna_audio_") and out["same"] is True
    assert out["tmp"] == [os.path.basename(out["path"])]
    assert out["shm"] == ([] if disk == "read-only" else ["filler"])


POOL_OF = """
slots, anonymous = int(os.environ["SLOTS"]), os.environ["ANONYMOUS"] == "1"
try:
    with AudioPool(slots=slots, max_bytes=4000, anonymous=anonymous) as pool:
        result = pool.slots
except OSError as exc:
    result = error(exc)
report(result=result)
"""


@pytest.mark.parametrize("slots", [10**30, 10_000], ids=["10**30", "10000"])
def test_a_pool_of_more_slots_than_both_dirs_hold_is_refused_up_front_naming_the_numbers(
        slots) -> None:
    # 8 KiB slots: 10,000 of them (82 MB) fit neither the 1 MiB RAM disk nor the 64 MiB
    # /tmp beside it. Slot after slot filled both before the last one failed.
    out = run_child(POOL_OF, shm_size="1m", env={"SLOTS": str(slots), "ANONYMOUS": "0"})
    assert out["result"]["errno"] == errno.ENOSPC
    assert out["result"]["text"].startswith(
        f"[Errno 28] {slots} slots of 8192 bytes ({slots * 8192} bytes) cannot fit: "
        "/dev/shm has ")
    assert " bytes free and /tmp has " in out["result"]["text"]
    assert out["shm"] == out["tmp"] == []
    assert not any("refused a new file" in m for m in out["log"]), out["log"]


def test_a_pool_that_fits_the_two_dirs_together_is_made_across_them() -> None:
    out = run_child(POOL_OF, shm_size="1m", env={"SLOTS": "200", "ANONYMOUS": "0"})
    assert out["result"] == 200


def test_an_anonymous_pool_larger_than_the_machines_memory_is_refused_up_front() -> None:
    out = run_child(POOL_OF, shm_size="1m", env={"SLOTS": str(10**30), "ANONYMOUS": "1"})
    assert out["result"]["errno"] == errno.ENOMEM
    assert re.search(r"^\[Errno 12\] 1000000000000000000000000000000 anonymous slots of "
                     r"8192 bytes cannot fit in this machine's memory \(\d+ bytes\)$",
                     out["result"]["text"]), out["result"]


# ---- AudioCache: the lock file's counters on a full disk ---------------------------------------

CACHE_ON_FULL_DISK = """
from luna_shm import AudioCache
os.mkdir("/tmp/disk", 0o700)
tier = os.environ["TIER"]
if tier == "disk":
    subprocess.run(["mount", "-o", "remount,size=64k", "/tmp"], check=True)
fill("/dev/shm" if tier == "ram" else "/tmp")
def cache_dirs():  # each tier directory left, and its files' sizes
    return {f"{parent}/{name}": {f: os.stat(f"{parent}/{name}/{f}").st_size
                                 for f in os.listdir(f"{parent}/{name}")}
            for parent in ("/dev/shm", "/tmp/disk") for name in os.listdir(parent)
            if name.startswith("luna_cache-")}
try:
    AudioCache("full", disk_dir="/tmp/disk" if tier == "disk" else None).close()
    report(error=None, left=cache_dirs())
except OSError as exc:
    report(error=error(exc), left=cache_dirs())
"""


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_a_new_cache_on_a_full_disk_raises_enospc_naming_its_lock_file_and_leaves_its_lock(
        tier):
    # A new lock file has no page for its shared counters yet: on a full disk their first
    # write failed, as a bare OSError with no file name: the RAM tier's at the open, the
    # disk tier's later, in the middle of the first spill or removal that counted bytes.
    out = run_child(CACHE_ON_FULL_DISK, shm_size="64k", env={"TIER": tier})
    parent = "/dev/shm" if tier == "ram" else "/tmp/disk"
    lock = f"{parent}/luna_cache-{os.geteuid()}-full/lock"
    assert out["error"] is not None, "the cache opened on a full disk"
    assert out["error"]["errno"] == errno.ENOSPC
    assert out["error"]["filename"] == lock
    assert ("--shm-size" in out["error"]["text"]) == (tier == "ram")
    # Only the failed tier's directory is left, with its empty lock file (another process
    # may have opened it meanwhile: removed, the cache's lock would be split in two); no
    # other tier's.
    assert out["left"] == {os.path.dirname(lock): {"lock": 0}}


def test_files_that_do_not_fit_the_ram_disk_are_logged_once_not_one_line_and_one_memo_each():
    # Each message's numbers (its size, the bytes free) made it a new message to log_once:
    # a process whose files kept falling back logged a warning per file, and remembered
    # every line for ever (a daemon's memory grew by a line a file).
    out = run_child("""
from luna_shm import placement
for frames in range(40_000, 40_050):
    os.unlink(write_wav(None, np.zeros(frames, np.int16), 8000))
report(memos=len(placement._logged))
""", shm_size="64k")
    fallbacks = [m for m in out["log"] if "does not fit in /dev/shm" in m]
    assert len(fallbacks) == 1 and "a file of 80128 bytes" in fallbacks[0], out["log"]
    assert out["memos"] <= 2, out["log"]


def test_a_full_ram_disk_that_refuses_two_producers_is_logged_once_without_the_hint():
    # The refusal's line quoted the error's own text, which a WavWriter's gives with the
    # --shm-size hint: "(No space left on device (the RAM disk is full: ...))". And the
    # line was its own key: the same refusal of a producer whose error has no hint was
    # logged again (both lines came from one process in the full-disk soak).
    out = run_child("""
fill("/dev/shm")
with WavWriter(None, 8000) as writer:
    writer.write(DATA[:100])
with AudioPool(slots=1, max_bytes=4096) as pool:
    report(slot=pool.write_wav(DATA[:100], 8000).path, writer=writer.path)
""", shm_size="64k")
    assert out["writer"].startswith("/tmp/") and out["slot"].startswith("/tmp/")
    refusals = [m for m in out["log"] if "refused a new file" in m]
    assert refusals == ["luna_shm: /dev/shm refused a new file (No space left on device): "
                        "using /tmp for such files"], out["log"]


@pytest.mark.parametrize("text_bytes", [20, 10_000])
def test_the_waiters_of_a_render_that_fails_as_the_ram_disk_fills_get_render_error(
        text_bytes: int) -> None:
    # A render that failed when the RAM disk had filled up could not write its outcome
    # note (a new file with a page of text): its waiters found no note and rendered the
    # key again, each in turn, instead of raising RenderError. The note's page is now
    # allocated when the render begins; a text longer than that page keeps its head.
    out = run_child("""
import time
from luna_shm import AudioCache, cache_key
key = cache_key("fails as the disk fills")
cache = AudioCache("full")
go_read, go_write = os.pipe()
said_read, said_write = os.pipe()
waiter = os.fork()
if waiter == 0:
    os.close(go_write)
    os.read(go_read, 1)  # the render has begun
    def render_again(writer):
        raise KeyError("the waiter rendered again")
    try:
        AudioCache("full").get_or_render(key, render_again, samplerate=8000)
        said = "no error"
    except Exception as exc:
        said = f"{type(exc).__name__}: {exc}"
    os.write(said_write, said.encode())
    os._exit(0)
os.close(go_read)
os.close(said_write)

def render(writer):
    writer.write(DATA[:100])
    os.close(go_write)
    deadline = time.monotonic() + 30
    while "lock" not in open(f"/proc/{waiter}/wchan").read():  # waits for our flock
        assert time.monotonic() < deadline, "the waiter never waited for the render"
        time.sleep(0.001)
    fill("/dev/shm")
    raise ValueError("the engine failed: " + "x" * TEXT_BYTES)

try:
    cache.get_or_render(key, render, samplerate=8000)
except ValueError as exc:
    own = str(exc)
with os.fdopen(said_read, "rb") as said:
    waiter_said = said.read().decode()
os.waitpid(waiter, 0)
os.unlink("/dev/shm/filler")
cache.destroy()
report(own=own, waiter=waiter_said, pid=os.getpid(), key=key)
""".replace("TEXT_BYTES", str(text_bytes)))
    assert out["own"] == "the engine failed: " + "x" * text_bytes
    said = (f"RenderError: rendering {out['key']!r} failed in process "
            f"{out['pid']}: ValueError: the engine failed: ")
    assert out["waiter"].startswith(said), out["waiter"]
    xs = out["waiter"][len(said):]
    assert set(xs) <= {"x"} and (len(xs) == text_bytes if text_bytes < 4000 else
                                 4000 < len(xs) < 4096), len(xs)
