"""Constrained decoding on the demo checkpoint: its random weights pick nothing in particular, so
the grammar does all the work of making a reply parse."""

import json

import jsonschema
import llguidance
import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import Gemma4UnifiedForConditionalGeneration

from mlx_gemma4u import load, stream_generate
from mlx_gemma4u.errors import InputError
from mlx_gemma4u.generation.api import batch_generate
from mlx_gemma4u.generation.constraints import JSON_OPTIONS, Constraint, GrammarMask
from mlx_gemma4u.generation.inputs import prepare_inputs
from mlx_gemma4u.generation.params import SamplingParams

END_OF_TURN = 106
SCHEMAS = {
    "nested objects": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer"}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "arrays of enums": {
        "type": "object",
        "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4}},
        "required": ["colors"],
        "additionalProperties": False,
    },
    "optional fields": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 1000},
            "note": {"type": "string", "maxLength": 8},
            "done": {"type": "boolean"},
        },
        "required": ["id"],
        "additionalProperties": False,
    },
    "$ref": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "string formats": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
            "host": {"type": "string", "format": "ipv4"},
        },
        "required": ["day", "id", "host"],
        "additionalProperties": False,
    },
    "numbers with bounds": {
        "type": "object",
        "properties": {
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "count": {"type": "integer", "minimum": -5, "maximum": 5},
        },
        "required": ["ratio", "count"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def demo(demo_home):
    return load(demo_home / "demo-v1")


@pytest.mark.parametrize("name", SCHEMAS)
def test_sampled_replies_parse_and_validate(demo, name):
    """50 sampled replies (temperature 1, seeds 0-49) per schema: every one ends on its own (not
    at max_tokens), parses as JSON and validates against the schema, its string formats checked."""
    model, processor = demo
    schema = SCHEMAS[name]
    prompts = [{"prompt": "Fill in the form.", "seed": seed} for seed in range(50)]
    replies = batch_generate(
        model, processor, prompts, max_batch=25, max_tokens=120, temperature=1.0, response_format=schema
    )
    texts = [r.text for r in replies]
    assert [r.finish_reason for r in replies] == ["stop"] * 50, texts
    for text in texts:
        jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())
    assert len(set(texts)) >= 5  # the samples differ: the grammar leaves the choices to the model


def test_greedy_constrained_equals_transformers_under_the_same_mask(demo, demo_home):
    """Greedy, constrained: ours equals a reference loop that takes transformers' float32 logits,
    applies llguidance's mask for the same grammar (its own matcher on tokenizer.json) and picks
    the argmax, token for token until the end of turn."""
    model, processor = demo
    schema = SCHEMAS["optional fields"]
    ids = prepare_inputs(processor, "Fill in the form.")["input_ids"][0].tolist()
    ours = [r.token for r in stream_generate(model, processor, ids, max_tokens=40, response_format=schema)]

    folder = demo_home / "demo-v1"
    theirs = Gemma4UnifiedForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    vocab = theirs.config.text_config.vocab_size
    tokenizer = llguidance.LLTokenizer((folder / "tokenizer.json").read_text(), n_vocab=vocab, eos_token=END_OF_TURN)
    matcher = llguidance.LLMatcher(
        tokenizer, llguidance.LLMatcher.grammar_from_json_schema({**schema, "x-guidance": JSON_OPTIONS})
    )
    reference, sequence = [], list(ids)
    while len(reference) < 40 and (not reference or reference[-1] != END_OF_TURN):
        with torch.no_grad():
            logits = theirs(input_ids=torch.tensor([sequence])).logits[0, -1]
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        logits[torch.from_numpy(bits[:vocab] == 0)] = -torch.inf
        token = int(logits.argmax())
        assert matcher.consume_token(token)
        reference.append(token)
        sequence.append(token)
    assert ours == reference and reference[-1] == END_OF_TURN
    jsonschema.validate(json.loads(processor.tokenizer.decode(ours[:-1])), schema)


def test_a_batch_mixing_constrained_and_free_rows_gives_each_row_its_reply_alone(demo):
    model, processor = demo
    rows = [
        {"prompt": "One.", "response_format": SCHEMAS["arrays of enums"]},
        {"prompt": "Two.", "temperature": 1.0, "seed": 3},
        {"prompt": "Three.", "response_format": {"type": "regex", "regex": "[a-z]{2,6}-[0-9]{3}"}},
        {"prompt": "Four.", "response_format": SCHEMAS["$ref"], "temperature": 1.0, "seed": 5},
        {"prompt": "Five."},
    ]
    together = batch_generate(model, processor, rows, max_tokens=40)
    for row, reply in zip(rows, together):
        settings = {k: v for k, v in row.items() if k != "prompt"}
        alone = [r.token for r in stream_generate(model, processor, row["prompt"], max_tokens=40, **settings)]
        assert reply.tokens == alone, row
    assert together[2].finish_reason == "stop"
    assert together[2].text[:2].isalpha() and together[2].text.split("-")[1].isdigit()


@pytest.mark.parametrize("k", [None, 3])
def test_drafted_and_undrafted_constrained_greedy_are_equal(demo_pair, k):
    """The verify pass scores masked logits: drafts the grammar refuses are rejected, and the
    reply is the undrafted one."""
    (model, processor), drafter = demo_pair
    settings = dict(max_tokens=60, response_format=SCHEMAS["nested objects"])
    plain = [r.token for r in stream_generate(model, processor, "Fill in the form.", **settings)]
    responses = list(
        stream_generate(model, processor, "Fill in the form.", draft_model=drafter, num_draft_tokens=k, **settings)
    )
    assert [r.token for r in responses] == plain
    assert plain[-1] == END_OF_TURN
    if k:
        assert responses[-1].draft.drafted > 0


def test_with_thinking_the_thought_channel_stays_free(demo):
    """A reply that opens the thought channel is unconstrained inside it; the grammar starts after
    `<channel|>`. Without thinking, the channel cannot be opened."""
    model, processor = demo
    tokenizer = processor.tokenizer
    start, end = tokenizer.convert_tokens_to_ids(["<|channel>", "<channel|>"])
    vocab = model.config.text.vocab_size
    prompt = mx.array([2, 105, 2364, 107])
    logits = mx.zeros((1, vocab))
    constraint = Constraint.regex("ab")

    def allowed(mask: GrammarMask, reply: list[int]) -> set[int]:
        out = mask(mx.concatenate([prompt, mx.array(reply, dtype=prompt.dtype)]), logits)
        return set(np.nonzero(np.array(out[0]) > -np.inf)[0].tolist())

    thinking = GrammarMask(constraint, tokenizer, vocab, 4, thinking=True)
    first = allowed(thinking, [])
    assert start in first and end not in first and 0 < len(first) < 10
    assert len(allowed(thinking, [start, 1000])) == vocab  # inside the channel: anything
    after = allowed(thinking, [start, 1000, 2000, end])
    assert after == first - {start}  # the answer starts as it would have without the channel
    plain = GrammarMask(constraint, tokenizer, vocab, 4, thinking=False)
    assert allowed(plain, []) == after
    text = tokenizer.decode(sorted(after))
    assert all(tokenizer.decode([t]) in ("a", "ab") for t in after), text


@pytest.mark.parametrize(
    "response_format, message",
    [
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "/$defs/missing"),
        ({"type": "strnig"}, "strnig"),
        ({"type": "string", "pattern": "(("}, "unclosed group"),
        ({"type": "regex", "regex": "[a-"}, "regular expression"),
        ({"type": "lark", "grammar": "start: missing_rule"}, "missing_rule"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, '"schema"'),
        ("{}", "JSON schema or a pydantic model"),
    ],
)
def test_a_bad_response_format_is_refused_in_one_sentence(response_format, message):
    with pytest.raises(InputError) as refused:
        SamplingParams(response_format=response_format)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_response_format_forms(demo):
    """A pydantic model, OpenAI's wrappers and a Constraint all give the same grammar; "text" is none."""
    pydantic = pytest.importorskip("pydantic")

    class Point(pydantic.BaseModel):
        x: int
        y: int

    schema = Point.model_json_schema()
    wrapped = {"type": "json_schema", "json_schema": {"name": "point", "schema": schema, "strict": True}}
    grammars = {SamplingParams(response_format=f).response_format.grammar for f in (Point, schema, wrapped)}
    assert len(grammars) == 1
    assert SamplingParams(response_format={"type": "text"}).response_format is None
    assert SamplingParams(response_format={"type": "json_object"}).response_format.kind == "json_object"
    model, processor = demo
    reply = batch_generate(model, processor, ["Hi"], max_tokens=60, response_format=Point)[0]
    assert reply.finish_reason == "stop" and Point.model_validate_json(reply.text)


