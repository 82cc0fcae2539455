"""OpenAI's Responses API as Codex-style clients meet it: the real `mlx-gemma4u serve --demo` process
on a free 127.0.0.1 port, driven by the official openai client; and the reply's item and event
shapes on a scripted thought-and-answer reply. Every loop here is bounded."""

import asyncio
import base64
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from serving import post, running

from mlx_gemma4u import generate, load
from mlx_gemma4u.generation.inputs import prepare_arrays
from mlx_gemma4u.processing.text import load_tokenizer
from mlx_gemma4u.serve import schemas
from mlx_gemma4u.serve.errors import NotFound
from mlx_gemma4u.serve.media import MediaLimits, MediaReader
from mlx_gemma4u.serve.messages import responses_messages
from mlx_gemma4u.serve.responses_api import ResponseReply, ResponseStore, function_tools
from mlx_gemma4u.serve.worker import Token

openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (test extra) is not installed")

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}


@pytest.fixture(scope="module")
def checkpoint(demo_home, fixtures_dir, tmp_path_factory) -> Path:
    """The demo checkpoint with Gemma 4's own chat template: tools declared, tool turns, thoughts."""
    folder = tmp_path_factory.mktemp("responses") / "demo"
    shutil.copytree(demo_home / "demo-v1", folder)
    shutil.copy(fixtures_dir / "chat_template/gemma4.jinja", folder / "chat_template.jinja")
    return folder


@pytest.fixture(scope="module")
def server(demo_home, checkpoint):
    """The server for the module; no request may have caused a traceback."""
    log = checkpoint.parent / "server.log"
    with running(demo_home, log, "--max-tokens", "2000", model=checkpoint) as (url, _):
        yield url
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def local(checkpoint):
    return load(str(checkpoint))


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def test_a_response_equals_generate_and_its_stream_comes_in_openais_order(server, local):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    client = _client(server)
    whole = client.responses.create(
        model="demo", instructions="Be brief.", input="Name a color.", max_output_tokens=16, temperature=0
    )
    assert whole.output_text == generate(*local, messages, max_tokens=16)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage.output_tokens == 16 and whole.usage.input_tokens > 5

    events = list(
        client.responses.create(
            model="demo", instructions="Be brief.", input="Name a color.", max_output_tokens=16, stream=True
        )
    )
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 16
    assert client.responses.retrieve(events[-1].response.id).output_text == text


