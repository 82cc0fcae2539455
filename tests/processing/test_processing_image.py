"""Image processor against transformers 5.23's goldens, for every image and soft-token budget.

The resize re-creates torch's uint8 anti-aliased bicubic kernel, so pixels are compared exactly:
max |Δpixel| measured 0 on all 17 golden (image, budget) pairs. Plain Pillow BICUBIC would be
off by up to 2/255 (also measured), which the test would catch.
"""

import numpy as np
import pytest
from patch_images import reassemble
from PIL import Image
from safetensors.numpy import load_file

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.processing import Gemma4UImageProcessor
from mlx_gemma4u.processing.patches import target_size

MAX_PIXEL_DIFF = 0.0  # measured: bit-identical to transformers' torchvision output


def _golden_cases(index: dict) -> list[str]:
    return sorted(index["images"])


def test_every_image_and_budget_matches_transformers(fixtures_dir, golden_dir, golden_index):
    processor = Gemma4UImageProcessor()
    stems = _golden_cases(golden_index)
    assert len(stems) == 17
    for stem in stems:
        case = golden_index["images"][stem]
        golden = load_file(golden_dir / "images" / f"{stem}.safetensors")
        out = processor(
            images=Image.open(fixtures_dir / case["source"]),
            max_soft_tokens=case["max_soft_tokens"],
            return_tensors="np",
        )
        pixels, positions = out["pixel_values"][0], out["image_position_ids"][0]
        assert (
            out["pixel_values"].shape == (1, case["max_soft_tokens"], 6912) and out["pixel_values"].dtype == np.float32
        )
        assert positions.dtype == np.int64
        np.testing.assert_array_equal(positions, golden["image_position_ids"], err_msg=stem)
        assert int(out["num_soft_tokens_per_image"][0]) == case["num_soft_tokens"], stem
        diff = np.abs(pixels[golden["row_index"]] - golden["rows"]).max()
        assert diff <= MAX_PIXEL_DIFF, f"{stem}: max |Δpixel| {diff}"
        resized = np.asarray(Image.open(golden_dir / "images" / f"{stem}.png"))
        np.testing.assert_array_equal(reassemble(pixels, positions), resized, err_msg=stem)


def test_paths_numpy_and_pil_inputs_agree(fixtures_dir):
    processor = Gemma4UImageProcessor(max_soft_tokens=70)
    path = fixtures_dir / "images" / "portrait_grace_hopper_512x600.jpg"
    from_path = processor(str(path), return_tensors="np")
    from_array = processor(np.asarray(Image.open(path)), return_tensors="np")
    from_chw = processor(np.asarray(Image.open(path)).transpose(2, 0, 1), return_tensors="np")
    for other in (from_array, from_chw):
        np.testing.assert_array_equal(from_path["pixel_values"], other["pixel_values"])


def test_alpha_is_composited_on_white(fixtures_dir):
    out = Gemma4UImageProcessor()(str(fixtures_dir / "images" / "rgba_chelsea_451x300.png"), return_tensors="np")
    assert out["pixel_values"][0, 0].min() == 1.0  # the top-left corner is fully transparent


def test_exif_orientation_is_applied_to_files(tmp_path):
    pixels = np.zeros((96, 48, 3), np.uint8)
    pixels[:48] = 255  # white on top, stored sideways with "rotate 90" in EXIF
    stored = Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    stored.save(tmp_path / "sideways.jpg", exif=exif.tobytes(), quality=95)
    out = Gemma4UImageProcessor(max_soft_tokens=70)(str(tmp_path / "sideways.jpg"), return_tensors="np")
    width = out["image_position_ids"][0, :, 0].max() + 1
    height = out["image_position_ids"][0, :, 1].max() + 1
    assert height > width  # upright (portrait), as transformers' load_image gives


def test_mlx_output(fixtures_dir):
    import mlx.core as mx

    out = Gemma4UImageProcessor(max_soft_tokens=70)(
        str(fixtures_dir / "images" / "tiny_coffee_40x27.png"), return_tensors="mlx"
    )
    assert isinstance(out["pixel_values"], mx.array) and out["pixel_values"].shape == (1, 70, 6912)
    assert out["image_position_ids"].dtype == mx.int64


@pytest.mark.parametrize(
    "hw, budget, expected",
    [
        ((480, 640), 280, (672, 912)),
        ((1080, 1920), 560, (816, 1488)),
        ((100, 2000), 70, (48, 1776)),
        ((1024, 1024), 1120, (1584, 1584)),
        ((200, 300), 70, (288, 480)),
        ((1, 100000), 70, (48, 3360)),
    ],
)
def test_target_size_table_from_the_spec(hw, budget, expected):
    assert target_size(*hw, budget) == expected


def test_image_smaller_than_a_patch_is_scaled_up_like_transformers():
    out = Gemma4UImageProcessor(max_soft_tokens=70)(np.full((5, 3, 3), 200, np.uint8), return_tensors="np")
    assert int(out["num_soft_tokens_per_image"][0]) > 0
    assert np.allclose(out["pixel_values"][0, 0], 200 / 255)


@pytest.mark.parametrize("budget", [0, 100, 281, "280", 70.5])
def test_unsupported_budget_is_refused(budget):
    processor = Gemma4UImageProcessor()
    with pytest.raises(InputError, match="max_soft_tokens"):
        processor(np.zeros((48, 48, 3), np.uint8), max_soft_tokens=budget)


def test_bad_image_files_give_one_clear_error(tmp_path, fixtures_dir):
    processor = Gemma4UImageProcessor()
    (tmp_path / "notes.jpg").write_text("this is text, not a picture")
    truncated = (fixtures_dir / "images" / "landscape_rocket_640x427.jpg").read_bytes()[:5000]
    (tmp_path / "cut.jpg").write_bytes(truncated)
    cases = {
        str(tmp_path / "missing.png"): "does not exist",
        str(tmp_path / "notes.jpg"): "not an image",
        str(tmp_path / "cut.jpg"): "truncated",
        "http://127.0.0.1:9/none.png": "Could not download",
    }
    for source, message in cases.items():
        with pytest.raises(InputError, match=message):
            processor(source)
    with pytest.raises(InputError, match="no content"):
        processor(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(InputError, match="uint8"):
        processor(np.full((10, 10, 3), 7.5))