def test_a_reply_cut_inside_its_grammar_says_length(demo):
    model, processor = demo
    reply = batch_generate(model, processor, ["Hi"], max_tokens=3, response_format=SCHEMAS["nested objects"])[0]
    assert reply.finish_reason == "length" and reply.text.startswith('{"name":')
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.text)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Rome", "Oslo"]},
                    "unit": {"enum": ["c", "f"]},
                    "days": {"type": "integer", "minimum": 0},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "note",
            "parameters": {
                "type": "object",
                "properties": {
                    "text": {"type": "string", "maxLength": 12},
                    "tags": {"type": "array", "items": {"enum": ["home", "work"]}},
                    "pinned": {"type": "boolean"},
                    "score": {"type": "number"},
                },
                "required": ["text", "score"],
            },
        },
    },
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def calls_of(processor, tokens: list[int]):
    """The tool calls the chat and the server read from these tokens (generation/reply.py)."""
    from mlx_gemma4u.generation.reply import Reply

    reply = Reply(processor.tokenizer)
    for token in tokens:
        reply.add(token, "")
    return reply


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "note"}}])
def test_forced_tool_calls_parse_and_match_their_functions(demo, choice):
    """tool_choice required / a named function: 20 sampled replies each are one or more calls in
    Gemma 4's syntax, which the tool parser reads, to the functions asked for, with arguments that
    validate against the function's parameters; nothing else is written."""
    model, processor = demo
    constraint = Constraint.tool_choice(TOOLS, choice)
    messages = [{"role": "user", "content": "Help me."}]
    prompts = [{"prompt": messages, "seed": seed} for seed in range(20)]
    replies = batch_generate(
        model, processor, prompts, max_tokens=150, temperature=1.0, response_format=constraint, tools=TOOLS
    )
    names = set()
    for reply in replies:
        assert reply.finish_reason == "stop", processor.tokenizer.decode(reply.tokens)
        parsed = calls_of(processor, reply.tokens)
        assert parsed.tool_calls and parsed.content == "", processor.tokenizer.decode(reply.tokens)
        for call in parsed.tool_calls:
            jsonschema.validate(call.arguments, PARAMETERS[call.name])
            names.add(call.name)
    assert names == ({"get_weather", "note"} if choice == "required" else {"note"})


