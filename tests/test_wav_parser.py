"""The C WAV header parser: known answers, malformed files, hostile bytes, sanitizers.

Oracles, in order of independence:

- tests/data/*.wav and tests/data/expected.json, built byte by byte by
  tests/generate_wavs.py (every header field commented there): the rate,
  channels, dtype, frames, data offset and a SHA-256 of the samples of each file
  real writers produce, and the reason each malformed file must be refused for;
- python-soundfile (libsndfile), which must read the same samples;
- the parser's own promises, checked over hypothesis-generated and mutated
  bytes: it either raises WavError or returns a header whose data range lies
  inside the input with frames * block_align == data_bytes; from memory and
  from a file it answers the same;
- an AddressSanitizer/UndefinedBehaviorSanitizer build (alignment checks included) of
  the C parser (tests/c/parse_corpus.c) over the fixtures, the seed corpus and mutations.

No file is created outside pytest's tmp_path; read_wav and the parser only read.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import subprocess
from pathlib import Path

import generate_wavs
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from sanitizers import SANITIZER_MARKS, build_sanitized

from luna_shm import WavError, read_wav
from luna_shm._lowlevel import (
    WAVE_FORMAT_IEEE_FLOAT,
    WAVE_FORMAT_PCM,
    WavInfo,
    WavSpec,
    parse_wav_bytes,
    wav_header,
    wav_open,
)
from luna_shm._lowlevel import close as close_fd

DATA = Path(__file__).resolve().parent / "data"
CORPUS = DATA / "corpus"
EXPECTED = json.loads((DATA / "expected.json").read_text())
GOOD: dict[str, dict] = EXPECTED["good"]
BAD: dict[str, dict] = EXPECTED["bad"]

HEADER_FIELDS = ("samplerate", "channels", "format", "bits", "block_align", "extensible",
                 "frames", "data_offset", "data_bytes", "file_size")

def _good_params(names: list[str]) -> list[object]:
    return [pytest.param(name, id=name) for name in names]


GOOD_PARAMS = _good_params(sorted(GOOD))
SOUNDFILE_PARAMS = _good_params(sorted(n for n, f in GOOD.items() if f["soundfile"] == "same"))
BAD_PARAMS = [pytest.param(name, id=name) for name in sorted(BAD)]
CORPUS_FILES = sorted(p.name for p in CORPUS.iterdir())


# ---- the parser's promises ----------------------------------------------------------------------


def assert_parse_is_safe(blob: bytes) -> WavInfo | None:
    """Parse blob; fail unless it is refused with a reason or accepted with a sound header.

    Returns the header, or None when the parser raised WavError.
    """
    try:
        info = parse_wav_bytes(blob)
    except WavError as exc:
        # "malformed WAV" is the binding's fallback when C gave no reason.
        assert str(exc) and str(exc) != "malformed WAV"
        return None
    assert info.file_size == len(blob)
    assert info.channels >= 1
    assert info.samplerate >= 1
    assert info.format in (WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT)
    assert info.bits in (8, 16, 24, 32, 64)
    assert info.block_align == info.channels * info.bits // 8
    assert info.frames * info.block_align == info.data_bytes
    assert 20 <= info.data_offset <= len(blob)
    assert info.data_offset + info.data_bytes <= len(blob)
    return info


def expected_samples(blob: bytes, info: WavInfo) -> np.ndarray:
    """The samples read_wav must return, cut straight out of the bytes (no luna_shm code)."""
    raw = blob[info.data_offset:info.data_offset + info.data_bytes]
    if info.bits == 24:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.uint32)
        samples = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).view(np.int32)
    else:
        kind = "f" if info.format == WAVE_FORMAT_IEEE_FLOAT else ("u" if info.bits == 8 else "i")
        samples = np.frombuffer(raw, dtype=np.dtype(f"<{kind}{info.bits // 8}"))
    return samples.reshape((info.frames,) if info.channels == 1 else (info.frames, info.channels))


def sha256_of(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def fixture_bytes(name: str) -> bytes:
    return (DATA / f"{name}.wav").read_bytes()


# ---- the fixture set itself ---------------------------------------------------------------------


def test_committed_fixtures_are_exactly_what_generate_wavs_builds(tmp_path: Path) -> None:
    generate_wavs.write_all(tmp_path)
    made = {p.relative_to(tmp_path).as_posix(): p.read_bytes()
            for p in tmp_path.rglob("*") if p.is_file()}
    committed = {p.relative_to(DATA).as_posix(): p.read_bytes()
                 for p in DATA.rglob("*") if p.is_file()
                 and not p.name.startswith("crash-")}  # fuzzer regressions: not generated
    assert sorted(made) == sorted(committed)
    changed = [name for name in made if made[name] != committed[name]]
    assert changed == [], "run: .venv/bin/python tests/generate_wavs.py"


def test_fixture_set_covers_the_formats_and_faults_real_files_have() -> None:
    required_good = {
        "pcm8_mono", "pcm8_stereo", "pcm16_mono", "pcm16_stereo", "pcm24_mono", "pcm24_stereo",
        "pcm32_mono", "pcm32_stereo", "float32_mono_fact", "float32_stereo_no_fact",
        "float64_mono_fact", "float64_stereo_no_fact", "ext_pcm24_valid20_stereo_fact",
        "ext_pcm32_valid24_mono", "ext_float32_quad_fact", "list_info_between_fmt_and_data",
        "junk_before_fmt", "bext_broadcast_wave", "cue_before_data",
        "cue_and_labels_after_data", "fmt_after_data", "odd_sized_chunks_with_pad_bytes",
        "data_size_ffffffff_riff_size_exact", "data_size_0_riff_size_0",
        "data_size_0_riff_size_ffffffff", "trailing_garbage_byte_after_riff",
        "partial_frame_even_size_ignored",
    }
    required_bad = {
        "bad_empty", "bad_too_short", "bad_rifx_big_endian", "bad_rf64", "bad_not_riff_aiff",
        "bad_not_wave_avi", "bad_no_fmt_chunk", "bad_no_data_chunk", "bad_fmt_too_short",
        "bad_truncated_chunk_header", "bad_data_runs_past_eof", "bad_zero_channels",
        "bad_zero_samplerate", "bad_block_align_disagrees_with_bits", "bad_adpcm", "bad_mulaw",
        "bad_extensible_unknown_guid", "bad_two_fmt_chunks",
    }
    assert required_good - set(GOOD) == set()
    assert required_bad - set(BAD) == set()
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < 200_000


# ---- known answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GOOD_PARAMS)
def test_parse_wav_bytes_returns_the_known_header_of_each_good_file(name: str) -> None:
    info = parse_wav_bytes(fixture_bytes(name))
    expected = GOOD[name]
    assert {k: getattr(info, k) for k in HEADER_FIELDS} == {k: expected[k] for k in HEADER_FIELDS}


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize("name", GOOD_PARAMS)
def test_read_wav_returns_the_known_samples_of_each_good_file(name: str, mmap: bool) -> None:
    expected = GOOD[name]
    data, rate = read_wav(DATA / f"{name}.wav", mmap=mmap)
    assert rate == expected["samplerate"]
    assert data.dtype == np.dtype(expected["dtype"])
    channels = expected["channels"]
    frames = expected["frames"]
    assert data.shape == ((frames,) if channels == 1 else (frames, channels))
    assert sha256_of(data) == expected["sha256"]
    if mmap and expected["bits"] != 24 and frames:
        assert not data.flags.writeable  # a view of the read-only mapping, not a copy


@pytest.mark.parametrize("name", SOUNDFILE_PARAMS)
def test_read_wav_reads_the_same_samples_as_soundfile(name: str) -> None:
    soundfile = pytest.importorskip("soundfile")
    path = DATA / f"{name}.wav"
    ours, rate = read_wav(path, mmap=False)
    if ours.dtype == np.uint8:  # libsndfile has no uint8 output: compare as int16
        theirs, sf_rate = soundfile.read(path, dtype="int16")
        ours = (ours.astype(np.int16) - 128) << 8
    else:
        theirs, sf_rate = soundfile.read(path, dtype=ours.dtype.name)
    assert sf_rate == rate
    np.testing.assert_array_equal(ours, theirs, strict=True)


# ---- malformed files ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_PARAMS)
def test_parse_wav_bytes_refuses_each_malformed_file_with_its_reason(name: str) -> None:
    with pytest.raises(WavError, match=BAD[name]["error"]):
        parse_wav_bytes(fixture_bytes(name))


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize("name", BAD_PARAMS)
def test_read_wav_refuses_each_malformed_file_naming_the_file_and_the_fault(
        name: str, mmap: bool) -> None:
    path = DATA / f"{name}.wav"
    with pytest.raises(WavError, match=f"^{re.escape(str(path))}: .*{BAD[name]['error']}"):
        read_wav(path, mmap=mmap)


def test_a_malformed_file_is_also_a_value_error_for_callers_that_catch_that() -> None:
    with pytest.raises(ValueError, match="not a RIFF file"):
        read_wav(DATA / "bad_not_riff_text.wav")


def test_too_many_chunks_before_the_audio_are_refused() -> None:
    junk = b"JUNK" + struct.pack("<I", 0)
    chunks = generate_wavs.fmt(1, 1, 8000, 16) + junk * 65535 + generate_wavs.data(b"\0\0")
    blob = b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks
    with pytest.raises(WavError, match="too many chunks before the audio data"):
        parse_wav_bytes(blob)


def test_many_chunks_below_the_limit_are_read() -> None:
    junk = b"JUNK" + struct.pack("<I", 0)
    chunks = generate_wavs.fmt(1, 1, 8000, 16) + junk * 65533 + generate_wavs.data(b"\1\0")
    blob = b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks
    info = parse_wav_bytes(blob)
    assert (info.frames, info.data_offset) == (1, len(blob) - 2)


# ---- deterministic hostile variants of every fixture --------------------------------------------


def _outcome(info: WavInfo | None) -> str:
    """A hypothesis event label, so --hypothesis-show-statistics shows both outcomes occur."""
    return "refused" if info is None else "accepted"


def _declared_data_size(blob: bytes, data_offset: int) -> int:
    return struct.unpack_from("<I", blob, data_offset - 4)[0]


@pytest.mark.parametrize("name", GOOD_PARAMS)
def test_every_truncation_of_a_good_file_is_refused_or_reads_a_prefix(name: str) -> None:
    blob = fixture_bytes(name)
    full = parse_wav_bytes(blob)
    declared = _declared_data_size(blob, full.data_offset)
    sox_unspecified = 0x7FFFF000 // full.block_align * full.block_align
    runs_to_end = declared in (0, 0xFFFFFFFF, sox_unspecified)
    for length in range(len(blob)):
        info = assert_parse_is_safe(blob[:length])
        if length < full.data_offset:
            assert info is None, f"accepted {length} bytes, before the data even starts"
        if info is None:
            continue
        assert (info.samplerate, info.channels, info.bits, info.data_offset) == (
            full.samplerate, full.channels, full.bits, full.data_offset)
        if runs_to_end:
            assert info.frames <= full.frames
        else:
            assert info.frames == full.frames, f"cut at {length}: a different frame count"


@pytest.mark.parametrize("name", sorted(n for n in GOOD if GOOD[n]["file_size"] > 4096))
def test_every_cut_of_a_file_over_4k_is_parsed_alike_from_a_file_and_from_memory(
        name: str, tmp_path: Path) -> None:
    # luna_wav_open reads a 4096-byte prefix at once and preads the rest; a
    # chunk header or fmt body that crosses that border must not change the answer.
    blob = fixture_bytes(name)
    path = tmp_path / "cut.wav"
    for length in range(3900, len(blob) + 1):
        path.write_bytes(blob[:length])
        in_memory = assert_parse_is_safe(blob[:length])
        try:
            fd, from_file = wav_open(str(path))
        except WavError as exc:
            assert in_memory is None, f"cut at {length}: refused from a file only: {exc}"
            continue
        close_fd(fd)
        assert from_file == in_memory, f"cut at {length}"


@pytest.mark.parametrize("name", sorted(GOOD) + sorted(BAD))
def test_every_single_byte_change_in_a_header_is_refused_or_parsed_soundly(name: str) -> None:
    blob = fixture_bytes(name)
    header_end = min(len(blob), GOOD[name]["data_offset"] if name in GOOD else 128)
    for at in range(header_end):
        for value in {0x00, 0xFF, blob[at] ^ 0x01, blob[at] ^ 0x80}:
            assert_parse_is_safe(blob[:at] + bytes([value]) + blob[at + 1:])


@pytest.mark.parametrize("name", sorted(GOOD) + sorted(BAD))
def test_every_size_field_set_to_extreme_values_is_refused_or_parsed_soundly(name: str) -> None:
    blob = fixture_bytes(name)
    values = {*generate_wavs.INTERESTING_U32, len(blob), len(blob) - 8, len(blob) + 1,
              len(blob) // 2}
    for at in generate_wavs.size_field_offsets(blob):
        for value in values:
            mutant = bytearray(blob)
            mutant[at:at + 4] = struct.pack("<I", value % 2**32)
            assert_parse_is_safe(bytes(mutant))


# ---- hypothesis ---------------------------------------------------------------------------------

SAMPLE_TYPES = [(WAVE_FORMAT_PCM, 8), (WAVE_FORMAT_PCM, 16), (WAVE_FORMAT_PCM, 24),
                (WAVE_FORMAT_PCM, 32), (WAVE_FORMAT_IEEE_FLOAT, 32), (WAVE_FORMAT_IEEE_FLOAT, 64)]
U32_EXTREMES = [0, 1, 2, 7, 8, 0x7FFFF000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


@st.composite
def specs(draw: st.DrawFn) -> WavSpec:
    fmt_tag, bits = draw(st.sampled_from(SAMPLE_TYPES))
    channels = draw(st.integers(1, 8) | st.integers(9, 300))
    rate = draw(st.sampled_from([1, 8000, 22050, 44100, 48000, 192000])
                | st.integers(1, 2**32 - 1))
    assume(rate * channels * bits // 8 <= 0xFFFFFFFF)  # the byte-rate field must hold it
    return WavSpec(samplerate=rate, channels=channels, format=fmt_tag, bits=bits)


@st.composite
def written_wavs(draw: st.DrawFn) -> tuple[WavSpec, int, bytes]:
    """(spec, frames, file) as luna_shm's own header writer makes it, with random samples."""
    spec = draw(specs())
    frames = draw(st.integers(0, 24))
    data_bytes = frames * spec.channels * spec.bits // 8
    samples = np.random.default_rng(draw(st.integers(0, 2**32))).bytes(data_bytes)
    return spec, frames, wav_header(spec, data_bytes) + samples + b"\0" * (data_bytes & 1)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_refused_or_parsed_soundly(blob: bytes) -> None:
    event(_outcome(assert_parse_is_safe(blob)))


