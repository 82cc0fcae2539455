"""Training data as mlx-lm writes it: OpenAI-form tool turns fold into Gemma 4's one model turn and
only the answer after the tool results is trained; an image budget sets the soft tokens per image."""

import copy
import json

import numpy as np
import pytest

from mlx_gemma4u.training.data import load_split

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
OPENAI_FORM = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {**CALL, "arguments": json.dumps(CALL["arguments"])}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"temp": 21})},
    {"role": "assistant", "content": "It is 21 degrees."},
]
TEMPLATE_FORM = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "It is 21 degrees.",
        "tool_calls": [{"function": CALL}],
        "tool_responses": [{"name": "get_weather", "response": {"temp": 21}}],
    },
]


@pytest.fixture(scope="module")
def gemma4(processor, fixtures_dir):
    """The processor with Google's Gemma 4 chat template (tools and tool turns)."""
    full = copy.copy(processor)
    full.chat_template = (fixtures_dir / "chat_template" / "gemma4.jinja").read_text()
    return full


def _examples(folder, processor, *records, **options):
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return load_split(folder, "train", processor, **options)


def test_openai_tool_turns_train_only_the_answer(gemma4, tmp_path):
    processor = gemma4
    openai, template = _examples(
        tmp_path, processor, {"messages": OPENAI_FORM, "tools": TOOLS}, {"messages": TEMPLATE_FORM, "tools": TOOLS}
    )
    assert np.array_equal(openai.input_ids, template.input_ids)  # the same model turn, however written
    assert openai.first_target == template.first_target
    text = processor.tokenizer.decode(openai.input_ids.tolist())
    assert "<|tool_call>call:get_weather" in text and "<|tool_response>response:get_weather" in text
    trained = processor.tokenizer.decode(openai.input_ids[openai.first_target :].tolist())
    assert trained.startswith("It is 21 degrees.") and "tool" not in trained


def test_a_tool_result_without_its_call_is_refused_with_its_line(gemma4, tmp_path):
    from mlx_gemma4u.errors import InputError

    orphan = {"messages": [OPENAI_FORM[0], OPENAI_FORM[2], OPENAI_FORM[3]], "tools": TOOLS}
    with pytest.raises(InputError, match=r"train.jsonl:1: Message 1 is a tool result that does not follow"):
        _examples(tmp_path, gemma4, orphan)


def test_the_image_budget_sets_the_soft_tokens_per_image(processor, fixtures_dir, tmp_path):
    (tmp_path / "photo.png").write_bytes((fixtures_dir / "images" / "gray_camera_512x512.png").read_bytes())
    line = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "photo.png"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A camera."},
        ]
    }
    soft = {
        budget: int(_examples(tmp_path, processor, line, image_budget=budget)[0].mm_token_type_ids.sum())
        for budget in (None, 70)
    }
    assert soft[70] <= 70 < soft[None] <= 280
