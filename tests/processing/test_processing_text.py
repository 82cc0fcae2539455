"""Full processor calls and chat templates against transformers 5.23's goldens.

Token ids, mm_token_type_ids and attention masks must be identical; the rendered chat templates
must be identical strings.
"""

import json
import subprocess
import sys

import bare_package
import numpy as np
import pytest
import soundfile
from PIL import Image
from safetensors.numpy import load_file

from mlx_gemma4u.errors import InputError


def _prompt_cases(processor, fixtures_dir):
    """The five full calls of make_goldens.py, with the same inputs."""
    image = lambda name: Image.open(fixtures_dir / "images" / name)  # noqa: E731
    wave = soundfile.read(fixtures_dir / "audio" / "speech_16k_mono.wav", dtype="float32")[0]
    it, at = processor.image_token, processor.audio_token
    return {
        "text_only": dict(text=["Hello there, how are you?"]),
        "one_image": dict(text=[f"What is in this picture? {it}"], images=[[image("landscape_rocket_640x427.jpg")]]),
        "two_images": dict(
            text=[f"{it} Compare with {it} please."],
            images=[[image("portrait_grace_hopper_512x600.jpg"), image("panorama_hubble_1000x100.webp")]],
        ),
        "image_and_audio": dict(
            text=[f"{it} Listen: {at} What do you see and hear?"],
            images=[[image("rgba_chelsea_451x300.png")]],
            audio=[wave],
        ),
        "batch_padded": dict(
            text=["Short.", f"A longer prompt with an image {it} in it."], images=[[], [image("tiny_coffee_40x27.png")]]
        ),
    }


def test_full_calls_match_transformers(processor, fixtures_dir, golden_dir, golden_index):
    for case, kwargs in _prompt_cases(processor, fixtures_dir).items():
        golden = load_file(golden_dir / "prompts" / f"{case}.safetensors")
        out = processor(**kwargs, return_tensors="np")
        assert list(out["input_ids"].shape) == golden_index["prompts"][case]["shape"], case
        for key in ("input_ids", "mm_token_type_ids", "attention_mask"):
            np.testing.assert_array_equal(out[key], golden[key], err_msg=f"{case}: {key}")
        expected = {"input_ids", "attention_mask", "mm_token_type_ids"}
        expected |= {"pixel_values", "image_position_ids"} if "images" in kwargs else set()
        expected |= {"input_features", "input_features_mask"} if "audio" in kwargs else set()
        assert set(out) == expected, case


def test_audio_prompts_match_transformers(processor, fixtures_dir, golden_dir, golden_index):
    for name, case in golden_index["audio"].items():
        golden = load_file(golden_dir / "audio" / f"{name}.safetensors")
        out = processor(
            text=f"Transcribe: {processor.audio_token}", audio=str(fixtures_dir / "audio" / name), return_tensors="np"
        )
        np.testing.assert_array_equal(out["input_ids"][0], golden["input_ids"], err_msg=name)
        np.testing.assert_array_equal(out["mm_token_type_ids"][0], golden["mm_token_type_ids"], err_msg=name)
        assert (out["input_ids"][0] == processor.audio_token_id).sum() == case["audio_tokens"]


def test_video_prompts_match_transformers(processor, fixtures_dir, golden_dir, golden_index):
    for stem, case in golden_index["videos"].items():
        if "error" in case:
            continue
        golden = load_file(golden_dir / "videos" / f"{stem}.safetensors")
        out = processor(
            text=[f"Describe this video. {processor.video_token}"],
            videos=[str(fixtures_dir / case["source"])],
            return_tensors="np",
            **case["kwargs"],
        )
        np.testing.assert_array_equal(out["input_ids"][0], golden["input_ids"], err_msg=stem)
        np.testing.assert_array_equal(out["mm_token_type_ids"][0], golden["mm_token_type_ids"], err_msg=stem)
        assert out["num_frames_per_video"].tolist() == [case["frames"]]
        text = processor.tokenizer.decode(out["input_ids"][0].tolist()).replace(processor.video_token, "")
        assert text == case["prompt"], stem


def test_chat_templates_match_transformers(processor, golden_dir):
    cases = json.loads((golden_dir / "chat_cases.json").read_text())
    assert {"system_multi_turn", "media_items", "thinking", "no_generation_prompt", "single_user"} <= set(cases)
    for case, spec in cases.items():
        rendered = processor.apply_chat_template(spec["messages"], **spec.get("kwargs", {}))
        assert rendered == (golden_dir / "chat" / f"{case}.txt").read_text(), case


