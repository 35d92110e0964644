"""The drop-in import works from both documented places."""

import numpy as np

from helpers import assert_child_ok, run_in_private_shm


def test_documented_names_import_from_package_and_module() -> None:
    import luna_shm
    from luna_shm import temp_audio

    for name in ("get_temp_audio_path", "cleanup_temp_audio", "cleanup_all_temp_audio",
                 "is_using_ram_disk"):
        assert getattr(luna_shm, name) is getattr(temp_audio, name)


def test_write_then_read_round_trip_in_private_dirs(private_dirs) -> None:
    from luna_shm import get_temp_audio_path, read_wav, write_wav

    path = get_temp_audio_path()
    assert path.startswith(private_dirs.ram + "/luna_audio_")
    audio = np.arange(-500, 500, dtype=np.int16)
    write_wav(path, audio, 16000)
    back, rate = read_wav(path)
    assert rate == 16000
    np.testing.assert_array_equal(back, audio)


def test_default_dir_is_dev_shm_in_a_private_mount() -> None:
    done = run_in_private_shm("""
        import luna_shm
        p = luna_shm.get_temp_audio_path()
        print(p, luna_shm.is_using_ram_disk())
    """)
    out = assert_child_ok(done)
    assert out.startswith("/dev/shm/luna_audio_") and out.strip().endswith("True")
