"""Audio feature extractor against transformers 5.23's goldens, for every clip in fixtures/audio.

16 kHz clips are read with soundfile and framed bit-identically. The 22.05 kHz and 48 kHz stereo
clips are resampled here with soxr (HQ) while the goldens were fed sox's output (dithered to
16 bits): max |Δsample| measured 6.2e-5, about 2 LSB of 16-bit audio; the bound below is 1e-4.
"""

import numpy as np
import pytest
import soundfile
from safetensors.numpy import load_file

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.processing import Gemma4UAudioFeatureExtractor
from mlx_gemma4u.processing.audio import num_audio_tokens

RESAMPLED_BOUND = 1e-4  # measured 6.2e-5 (soxr vs sox, incl. sox's 16-bit dither)


def test_every_clip_matches_transformers(fixtures_dir, golden_dir, golden_index):
    extractor = Gemma4UAudioFeatureExtractor()
    assert len(golden_index["audio"]) == 5
    for name, case in golden_index["audio"].items():
        golden = load_file(golden_dir / "audio" / f"{name}.safetensors")
        out = extractor(str(fixtures_dir / "audio" / name), return_tensors="np")
        features, mask = out["input_features"][0], out["input_features_mask"][0]
        assert features.shape == golden["input_features"].shape == (case["frames"], 640), name
        assert mask.dtype == bool and mask.all() and mask.sum() == golden["input_features_mask"].sum()
        assert num_audio_tokens(case["samples"]) == case["audio_tokens"]
        bound = 0.0 if case["fed_waveform"].startswith("audio/") else RESAMPLED_BOUND
        diff = np.abs(features - golden["input_features"]).max()
        assert diff <= bound, f"{name}: max |Δsample| {diff}"


def test_the_45_second_clip_keeps_all_1125_frames(fixtures_dir):
    out = Gemma4UAudioFeatureExtractor()(str(fixtures_dir / "audio" / "speech_long_45s_16k.ogg"))
    assert out["input_features"].shape == (1, 1125, 640)


def test_max_audio_seconds_refuses_longer_clips(fixtures_dir):
    extractor = Gemma4UAudioFeatureExtractor(max_audio_seconds=30)
    with pytest.raises(InputError, match="max_audio_seconds=30"):
        extractor(str(fixtures_dir / "audio" / "speech_long_45s_16k.ogg"))
    assert extractor(np.zeros(16000 * 30, np.float32))["input_features"].shape == (1, 750, 640)


def test_stereo_array_with_rate_equals_the_file(fixtures_dir):
    path = fixtures_dir / "audio" / "speech_48k_stereo.wav"
    samples, rate = soundfile.read(path, dtype="float32")
    extractor = Gemma4UAudioFeatureExtractor()
    from_file = extractor(str(path))["input_features"]
    np.testing.assert_array_equal(extractor(samples, sampling_rate=rate)["input_features"], from_file)
    np.testing.assert_array_equal(extractor((samples, rate))["input_features"], from_file)


def test_batch_is_padded_with_masked_zero_frames():
    out = Gemma4UAudioFeatureExtractor()([np.ones(1300, np.float32), np.ones(400, np.float32)])
    assert out["input_features"].shape == (2, 3, 640)
    np.testing.assert_array_equal(out["input_features_mask"], [[True, True, True], [True, False, False]])
    assert out["input_features"][0, 2, 20:].sum() == 0 and out["input_features"][1, 1:].sum() == 0


def test_bad_audio_gives_one_clear_error(tmp_path):
    extractor = Gemma4UAudioFeatureExtractor()
    (tmp_path / "notes.wav").write_text("not audio")
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    cases = [
        (str(tmp_path / "missing.flac"), "does not exist"),
        (str(tmp_path / "notes.wav"), "Could not read"),
        (str(tmp_path / "empty.wav"), "no samples"),
        (np.full(1000, np.nan, np.float32), "NaN"),
        (np.zeros((2, 16000), np.float32), "transpose"),
        ("https://127.0.0.1:9/clip.wav", "Could not download"),
    ]
    for clip, message in cases:
        with pytest.raises(InputError, match=message):
            extractor(clip)


def test_mp3_is_read(fixtures_dir, tmp_path):
    """mp3 (libsndfile 1.1+, bundled with soundfile's wheels) decodes to the same clip, give or take
    the encoder's padding, and is named wherever the accepted formats are listed."""
    from mlx_gemma4u.cli.main import build_parser
    from mlx_gemma4u.processing.audio import FORMATS, to_waveform

    wav = to_waveform(str(fixtures_dir / "audio" / "speech_16k_mono.wav"))
    soundfile.write(tmp_path / "speech.mp3", wav, 16000, format="MP3")
    mp3 = to_waveform(str(tmp_path / "speech.mp3"))
    assert abs(len(mp3) - len(wav)) <= 2304  # at most two 1152-sample mp3 frames of padding
    n = min(len(mp3), len(wav))
    lag = int(np.argmax(np.correlate(mp3[:n], wav[: n - 2304], mode="valid")))
    aligned = mp3[lag : lag + n - 2304]
    assert np.corrcoef(aligned, wav[: n - 2304])[0, 1] > 0.95
    assert "mp3" in FORMATS
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    assert "mp3" in generate.format_help()