def test_chat_template_tokenize_loads_media_and_skips_a_second_bos(processor, fixtures_dir):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": str(fixtures_dir / "images" / "tiny_coffee_40x27.png")},
                {"type": "audio", "url": str(fixtures_dir / "audio" / "speech_tiny_25ms_16k.wav")},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    out = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="mlx",
        processor_kwargs={"max_soft_tokens": 70},
    )
    ids = np.array(out["input_ids"])[0]
    assert ids[0] == 2 and ids[1] == 105  # one <bos>, then <|turn>
    assert (ids == processor.image_token_id).sum() == 60 and (ids == processor.audio_token_id).sum() == 1
    assert out["pixel_values"].shape == (1, 70, 6912) and out["input_features"].shape == (1, 1, 640)


def test_placeholder_count_mismatch_is_one_clear_error(processor):
    with pytest.raises(InputError, match="1 <\\|image\\|> placeholder"):
        processor(text="No image here <|image|>", images=None)
    with pytest.raises(InputError, match="0 <\\|audio\\|> placeholder"):
        processor(text="Where is the clip?", audio=np.zeros(640, np.float32))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)


def test_image_and_audio_processing_do_not_import_torch(fixtures_dir):
    # torch is installed in the test environment, and the package's own __init__ imports mlx-lm,
    # whose transformers import pulls torch in whenever it is installed. So this run registers a
    # bare `mlx_gemma4u` package to skip that __init__ and checks what the processing code imports.
    script = (
        bare_package.PRELUDE
        + """
from mlx_gemma4u.processing.image import Gemma4UImageProcessor
from mlx_gemma4u.processing.audio import Gemma4UAudioFeatureExtractor
Gemma4UImageProcessor()(sys.argv[1], return_tensors="mlx")
Gemma4UAudioFeatureExtractor()(sys.argv[2], return_tensors="mlx")
assert "torch" not in sys.modules and "transformers" not in sys.modules, "torch or transformers was imported"
print("ok")
"""
    )
    result = _run(
        script,
        str(fixtures_dir / "images" / "tiny_coffee_40x27.png"),
        str(fixtures_dir / "audio" / "speech_48k_stereo.wav"),
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_whole_pipeline_runs_where_torch_is_not_installed(hf_tokenizer_dir, fixtures_dir):
    # sys.modules["torch"] = None makes find_spec report torch missing and `import torch` fail,
    # as on a Mac without it: transformers (via mlx-lm) then skips torch, and any torch import
    # in this package would raise.
    script = """
import sys
sys.modules["torch"] = None
sys.modules["torchvision"] = None
import mlx_gemma4u  # noqa: F401
from mlx_gemma4u.processing import Gemma4UProcessor
processor = Gemma4UProcessor.from_pretrained(sys.argv[1])
media = sys.argv[2]
out = processor(text="<|image|> <|audio|> <|video|>", images=media + "/images/tiny_coffee_40x27.png",
                audio=media + "/audio/speech_48k_stereo.wav",
                videos=media + "/video/pan_coffee_240x160_15fps_2s_vp9.webm",
                num_frames=2, return_tensors="mlx")
assert sys.modules["torch"] is None and sys.modules["torchvision"] is None
print("ok", out["input_ids"].shape[1])
"""
    result = _run(script, str(hf_tokenizer_dir), str(fixtures_dir))
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr


def test_installing_does_not_pull_in_torch():
    import importlib.metadata
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    runtime = list(pyproject["project"]["dependencies"])
    for package in ("mlx-lm", "transformers"):  # what the runtime dependencies require in turn
        runtime += [r for r in importlib.metadata.requires(package) or [] if "extra ==" not in r]
    assert not [r for r in runtime if r.lower().startswith(("torch", "torchvision"))], runtime


def test_processing_sources_never_import_torch_or_transformers():
    import ast
    from pathlib import Path

    import mlx_gemma4u.processing as processing

    for source in Path(processing.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            assert not [n for n in names if n.split(".")[0] in ("torch", "torchvision", "transformers")], source.name


def test_budget_keywords_reach_images_and_frames(processor, fixtures_dir):
    image = str(fixtures_dir / "images" / "landscape_rocket_640x427.jpg")
    video = np.zeros((4, 160, 240, 3), np.uint8)
    out = processor(text="<|image|><|video|>", images=image, videos=video, max_soft_tokens=140, num_frames=2)
    assert out["pixel_values"].shape[1] == 140 and out["pixel_values_videos"].shape == (2, 140, 6912)
    assert (out["input_ids"] == processor.image_token_id).sum() == 126  # golden count for rocket at 140
    out = processor(text="<|image|>", images=image, images_kwargs={"max_soft_tokens": 560})
    assert (out["input_ids"] == processor.image_token_id).sum() == 532  # golden count for rocket at 560
    with pytest.raises(InputError, match="max_soft_tokens=300"):
        processor(text="<|image|>", images=image, max_soft_tokens=300)
    with pytest.raises(InputError, match="torch"):
        processor(text="hello", return_tensors="pt")