@settings(max_examples=300, deadline=None)
@given(written_wavs())
def test_headers_we_write_parse_back_to_their_spec(wav: tuple[WavSpec, int, bytes]) -> None:
    spec, frames, blob = wav
    info = parse_wav_bytes(blob)
    assert (info.samplerate, info.channels, info.format, info.bits, info.frames) == (
        spec.samplerate, spec.channels, spec.format, spec.bits, frames)
    assert info.extensible == (spec.channels > 2)
    assert info.data_offset == len(wav_header(spec, 0))
    assert info.data_offset % (spec.bits // 8 if spec.bits != 24 else 1) == 0  # aligned views


@st.composite
def mutations(draw: st.DrawFn, blob: bytes) -> bytes:
    """blob with 1 to 4 changes: byte flips, a cut, size fields set to extreme values."""
    mutant = bytearray(blob)
    size_fields = generate_wavs.size_field_offsets(blob)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "cut", "size", "field"]))
        if kind == "byte" and mutant:
            at = draw(st.integers(0, min(len(mutant), 160) - 1))
            mutant[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del mutant[draw(st.integers(0, len(mutant))):]
        elif kind == "size" and size_fields:
            at = draw(st.sampled_from(size_fields))
            value = draw(st.sampled_from(U32_EXTREMES) | st.integers(0, 2**32 - 1)
                         | st.integers(0, 2 * len(blob)))
            mutant[at:at + 4] = struct.pack("<I", value)[:max(0, len(mutant) - at)]
        elif kind == "field" and len(mutant) >= 2:  # a u16 of the fmt chunk and around it
            at = draw(st.integers(0, min(len(mutant), 80) // 2 - 1)) * 2
            mutant[at:at + 2] = struct.pack("<H", draw(st.sampled_from([0, 1, 2, 3, 0xFFFE,
                                                                          0xFFFF])))
    return bytes(mutant)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_headers_we_write_are_refused_or_parsed_soundly(data: st.DataObject) -> None:
    _, _, blob = data.draw(written_wavs())
    event(_outcome(assert_parse_is_safe(data.draw(mutations(blob)))))


@settings(max_examples=100, deadline=None)
@given(written_wavs())
def test_every_truncation_of_a_header_we_write_is_refused_or_reads_a_prefix(
        wav: tuple[WavSpec, int, bytes]) -> None:
    _, frames, blob = wav
    header_len = parse_wav_bytes(blob).data_offset
    data_end = header_len + frames * parse_wav_bytes(blob).block_align
    for length in range(len(blob)):
        info = assert_parse_is_safe(blob[:length])
        if length < data_end:
            assert info is None, f"accepted a file cut at {length} of {len(blob)} bytes"
        else:
            assert info is not None and info.frames == frames


CHUNK_IDS = [b"fmt ", b"data", b"fact", b"LIST", b"JUNK", b"bext", b"cue ", b"PEAK", b"ds64"]


@st.composite
def fmt_bodies(draw: st.DrawFn) -> bytes:
    """A sound fmt body (plain, WAVEFORMATEX or EXTENSIBLE), sometimes with a field changed."""
    spec = draw(specs())
    style = draw(st.sampled_from(["plain", "ex", "extensible"]))
    if style == "extensible":
        valid = draw(st.integers(1, spec.bits))
        body = generate_wavs.fmt_extensible(spec.format, spec.channels, spec.samplerate,
                                            spec.bits, valid_bits=valid)[8:]
    else:
        body = generate_wavs.fmt(spec.format, spec.channels, spec.samplerate, spec.bits,
                                 cb_size=0 if style == "ex" else None)[8:]
    if draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1:]
    return body


@st.composite
def chunk_files(draw: st.DrawFn) -> bytes:
    """A RIFF file of random chunks: known and unknown ids, true and lying sizes, pads or not.

    Most hold an fmt and a data chunk somewhere among the others, so that
    both outcomes are common. Some start with a JUNK chunk of about 4 KiB, so
    that the chunks after it cross the 4096-byte prefix that luna_wav_open
    reads in one go.
    """
    chunks: list[tuple[bytes, bytes]] = [
        (draw(st.sampled_from(CHUNK_IDS) | st.binary(min_size=4, max_size=4)),
         draw(st.binary(max_size=64)))
        for _ in range(draw(st.integers(0, 4)))
    ]
    if draw(st.integers(0, 3)):
        chunks.insert(draw(st.integers(0, len(chunks))), (b"fmt ", draw(fmt_bodies())))
    if draw(st.integers(0, 3)):
        chunks.insert(draw(st.integers(0, len(chunks))), (b"data", draw(st.binary(max_size=96))))
    if draw(st.integers(0, 3)) == 0:
        chunks.insert(0, (b"JUNK", bytes(draw(st.integers(4056, 4090)))))
    pieces = []
    for ckid, body in chunks:
        size = len(body)
        if draw(st.integers(0, 3)) == 0:  # a size field that lies
            size = draw(st.sampled_from(U32_EXTREMES) | st.integers(0, 96)
                        | st.integers(0, 2**32 - 1))
        pad = b"\0" if len(body) % 2 and draw(st.integers(0, 5)) else b""
        pieces.append(ckid + struct.pack("<I", size) + body + pad)
    form = b"WAVE" + b"".join(pieces)
    riff_size = draw(st.just(len(form)) | st.sampled_from(U32_EXTREMES))
    magic = draw(st.sampled_from([b"RIFF"] * 6 + [b"RIFX", b"RF64"]))
    return magic + struct.pack("<I", riff_size) + form + draw(st.binary(max_size=4))


@pytest.fixture(scope="module")
def scratch_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file that the chunk-sequence test rewrites for every example."""
    return tmp_path_factory.mktemp("chunks") / "example.wav"


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blob=chunk_files())
def test_random_chunk_sequences_parse_soundly_and_alike_from_memory_and_from_a_file(
        scratch_wav: Path, blob: bytes) -> None:
    in_memory = assert_parse_is_safe(blob)
    event(_outcome(in_memory))
    scratch_wav.write_bytes(blob)
    try:
        fd, from_file = wav_open(str(scratch_wav))
    except WavError as exc:
        assert in_memory is None
        with pytest.raises(WavError) as from_memory:
            parse_wav_bytes(blob)
        assert str(exc) == f"{scratch_wav}: {from_memory.value}"
        return
    close_fd(fd)
    assert from_file == in_memory


# ---- the seed corpus and the fuzzer's regressions -----------------------------------------------


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_seed_corpus_file_is_refused_or_read_exactly_by_read_wav(name: str) -> None:
    path = CORPUS / name
    blob = path.read_bytes()
    info = assert_parse_is_safe(blob)
    for mmap in (True, False):
        if info is None:
            with pytest.raises(WavError, match=f"^{re.escape(str(path))}: "):
                read_wav(path, mmap=mmap)
        else:
            data, rate = read_wav(path, mmap=mmap)
            assert rate == info.samplerate
            np.testing.assert_array_equal(data, expected_samples(blob, info), strict=True)


# ---- the C parser under AddressSanitizer and UndefinedBehaviorSanitizer -------------------------

@pytest.fixture(scope="module")
def sanitized_parser(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """parse_corpus built with ASan + UBSan (alignment included), and its environment.

    Skips only by capability probe (tests/sanitizers.py); a build failure of our own C
    is a failure.
    """
    return build_sanitized("parse_corpus.c", tmp_path_factory.mktemp("sanitized"))


@pytest.fixture(scope="module")
def sanitizer_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Fixtures, the seed corpus, and a few hundred fresh mutations written to tmp_path."""
    work = tmp_path_factory.mktemp("mutations")
    mutants = []
    fixtures = sorted(DATA.glob("*.wav"))
    for number, path in enumerate(fixtures):
        for k, blob in enumerate(generate_wavs.mutations(path.read_bytes(), 7000 + number, 6)):
            mutants.append(work / f"{path.stem}_{k}.wav")
            mutants[-1].write_bytes(blob)
    rng = np.random.default_rng(2024)
    for k in range(40):
        mutants.append(work / f"random_{k}.wav")
        mutants[-1].write_bytes(b"RIFF" + rng.bytes(int(rng.integers(0, 300))))
    return [*fixtures, *sorted(CORPUS.iterdir()), *mutants]


def _run_sanitized(binary: Path, env: dict[str, str], inputs: list[Path],
                   tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), "-t", str(tmp_path), *map(str, inputs)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_sanitizer_build_of_the_parser_survives_fixtures_corpus_and_mutations(
        sanitized_parser: tuple[Path, dict[str, str]], sanitizer_inputs: list[Path],
        tmp_path: Path) -> None:
    binary, env = sanitized_parser
    assert len(sanitizer_inputs) > 300
    done = _run_sanitized(binary, env, sanitizer_inputs, tmp_path)
    reports = [mark for mark in SANITIZER_MARKS if mark in done.stderr]
    assert reports == [], done.stderr[-4000:]
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(done.stdout.splitlines()) == len(sanitizer_inputs)
    assert list(tmp_path.iterdir()) == []  # its scratch file was unlinked


def test_sanitizer_build_gives_the_same_answers_as_the_python_binding(
        sanitized_parser: tuple[Path, dict[str, str]], sanitizer_inputs: list[Path],
        tmp_path: Path) -> None:
    binary, env = sanitized_parser
    done = _run_sanitized(binary, env, sanitizer_inputs, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    for line in done.stdout.splitlines():
        path, verdict, *rest = line.split("\t")
        blob = Path(path).read_bytes()
        if verdict == "ERR":
            with pytest.raises(WavError) as refused:
                parse_wav_bytes(blob)
            assert str(refused.value) == rest[0], path
        else:
            info = parse_wav_bytes(blob)
            python_side = [info.samplerate, info.channels, info.format, info.bits,
                           info.block_align, int(info.extensible), info.data_offset,
                           info.data_bytes, info.frames]
            assert [int(v) for v in rest] == python_side, path
