"""Greedy generation against transformers' own `generate(do_sample=False)`, 40 tokens.

transformers' generate with its default dynamic cache prefills with the plain forward's masks
("hf-forward"); with a static cache it uses `create_masks_for_generate` ("gemma4", SPEC.md 3.6).
Our loop (chunked prefill through the prompt cache, then one token per step) must pick the same
tokens in both pairings, for text, image, audio and video prompts, past the sliding window of 8.
"""

import mlx.core as mx
import multimodal_inputs as mi
import numpy as np
import pytest
import reference
import torch
from transformers import GenerationConfig

from mlx_gemma4u.generation.api import stream_inputs
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.generation.prompt_cache import PromptCache
from mlx_gemma4u.weights.loading import load_model

STEPS = 40
PAIRS = {"hf-forward": "dynamic", "gemma4": "static"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = reference.build(reference.TEXT_CONFIGS["full"], seed=4)
    return model, reference.save(model, tmp_path_factory.mktemp("generation") / "saved")


@pytest.fixture(scope="module")
def prompts(golden_dir):
    text = {
        "input_ids": np.random.default_rng(2).integers(3, reference.V - 20, size=(1, 13)),
        "mm_token_type_ids": np.zeros((1, 13), np.int64),
        "attention_mask": None,
        "media": {},
    }
    return {"text": text, **{name: mi.build_case(golden_dir, name) for name in ("one_image", "audio", "video")}}


def transformers_tokens(model, case: dict, cache_implementation: str) -> list[int]:
    t = lambda a: torch.from_numpy(np.asarray(a))
    config = GenerationConfig(
        max_new_tokens=STEPS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        cache_implementation=None if cache_implementation == "dynamic" else "static",
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=t(case["input_ids"]),
            mm_token_type_ids=t(case["mm_token_type_ids"]),
            attention_mask=torch.ones(case["input_ids"].shape, dtype=torch.long),
            generation_config=config,
            **{k: t(v) for k, v in case["media"].items()},
        )
    return out[0, case["input_ids"].shape[1] :].tolist()


def our_tokens(model, case: dict) -> list[int]:
    inputs = {
        "input_ids": mx.array(case["input_ids"], dtype=mx.int32),
        "mm_token_type_ids": mx.array(case["mm_token_type_ids"]),
        **{k: mx.array(v) for k, v in case["media"].items()},
    }
    steps = stream_inputs(
        model, None, inputs, SamplingParams(max_tokens=STEPS), PromptCache(model), prefill_step_size=16
    )
    return [r.token for r in steps]


@pytest.mark.parametrize("semantics", list(PAIRS))
@pytest.mark.parametrize("name", ["text", "one_image", "audio", "video"])
def test_greedy_generation_equals_transformers_generate(name, semantics, checkpoint, prompts):
    torch_model, path = checkpoint
    case = prompts[name]
    expected = transformers_tokens(torch_model, case, PAIRS[semantics])
    assert len(expected) == STEPS
    assert our_tokens(load_model(path, vision_mask=semantics), case) == expected
