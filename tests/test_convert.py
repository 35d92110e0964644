"""Convert-on-write: float samples become PCM in one C pass, exactly as documented.

The documented rule: scale by the target's largest positive value (1.0 -> 32767), clip to
the target's range, round to nearest with ties to even (numpy.rint), NaN -> 0 (silence).
numpy computes the same rule independently here; soundfile reads the files.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from luna_shm import AudioPool, read_wav, write_wav

# target subtype -> (scale, lowest, highest, offset added in the file: 8-bit is unsigned)
RULES = {
    "PCM_U8": (127.0, -128, 127, 128),
    "PCM_16": (32767.0, -32768, 32767, 0),
    "PCM_24": (8388607.0, -8388608, 8388607, 0),
    "PCM_32": (2147483647.0, -2147483648, 2147483647, 0),
}


def awkward_signal(dtype: str) -> np.ndarray:
    """Ordinary audio plus every value the rule has to get right."""
    rng = np.random.default_rng(7)
    body = rng.uniform(-1.3, 1.3, 20_003)
    edges = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 1e30, -1e30, 65536.0]
    # exact .5 ties after scaling, for each target: they must go to the even neighbour
    for scale, _, _, _ in RULES.values():
        edges += [k / scale for k in (0.5, 1.5, 2.5, -0.5, -1.5, -2.5)]
    return np.concatenate([body, edges]).astype(dtype)


def expected(data: np.ndarray, subtype: str) -> np.ndarray:
    """The documented rule, computed by numpy in the source's own precision for 8/16
    bits (float32 stays float32) and in float64 for 24/32 bits."""
    scale, low, high, offset = RULES[subtype]
    work = data.astype(np.float64) if subtype in ("PCM_24", "PCM_32") else data
    scaled = work * work.dtype.type(scale)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=high, neginf=low)
    return np.clip(np.rint(scaled), low, high).astype(np.int64) + offset


def file_samples(path: str, subtype: str) -> np.ndarray:
    """The integers stored in the file, read by our reader (24-bit back to its own range)."""
    data, _ = read_wav(path, mmap=False)
    values = data.astype(np.int64)
    return values >> 8 if subtype == "PCM_24" else values


@pytest.mark.parametrize("subtype", list(RULES))
@pytest.mark.parametrize("source", ["float32", "float64"])
def test_write_wav_converts_float_to_pcm_by_the_documented_rule(private_dirs, subtype, source):
    data = awkward_signal(source)
    path = write_wav(None, data, 16000, subtype=subtype)
    np.testing.assert_array_equal(file_samples(path, subtype), expected(data, subtype))
    assert sf.info(path).subtype == subtype


@pytest.mark.parametrize("subtype", list(RULES))
def test_soundfile_reads_converted_audio_as_the_same_float_signal(private_dirs, subtype):
    data = np.linspace(-1, 1, 4001, dtype=np.float32).reshape(-1, 1).repeat(2, axis=1)
    path = write_wav(None, data, 22050, subtype=subtype)
    back, rate = sf.read(path, dtype="float64")
    assert rate == 22050 and back.shape == (4001, 2)
    scale = RULES[subtype][0]
    # libsndfile scales PCM back by 2**(bits-1); ours by 2**(bits-1)-1: within two steps
    assert np.max(np.abs(back - data)) <= 2.0 / scale + 1e-9


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32"])
def test_a_pool_converts_into_its_slot_exactly_like_write_wav(private_dirs, subtype):
    data = awkward_signal("float32")
    reference = write_wav(None, data, 16000, subtype=subtype)
    with AudioPool(slots=1, max_bytes=data.size * 4) as pool, \
            pool.write_wav(data, 16000, subtype=subtype) as pooled:
        np.testing.assert_array_equal(read_wav(pooled.path, mmap=False)[0],
                                      read_wav(reference, mmap=False)[0])


def test_float_to_pcm_of_an_odd_length_uses_the_same_rule_for_the_tail(private_dirs):
    # The SSE2 loop takes 8 samples at a time; the last 1-7 go through the scalar tail.
    for length in range(1, 20):
        data = awkward_signal("float32")[-length:]
        path = write_wav(None, data, 8000, subtype="PCM_16")
        np.testing.assert_array_equal(file_samples(path, "PCM_16"), expected(data, "PCM_16"))


def test_converting_integers_to_another_width_is_refused(private_dirs):
    with pytest.raises(ValueError,
                       match=r"subtype 'PCM_16' stores int16 samples, but data is int32"):
        write_wav(None, np.zeros(10, np.int32), 8000, subtype="PCM_16")


def test_the_product_is_rounded_in_the_datas_own_precision_for_16_bits_as_documented(
        private_dirs) -> None:
    # 0.48825037479400635 * 32767 = 15998.50003 exactly (float64); float32's product rounds
    # to 15998.5, a tie, which goes to the even 15998. The docs say which one each type gets.
    x = 0.48825037479400635
    as_float32 = write_wav(None, np.array([x], np.float32), 16000, subtype="PCM_16")
    as_float64 = write_wav(None, np.array([x], np.float64), 16000, subtype="PCM_16")
    assert read_wav(as_float32, mmap=False)[0].tolist() == [15998]
    assert read_wav(as_float64, mmap=False)[0].tolist() == [15999]
    as_24_bits = write_wav(None, np.array([x], np.float32), 16000, subtype="PCM_24")
    assert read_wav(as_24_bits, mmap=False)[0].tolist() == [round(x * 8388607) << 8]