def test_auto_holds_a_started_call_and_none_forbids_one(demo):
    """tool_choice auto: the reply is free until `<|tool_call>`, then held to a call of one of the
    functions until `<tool_call|>`, then free again; none: `<|tool_call>` is never allowed."""
    model, processor = demo
    tokenizer = processor.tokenizer
    vocab, prompt = model.config.text.vocab_size, mx.array([2, 105, 2364, 107])
    logits = mx.zeros((1, vocab))
    start, end = tokenizer.convert_tokens_to_ids(["<|tool_call>", "<tool_call|>"])

    def allowed(mask: GrammarMask, reply: list[int]) -> np.ndarray:
        out = mask(mx.concatenate([prompt, mx.array(reply, dtype=prompt.dtype)]), logits)
        return np.nonzero(np.array(out[0]) > -np.inf)[0]

    auto = GrammarMask(Constraint.tool_choice(TOOLS, "auto"), tokenizer, vocab, 4, thinking=False)
    assert len(allowed(auto, [])) == vocab
    words = tokenizer.encode("Sure.", add_special_tokens=False)
    assert len(allowed(auto, words)) == vocab
    inside = allowed(auto, [*words, start])
    assert 0 < len(inside) < 10 and all("call:".startswith(tokenizer.decode([t])) for t in inside)
    call = tokenizer.encode("call:get_weather{city:", add_special_tokens=False)
    quote = tokenizer.convert_tokens_to_ids('<|"|>')
    rome = [*call, quote, *tokenizer.encode("Rome", add_special_tokens=False), quote]
    held = set(allowed(auto, [*words, start, *rome]).tolist())  # after city: another property or the end
    assert set(tokenizer.convert_tokens_to_ids([",", "}"])) <= held and len(held) < 10
    after = [*words, start, *rome, *tokenizer.encode("}", add_special_tokens=False), end]
    assert len(allowed(auto, after)) == vocab

    none = GrammarMask(Constraint.tool_choice(TOOLS, "none"), tokenizer, vocab, 4, thinking=False)
    first = allowed(none, [])
    assert start not in first and len(first) > vocab // 2


