"""Video processor against transformers 5.23's goldens (torchcodec decoding, torchvision resize).

PyAV's rgb24 frames and the torch-exact resize give identical pixels: max |Δpixel| measured 0
on the first and last frame of every golden clip and on rows 0 and n-1 of every frame.
"""

import numpy as np
import pytest
from patch_images import reassemble
from PIL import Image
from safetensors.numpy import load_file

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.processing import Gemma4UVideoProcessor
from mlx_gemma4u.processing.video import sample_indices

MAX_PIXEL_DIFF = 0.0  # measured


def _golden_videos(index):
    return {stem: case for stem, case in index["videos"].items() if "error" not in case}


def test_every_golden_clip_matches_transformers(fixtures_dir, golden_dir, golden_index):
    processor = Gemma4UVideoProcessor()
    cases = _golden_videos(golden_index)
    assert len(cases) == 3
    for stem, case in cases.items():
        golden = load_file(golden_dir / "videos" / f"{stem}.safetensors")
        out = processor(str(fixtures_dir / case["source"]), return_tensors="np", **case["kwargs"])
        pixels, positions = out["pixel_values_videos"], out["video_position_ids"]
        assert pixels.shape == (case["frames"], 70, 6912)
        np.testing.assert_array_equal(positions, golden["video_position_ids"], err_msg=stem)
        count = int(out["num_soft_tokens_per_video"][0])
        for frame in range(case["frames"]):
            diff = np.abs(pixels[frame][[0, count - 1]] - golden[f"rows_frame{frame:02d}"]).max()
            assert diff <= MAX_PIXEL_DIFF, f"{stem} frame {frame}: {diff}"
        for frame in (0, case["frames"] - 1):
            expected = np.asarray(Image.open(golden_dir / "videos" / f"{stem}__frame{frame:02d}.png"))
            np.testing.assert_array_equal(reassemble(pixels[frame], positions[frame]), expected)


def test_short_clip_takes_every_frame_where_transformers_refuses(fixtures_dir, golden_index):
    assert (
        "exceeds total_num_frames=30"
        in golden_index["videos"]["pan_coffee_240x160_15fps_2s_vp9.webm__default"]["error"]
    )
    out = Gemma4UVideoProcessor()(str(fixtures_dir / "video" / "pan_coffee_240x160_15fps_2s_vp9.webm"))
    assert out["num_frames_per_video"].tolist() == [30]
    assert out["video_metadata"][0].frames_indices == list(range(30))


def test_sampling_rules():
    assert sample_indices(100, 10.0, 8, None).tolist() == [0, 12, 25, 37, 50, 62, 75, 87]
    assert sample_indices(100, 10.0, None, 2).tolist() == list(range(0, 100, 5))
    assert sample_indices(5, 10.0, 32, None).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match="mutually exclusive"):
        sample_indices(100, 10.0, 8, 2)


def test_frame_array_input_uses_24_fps():
    frames = np.zeros((48, 60, 80, 3), np.uint8)
    out = Gemma4UVideoProcessor(num_frames=4)(frames)
    assert out["pixel_values_videos"].shape == (4, 70, 6912)
    assert out["video_metadata"][0].timestamps == [0.0, 0.5, 1.0, 1.5]


def test_bad_videos_give_one_clear_error(tmp_path, fixtures_dir):
    processor = Gemma4UVideoProcessor()
    (tmp_path / "notes.mp4").write_text("not a video")
    cases = {
        str(tmp_path / "missing.mp4"): "does not exist",
        str(tmp_path / "notes.mp4"): "Could not decode",
        str(fixtures_dir / "audio" / "speech_16k_mono.wav"): "no video stream",
    }
    for source, message in cases.items():
        with pytest.raises(InputError, match=message):
            processor(source)
    with pytest.raises(InputError, match="max_soft_tokens"):
        processor(np.zeros((2, 48, 48, 3), np.uint8), max_soft_tokens=99)