def test_image_and_audio_parts_count_as_in_chat(server, fixtures_dir):
    """input_image and input_audio parts reach the prompt as chat's image_url and input_audio do."""
    image = base64.b64encode((fixtures_dir / "images/tiny_coffee_40x27.png").read_bytes()).decode()
    audio = base64.b64encode((fixtures_dir / "audio/speech_16k_mono.wav").read_bytes()).decode()
    parts = [
        (
            {"type": "input_image", "image_url": f"data:image/png;base64,{image}"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        ),
        ({"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},) * 2,
    ]
    client = _client(server)
    text_only = client.responses.create(model="demo", input="Describe it.", max_output_tokens=1).usage.input_tokens
    for ours, chats in parts:
        content = [ours, {"type": "input_text", "text": "Describe it."}]
        reply = client.responses.create(model="demo", input=[{"role": "user", "content": content}], max_output_tokens=1)
        chat = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": [chats, {"type": "text", "text": "Describe it."}]}],
            max_tokens=1,
        )
        assert reply.usage.input_tokens == chat.usage.prompt_tokens > text_only + 10


def test_a_function_call_round_trip_and_previous_response_id(server, local):
    """A forced call comes back as a function_call item whose arguments hold to its schema; its
    output sent with previous_response_id gets the reply that sending the whole conversation gets,
    with the shared history read from the prefix cache (cached_tokens)."""
    client = _client(server)
    first = client.responses.create(
        model="demo",
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=120,
        temperature=1.0,
        extra_body={"seed": 4},
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert first.status == "completed" and calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])

    result = [{"type": "function_call_output", "call_id": c.call_id, "output": '{"temp": 21}'} for c in calls]
    follow = client.responses.create(
        model="demo", previous_response_id=first.id, input=result, tools=[WEATHER], max_output_tokens=12
    )
    history = [{"role": "user", "content": "Weather in Paris?"}] + [
        {"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls
    ]
    stateless = client.responses.create(model="demo", input=history + result, tools=[WEATHER], max_output_tokens=12)
    assert follow.output_text == stateless.output_text
    assert follow.usage.input_tokens == stateless.usage.input_tokens > first.usage.input_tokens

    # the prefix cache held the first turn: all that the two prompts share is read from it (all but
    # the empty thought channel that ends a generation prompt and that the history leaves out:
    # measured 70 of the first prompt's 74 tokens, of the follow-up's 159)
    tools = function_tools([WEATHER])
    first_ids = prepare_arrays(local[1], [history[0]], tools=tools)["input_ids"][0].tolist()
    follow_messages = responses_messages(None, history + result, MediaReader(MediaLimits()))
    follow_ids = prepare_arrays(local[1], follow_messages, tools=tools)["input_ids"][0].tolist()
    assert len(follow_ids) == follow.usage.input_tokens
    shared = len(os.path.commonprefix([first_ids, follow_ids]))
    assert shared >= len(first_ids) - 4 and follow.usage.input_tokens_details.cached_tokens >= shared


def test_a_streamed_function_call_has_its_argument_events(server):
    events = list(
        _client(server).responses.create(
            model="demo",
            input="Weather?",
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=60,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    at = kinds.index("response.function_call_arguments.delta")
    assert kinds[at - 1 : at + 3] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    done = events[at + 1]
    assert done.name == "get_weather" and json.loads(done.arguments)["city"]
    final = events[-1].response
    assert events[-1].type == "response.completed"
    assert [item.arguments for item in final.output if item.type == "function_call"][0] == done.arguments


def test_text_format_holds_the_output_to_its_schema(server):
    schema = {
        "type": "object",
        "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}, "shade": {"type": "integer"}},
        "required": ["color", "shade"],
        "additionalProperties": False,
    }
    reply = _client(server).responses.create(
        model="demo",
        input="A color as JSON.",
        text={"format": {"type": "json_schema", "name": "color", "schema": schema, "strict": True}},
        max_output_tokens=60,
        temperature=1.0,
        extra_body={"seed": 3},
    )
    assert reply.status == "completed"
    jsonschema.validate(json.loads(reply.output_text), schema)


def test_retrieve_delete_and_cancel(server):
    client = _client(server)
    done = client.responses.create(model="demo", input="Hi", max_output_tokens=4)
    assert client.responses.retrieve(done.id).output_text == done.output_text
    with pytest.raises(openai.BadRequestError, match="only one in progress"):
        client.responses.cancel(done.id)
    client.responses.delete(done.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(done.id)
    unstored = client.responses.create(model="demo", input="Hi", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)

    # a long streamed response, cancelled from another connection after some text
    events, started = [], threading.Event()

    def listen():
        for event in client.responses.create(model="demo", input="Go on.", max_output_tokens=2000, stream=True):
            events.append(event)
            if event.type == "response.output_text.delta" and len(events) > 8:
                started.set()

    listener = threading.Thread(target=listen)
    listener.start()
    assert started.wait(60)
    cancelled = _client(server).responses.cancel(events[0].response.id)
    listener.join(60)
    assert not listener.is_alive() and cancelled.status == "cancelled"
    last = events[-1].response
    assert last.status == "cancelled" and last.usage.output_tokens < 2000
    assert client.responses.retrieve(last.id).status == "cancelled"


@pytest.mark.parametrize(
    "body, says",
    [
        ({"input": []}, "input is empty"),
        ({"input": "Hi", "previous_response_id": "resp_nope"}, "names no stored response"),
        ({"input": "Hi", "tools": [{"type": "web_search"}]}, "only named functions"),
        ({"input": [{"type": "file_search_call"}]}, "use message, function_call"),
        ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, "use input_text"),
        ({"input": "Hi", "text": {"format": {"type": "xml"}}}, "not one of"),
        ({"input": "Hi", "background": True}, "not supported"),
        ({"input": "Hi", "temperature": -1}, "temperature"),
        ({"input": "Hi", "tool_choice": "required"}, "needs tools"),
        ({"input": 5}, "input"),
    ],
)
def test_bad_requests_are_400s_in_openais_shape(server, body, says):
    status, reply = post(server, "/v1/responses", json.dumps({"model": "demo", **body}).encode())
    assert status == 400 and says in reply["error"]["message"], reply


def _token(text: str, token: int, finish: str | None = None, n: int = 1) -> Token:
    return Token(text, token, finish, prompt_tokens=10, prefilled_tokens=4, generation_tokens=n)


@pytest.fixture(scope="module")
def tokenizer(hf_tokenizer_dir):
    return load_tokenizer(hf_tokenizer_dir)


async def _tokens(tokenizer, text: str):
    """`text`'s tokens, handed out as the worker does (special tokens' text hidden); the last says "stop"."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    hidden, detokenizer = set(tokenizer.all_special_ids), tokenizer.detokenizer
    detokenizer.reset()
    for n, token in enumerate(ids, 1):
        if token not in hidden:
            detokenizer.add_token(token)
        yield _token(detokenizer.last_segment, token, "stop" if n == len(ids) else None, n)


def test_a_thought_and_an_answer_become_a_reasoning_item_and_a_message(tokenizer):
    body = schemas.ResponseCreate(input="Hi", reasoning={"effort": "high"})
    reply = ResponseReply(tokenizer, "demo", body, [])
    text = "<|channel>thought\nThe user greets.<channel|>Hello there!"
    events = asyncio.run(_collect(reply.stream(_tokens(tokenizer, text))))
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "The user greets."}]
    assert final["output"][1]["content"][0]["text"] == "Hello there!"
    kinds = [e["type"] for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    reasoning = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert reasoning == "The user greets." and final["status"] == "completed"
    thought_ids = tokenizer.encode("<|channel>thought\nThe user greets.<channel|>", add_special_tokens=False)
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == len(thought_ids)
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 6
    # a follow-up starts from the input items and this output, ids left out
    history = reply.history()
    assert [item["type"] for item in history] == ["reasoning", "message"] and "id" not in history[1]


async def _collect(events) -> list[dict]:
    return [event async for event in events]


def test_the_store_keeps_the_newest_within_its_bounds(tokenizer):
    store = ResponseStore(max_responses=3, max_bytes=10_000)
    replies = []
    for i in range(5):
        body = schemas.ResponseCreate(input="x" * (4000 if i == 4 else 10))
        replies.append(ResponseReply(tokenizer, "demo", body, [{"role": "user", "content": body.input}]))
        store.add(replies[-1])
    for gone in replies[:2]:
        with pytest.raises(NotFound, match="No stored response"):
            store.get(gone.id)
    assert store.get(replies[4].id) is replies[4]
    store.add(ResponseReply(tokenizer, "demo", schemas.ResponseCreate(input="y" * 9000), [{"content": "y" * 9000}]))
    with pytest.raises(NotFound):  # over the bytes: the oldest went
        store.get(replies[2].id)