@pytest.mark.parametrize(
    "tools, choice, message",
    [
        (TOOLS, {"type": "tool", "name": "missing"}, "'missing', which is not among the request's tools"),
        (
            [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "properties": {"a-b": {}}}},
                }
            ],
            "required",
            "'a-b'",
        ),
        ([{"type": "function", "function": {"name": "bad name"}}], "auto", "'bad name'"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/$defs/gone"}}}],
            "required",
            "#/$defs/gone",
        ),
        ([], "required", "needs tools"),
        (TOOLS, "sometimes", "auto, none, required or a function"),
        (TOOLS, {"type": "function", "function": {}}, "names no function"),
    ],
)
def test_tool_choices_that_cannot_be_held_are_refused_in_one_sentence(tools, choice, message):
    with pytest.raises(InputError) as refused:
        Constraint.tool_choice(tools, choice)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_no_tools_no_constraint():
    assert Constraint.tool_choice(None, None) is None and Constraint.tool_choice([], "auto") is None
    assert Constraint.tool_choice(TOOLS, None).opens == "<|tool_call>"  # tools without a choice: auto


def test_each_function_reads_its_own_defs_and_a_schema_may_refer_to_itself(demo):
    """Two functions with a "$defs/item" of their own, one of them recursive: the grammar takes
    each function's calls as its own schema has them and refuses the other's."""
    model, processor = demo
    tokenizer = processor.tokenizer
    tree = {
        "$defs": {
            "item": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/item"}}}}
        },
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/item"}},
        "required": ["root"],
    }
    flag = {"$defs": {"item": {"type": "boolean"}}, "type": "object", "properties": {"on": {"$ref": "#/$defs/item"}}}
    tools = [
        {"type": "function", "function": {"name": "tree", "parameters": tree}},
        {"type": "function", "function": {"name": "flag", "parameters": flag}},
    ]
    constraint = Constraint.tool_choice(tools, "required")
    vocab = model.config.text.vocab_size
    matcher = llguidance.LLMatcher(
        llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab, eos_token=END_OF_TURN), constraint.grammar
    )

    def takes(text: str) -> bool:
        matcher.reset()
        ids = [48, *tokenizer.encode(text, add_special_tokens=False), 49]
        return matcher.try_consume_tokens(ids) == len(ids)

    assert takes("call:tree{root:{kids:[{kids:[]},{}]}}") and takes("call:flag{on:true}") and takes("call:flag{}")
    assert not takes("call:flag{on:{kids:[]}}") and not takes("call:tree{root:true}") and not takes("call:tree{}")
