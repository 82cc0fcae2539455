"""`mlx-gemma4u serve` as its users meet it: the real server process on a free localhost port,
driven by the official openai and anthropic clients (the test extra), with concurrent clients, a
killed client and malformed requests. Traffic goes to 127.0.0.1 only; every loop is bounded."""

import base64
import io
import json
import os
import subprocess
import sys
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from serving import post, running

from mlx_gemma4u import generate, load, stream_generate
from mlx_gemma4u.generation.reply import Reply
from mlx_gemma4u.processing.text import load_tokenizer
from mlx_gemma4u.serve.media import MediaLimits, MediaReader
from mlx_gemma4u.serve.messages import openai_messages

openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
anthropic = pytest.importorskip("anthropic", reason="the anthropic client (test extra) is not installed")

KEY = "test-key"
FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"


@contextmanager
def _running(demo_home, log: Path, *flags: str):
    with running(demo_home, log, *flags) as (url, _):
        yield url


@pytest.fixture(scope="module")
def server(demo_home, tmp_path_factory):
    """The server on the demo checkpoint, with an API key, for the module; no request may have
    caused a traceback."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with _running(demo_home, log, "--api-key", KEY) as url:
        yield url
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def local(demo_home):
    """The same demo in this process, for what generate() says alone."""
    os.environ["MLX_GEMMA4U_HOME"] = str(demo_home)
    return load("demo")


def _openai(url: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _ask(url: str, content, max_tokens: int = 12, **kwargs):
    return _openai(url).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": content}], max_tokens=max_tokens, **kwargs
    )


def _health(url: str) -> bool:
    return urllib.request.urlopen(f"{url}/health", timeout=5).status == 200


def test_chat_completion_equals_generate(server, local):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    reply = _openai(server).chat.completions.create(model="demo", messages=messages, max_tokens=16)
    assert reply.choices[0].message.content == generate(*local, messages, max_tokens=16)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 16


def test_streaming_and_non_streaming_agree(server):
    whole = _ask(server, "Tell me a story.", max_tokens=20)
    chunks = list(_ask(server, "Tell me a story.", max_tokens=20, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: prefix reused


def _data_uri(path: Path, kind: str) -> str:
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def test_image_audio_and_video_inputs(server, local):
    text_only = _ask(server, "Describe it.", max_tokens=4).usage.prompt_tokens
    image = _ask(
        server,
        [
            {
                "type": "image_url",
                "image_url": {"url": _data_uri(FIXTURES / "images/tiny_coffee_40x27.png", "image/png")},
            },
            {"type": "text", "text": "Describe it."},
        ],
        max_tokens=4,
    )
    audio = {
        "type": "input_audio",
        "input_audio": {
            "data": base64.b64encode((FIXTURES / "audio/speech_16k_mono.wav").read_bytes()).decode(),
            "format": "wav",
        },
    }
    heard = _ask(server, [audio, {"type": "text", "text": "Describe it."}], max_tokens=4)
    video = {
        "type": "video_url",
        "video_url": {"url": _data_uri(FIXTURES / "video/pan_coffee_240x160_15fps_2s_vp9.webm", "video/webm")},
    }
    seen = _ask(server, [video, {"type": "text", "text": "Describe it."}], max_tokens=4)
    for reply in (image, heard, seen):  # the media's soft tokens are in the prompt
        assert reply.usage.prompt_tokens > text_only + 10 and reply.choices[0].message.content
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": str(FIXTURES / "images/tiny_coffee_40x27.png")},
                {"type": "text", "text": "Describe it."},
            ],
        }
    ]
    assert image.choices[0].message.content == generate(*local, messages, max_tokens=4)


def test_eight_concurrent_clients_each_get_what_they_get_alone(server):
    prompts = [f"Count to {n}, please." for n in range(8)]
    alone = [_ask(server, p).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _ask(server, p).choices[0].message.content, prompts))
    assert together == alone


KILLED_CLIENT = """
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key=sys.argv[2], max_retries=0)
for chunk in client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Go on forever."}],
                                            max_tokens=400, stream=True):
    print("chunk", flush=True)
"""


def test_a_killed_client_leaves_the_others_untouched(server):
    before = _ask(server, "Say something.").choices[0].message.content
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server, KEY], stdout=subprocess.PIPE)
    client.stdout.readline()  # it is streaming now
    client.kill()
    client.wait(timeout=30)
    assert _health(server)
    assert _ask(server, "Say something.").choices[0].message.content == before


def _post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    return post(url, path, body, headers, key=KEY)


def _malformed() -> list[tuple[str, bytes]]:
    """100 bad requests, each with what it gets wrong."""
    chat = lambda **body: json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **body})  # noqa: E731
    cases = [
        ("/v1/chat/completions", b"{not json"),
        ("/v1/chat/completions", b""),
        ("/v1/chat/completions", b"[]"),
        ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": []}).encode()),
        ("/v1/chat/completions", chat(n=2).encode()),
        ("/v1/chat/completions", chat(max_tokens=0).encode()),
        ("/v1/chat/completions", chat(temperature="hot").encode()),
        ("/v1/chat/completions", chat(top_p=3).encode()),
        ("/v1/chat/completions", chat(max_tokens=10**9).encode()),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "Hi"}]}).encode()),
        (
            "/v1/chat/completions",
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}],
                        }
                    ]
                }
            ).encode(),
        ),
        (
            "/v1/chat/completions",
            json.dumps(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}],
                        }
                    ]
                }
            ).encode(),
        ),
        (
            "/v1/chat/completions",
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}
                    ]
                }
            ).encode(),
        ),
        (
            "/v1/chat/completions",
            json.dumps({"messages": [{"role": "user", "content": [{"type": "hologram"}]}]}).encode(),
        ),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "tool", "content": "42"}]}).encode()),
        ("/v1/completions", json.dumps({"prompt": 5}).encode()),
        ("/v1/completions", b"{}"),
        ("/v1/messages", json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode()),
        (
            "/v1/messages",
            json.dumps(
                {
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}],
                }
            ).encode(),
        ),
    ]
    return [cases[i % len(cases)] for i in range(100)]


def test_malformed_requests_get_4xx_json_and_the_server_stays_up(server):
    for path, body in _malformed():
        status, payload = _post(server, path, body)
        assert 400 <= status < 500, (path, body[:80], status, payload)
        error = payload["error"]
        assert error["message"] and "Traceback" not in error["message"], (path, body[:80])
        assert path != "/v1/messages" or payload["type"] == "error"
    assert _health(server)
    assert _ask(server, "Still there?", max_tokens=2).choices[0].message.content is not None


POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "label": {"enum": ["a", "b"]}},
    "required": ["x", "label"],
    "additionalProperties": False,
}


def test_response_format_holds_the_reply_to_its_schema(server, local):
    """OpenAI's json_schema response format, streaming or not: the reply parses and validates, and
    equals generate() with the same schema; json_object starts a JSON object."""
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT, "strict": True}}
    whole = _ask(server, "A point?", max_tokens=40, response_format=fmt)
    chunks = list(_ask(server, "A point?", max_tokens=40, response_format=fmt, stream=True))
    text = whole.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), POINT)
    messages = [{"role": "user", "content": "A point?"}]
    assert text == generate(*local, messages, max_tokens=40, response_format=POINT)
    json_object = {"type": "json_object"}
    free = _ask(server, "Any JSON?", max_tokens=8, response_format=json_object).choices[0]
    local_reply = generate(
        *local, [{"role": "user", "content": "Any JSON?"}], max_tokens=8, response_format=json_object
    )
    # an object's strings are unbounded: random weights rarely close one within 8 tokens
    assert free.message.content == local_reply and local_reply.startswith("{")
    assert free.finish_reason == "length" or isinstance(json.loads(local_reply), dict)


def test_a_bad_response_format_is_a_400_with_the_reason(server):
    bad = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "required": 3}}}
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(server, "Hi", response_format=bad)
    assert "JSON schema" in refused.value.message and "required" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(server, "Hi", response_format={"type": "xml"})
    assert "'xml' is not one of text, json_object" in refused.value.message
    assert _health(server)


WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 0}},
    "required": ["city", "days"],
}
NOTE = {"type": "object", "properties": {"pinned": {"type": "boolean"}}, "required": ["pinned"]}
OPENAI_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "note", "parameters": NOTE}},
]
SCHEMA_OF = {"get_weather": WEATHER, "note": NOTE}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "note"}}])
def test_forced_tool_calls_come_back_as_tool_calls_through_openai(server, choice):
    """The openai client, streaming and not: the reply is tool calls whose arguments validate
    against their function's parameters (the named one's, when named), finish_reason tool_calls."""
    import jsonschema

    kwargs = dict(max_tokens=120, tools=OPENAI_TOOLS, tool_choice=choice, temperature=1.0, seed=4)
    whole = _ask(server, "Help me.", **kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls and not whole.message.content
    streamed: dict[int, dict] = {}
    for chunk in _ask(server, "Help me.", stream=True, **kwargs):
        for part in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = streamed.setdefault(part.index, {"name": "", "arguments": ""})
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())] == calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMA_OF[name])
    assert choice == "required" or {name for name, _ in calls} == {"note"}


def test_forced_tool_use_comes_back_as_tool_use_through_anthropic(server):
    """Anthropic's tool_choice any and a named tool, streaming and not: tool_use blocks whose input
    validates against the tool's input_schema, stop_reason tool_use."""
    import jsonschema

    client = anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0, timeout=120)
    tools = [{"name": "get_weather", "input_schema": WEATHER}, {"name": "note", "input_schema": NOTE}]
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        kwargs = dict(
            model="demo",
            max_tokens=120,
            messages=[{"role": "user", "content": "Help me."}],
            tools=tools,
            tool_choice=choice,
        )
        whole = client.messages.create(**kwargs)
        with client.messages.stream(**kwargs) as stream:
            streamed = stream.get_final_message()
        for message in (whole, streamed):
            uses = [b for b in message.content if b.type == "tool_use"]
            assert message.stop_reason == "tool_use" and uses, message
            for use in uses:
                jsonschema.validate(use.input, SCHEMA_OF[use.name])
            assert choice["type"] == "any" or {u.name for u in uses} == {"get_weather"}


def test_count_tokens_equals_the_usage_of_the_same_request(server, fixtures_dir):
    """Anthropic's messages.count_tokens: the input tokens the same request's usage reports, with a
    system prompt, tools and an image; a bad body is a 400 in Anthropic's shape."""
    client = anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0, timeout=120)
    image = base64.b64encode((fixtures_dir / "images/tiny_coffee_40x27.png").read_bytes()).decode()
    content = [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
        {"type": "text", "text": "What is this?"},
    ]
    prompt = dict(
        model="demo",
        system="Be brief.",
        messages=[{"role": "user", "content": content}],
        tools=[{"name": "note", "input_schema": NOTE}],
    )
    counted = client.messages.count_tokens(**prompt).input_tokens
    reply = client.messages.create(max_tokens=2, **prompt)
    assert counted == reply.usage.input_tokens > 60  # the image's soft tokens are counted
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model="demo", messages=[])


def test_a_request_without_sampling_settings_follows_the_checkpoint_then_the_flags(demo_home, local, tmp_path):
    """A demo copy whose generation_config.json says Google's sampling (temperature 1.0, top-p 0.95,
    top-k 64): a seeded request that sets none of them equals generate() with them; serve --temp 0
    overrides the checkpoint (greedy), and a request's own temperature overrides both."""
    import shutil

    folder = tmp_path / "sampled"
    shutil.copytree(demo_home / "demo-v1", folder)
    config = json.loads((folder / "generation_config.json").read_text())
    google = {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 64}
    (folder / "generation_config.json").write_text(json.dumps({**config, **google}))
    messages = [{"role": "user", "content": "Hi"}]
    sampled = generate(*local, messages, max_tokens=12, seed=3, temperature=1.0, top_p=0.95, top_k=64)
    greedy = generate(*local, messages, max_tokens=12)
    with running(demo_home, tmp_path / "a.log", "--api-key", KEY, model=folder) as (url, _):
        assert _ask(url, "Hi", seed=3).choices[0].message.content == sampled != greedy
        assert _ask(url, "Hi", seed=3, temperature=0).choices[0].message.content == greedy
    with running(demo_home, tmp_path / "b.log", "--api-key", KEY, "--temp", "0", model=folder) as (url, _):
        assert _ask(url, "Hi", seed=3).choices[0].message.content == greedy
        assert _ask(url, "Hi", seed=3, temperature=1.0).choices[0].message.content == sampled


def test_a_tool_choice_that_cannot_be_held_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(server, "Hi", tools=OPENAI_TOOLS, tool_choice={"type": "function", "function": {"name": "gone"}})
    assert "'gone', which is not among the request's tools" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        _ask(server, "Hi", tools=OPENAI_TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert "either response_format or a tool_choice" in refused.value.message
    assert _health(server)


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    """GET /metrics, parsed by prometheus-client's own parser -> {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"{url}/metrics", headers={"authorization": f"Bearer {KEY}"})
    text = urllib.request.urlopen(request, timeout=30).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_parse_and_move_with_requests(server):
    """/metrics parses with prometheus-client's parser; a chat request moves the request counter
    of its endpoint and status, the token counters by the reply's usage, and the latency
    histograms by one reply; a refused request counts under its 4xx status."""
    before = _metrics(server)
    reply = _ask(server, "Count the metrics.", max_tokens=6)
    with pytest.raises(openai.BadRequestError):
        _ask(server, "Hi", temperature=-1)
    after = _metrics(server)

    def moved(name: str, **labels) -> float:
        key = (f"mlx_gemma4u_{name}", tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert moved("requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert moved("generation_tokens_total") == reply.usage.completion_tokens
    assert moved("prompt_tokens_total") == reply.usage.prompt_tokens
    assert moved("time_to_first_token_seconds_count") == 1 and moved("time_per_output_token_seconds_count") == 1
    assert after[("mlx_gemma4u_queue_depth", ())] == 0 and after[("mlx_gemma4u_kv_cache_bytes", ())] > 0


def test_the_log_has_a_start_up_line_and_a_line_per_request(demo_home, tmp_path):
    """The start-up line names the address and the model; each request's line has its method, path,
    status and, for a reply, its tokens in and out; --log-level warning keeps only warnings."""
    import re

    log = tmp_path / "info.log"
    with _running(demo_home, log, "--api-key", KEY) as url:
        reply = _ask(url, "Log this.", max_tokens=5)
    text = log.read_text()
    assert re.search(rf"Serving demo on {re.escape(url)}", text), text
    line = f"POST /v1/chat/completions 200 {reply.usage.prompt_tokens} tokens in, {reply.usage.completion_tokens} out"
    assert line in text, text
    quiet = tmp_path / "warning.log"
    with _running(demo_home, quiet, "--api-key", KEY, "--log-level", "warning") as url:
        _ask(url, "Log this.", max_tokens=5)
    assert "POST /v1/chat/completions" not in quiet.read_text()


def test_an_idle_server_frees_the_weights_and_loads_them_again(demo_home, tmp_path):
    """--idle-unload: after the idle time /health and /v1/models say the weights are not loaded and
    the process's resident memory has dropped; the next request loads them again and gets the same
    greedy reply as before, and the log says so."""
    import time

    def resident_mb(pid: int) -> float:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024

    log = tmp_path / "idle.log"
    with running(demo_home, log, "--api-key", KEY, "--idle-unload", "2") as (url, process):
        before = _ask(url, "Remember me.", max_tokens=8).choices[0].message.content
        loaded_mb = resident_mb(process.pid)
        for _ in range(60):  # at most 30 s
            if not json.loads(urllib.request.urlopen(f"{url}/health", timeout=5).read())["loaded"]:
                break
            time.sleep(0.5)
        unloaded_mb = resident_mb(process.pid)
        models = _openai(url).models.list().data[0]
        after = _ask(url, "Remember me.", max_tokens=8).choices[0].message.content
        reloaded = json.loads(urllib.request.urlopen(f"{url}/health", timeout=5).read())["loaded"]
    assert models.loaded is False and reloaded is True
    assert after == before
    # the demo's weights are 48 MB on disk; measured: 417 MB resident loaded, 384 MB unloaded
    assert loaded_mb - unloaded_mb > 20, (loaded_mb, unloaded_mb)
    text = log.read_text()
    assert "unloaded the weights after 2 s" in text and "loading the weights again" in text


def test_audio_transcriptions_and_translations_through_openai(server, local, fixtures_dir, tmp_path):
    """audio.transcriptions.create on a fixture WAV and on an MP3 of it: the text generate() gives
    for the same audio and instruction; streamed deltas add up to it; text and verbose_json
    formats; translations use their own instruction; a file that is not audio is a 400."""
    import soundfile

    wav = fixtures_dir / "audio/speech_16k_mono.wav"
    samples, rate = soundfile.read(wav, dtype="float32")
    mp3 = tmp_path / "speech.mp3"
    soundfile.write(mp3, samples, rate, format="MP3")
    client = _openai(server)

    def alone(path: Path, instruction: str) -> str:
        """generate() on the samples the server decodes (soundfile reads the upload's bytes)."""
        audio = {"type": "audio", "audio": soundfile.read(path, dtype="float32")}
        return generate(
            *local, [{"role": "user", "content": [audio, {"type": "text", "text": instruction}]}], max_tokens=32
        )

    for path in (wav, mp3):
        with open(path, "rb") as f:
            text = client.audio.transcriptions.create(model="demo", file=f).text
        assert text == alone(path, "Transcribe this audio."), path
    with open(wav, "rb") as f:
        events = list(client.audio.transcriptions.create(model="demo", file=f, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert deltas == events[-1].text == alone(wav, "Transcribe this audio.")
    with open(wav, "rb") as f:
        plain = client.audio.transcriptions.create(model="demo", file=f, response_format="text")
    with open(wav, "rb") as f:
        verbose = client.audio.transcriptions.create(
            model="demo", file=f, response_format="verbose_json", language="en"
        )
    assert plain == alone(wav, "Transcribe this audio.")
    assert verbose.text == alone(wav, "Transcribe this audio. The speech is in en.")
    assert abs(verbose.duration - len(samples) / rate) < 1e-6 and verbose.language == "en"
    with open(wav, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the client marks translations deprecated
        translated = client.audio.translations.create(model="demo", file=f).text
    assert translated == alone(wav, "Translate this audio into English.")
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(model="demo", file=("notes.wav", b"not audio at all"))
    assert "holds no readable" in refused.value.message
    status, payload = _post(
        server, "/v1/audio/transcriptions", b"", {"content-type": "multipart/form-data; boundary=x"}
    )
    assert status == 400 and "file" in payload["error"]["message"]
    with open(wav, "rb") as f, pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(model="demo", file=f, response_format="srt")
    assert "response_format" in refused.value.message


def test_weights_that_cannot_be_loaded_again_fail_that_request_alone(demo_home, tmp_path):
    """An unloaded server whose checkpoint went missing answers the next request with a 500 in
    OpenAI's shape and stays up; once the files are back, the next request loads them and gets the
    reply it got before."""
    import shutil
    import time

    folder = tmp_path / "model"
    shutil.copytree(demo_home / "demo-v1", folder)
    with running(demo_home, tmp_path / "s.log", "--api-key", KEY, "--idle-unload", "1", model=folder) as (url, _):
        before = _ask(url, "Again?", max_tokens=6).choices[0].message.content
        for _ in range(60):  # at most 30 s
            if not json.loads(urllib.request.urlopen(f"{url}/health", timeout=5).read())["loaded"]:
                break
            time.sleep(0.5)
        (folder / "model.safetensors").rename(tmp_path / "away.safetensors")
        with pytest.raises(openai.InternalServerError) as failed:
            _ask(url, "Again?", max_tokens=6)
        assert "could not load the model's weights again" in failed.value.message
        assert _health(url)
        (tmp_path / "away.safetensors").rename(folder / "model.safetensors")
        assert _ask(url, "Again?", max_tokens=6).choices[0].message.content == before


def test_the_api_key_is_enforced(server):
    with pytest.raises(openai.AuthenticationError):
        _openai(server, "wrong").chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
        )
    status, payload = _post(
        server,
        "/v1/messages",
        json.dumps({"max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}).encode(),
        {"authorization": ""},
    )
    assert status == 401 and payload["error"]["type"] == "authentication_error"
    assert _health(server)  # /health needs no key


def test_anthropic_messages_equal_generate_streaming_or_not(server, local):
    client = anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Name a fruit."}]
    reply = client.messages.create(model="demo", max_tokens=12, system="Be brief.", messages=messages)
    expected = generate(*local, [{"role": "system", "content": "Be brief."}, *messages], max_tokens=12)
    assert reply.content[0].text == expected and reply.stop_reason in ("end_turn", "max_tokens")
    with client.messages.stream(model="demo", max_tokens=12, system="Be brief.", messages=messages) as stream:
        assert "".join(stream.text_stream) == expected
        assert stream.get_final_message().usage.output_tokens == reply.usage.output_tokens


def test_a_full_queue_answers_429_and_the_rest_are_served(demo_home, tmp_path):
    with _running(demo_home, tmp_path / "log", "--max-concurrency", "1", "--max-queue", "1") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(i: int):
            try:
                return client.chat.completions.create(
                    model="demo", max_tokens=48, messages=[{"role": "user", "content": f"Story {i}"}]
                )
            except openai.RateLimitError:
                return "429"

        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(ask, range(6)))
    assert "429" in outcomes  # one decoding, one waiting: the others were turned away
    assert any(o != "429" and o.choices[0].message.content for o in outcomes)


def test_a_drafting_server_answers_what_plain_generation_does(demo_home, local, tmp_path):
    """--draft-model demo: the built-in random assistant; greedy replies and their log-probabilities
    equal plain generation's (drafted tokens report the target's own log-probabilities)."""
    messages = [{"role": "user", "content": "Name a planet."}]
    with _running(demo_home, tmp_path / "log", "--draft-model", "demo") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="demo", messages=messages, max_tokens=12, logprobs=True, top_logprobs=2
        )
    expected = list(stream_generate(*local, messages, max_tokens=12))
    assert reply.choices[0].message.content == "".join(r.text for r in expected)
    served = [entry.logprob for entry in reply.choices[0].logprobs.content]
    diff = np.abs(np.array(served) - [float(r.logprobs[r.token]) for r in expected]).max()
    assert diff < 1e-5  # measured: 0.0, the drafted rows are bit-identical to plain decoding
    assert "Traceback" not in (tmp_path / "log").read_text()


def test_cors_origins_and_the_request_timeout(demo_home, tmp_path):
    with _running(demo_home, tmp_path / "log", "--allowed-origins", "http://app.localhost", "--timeout", "1") as url:
        preflight = urllib.request.Request(
            f"{url}/v1/chat/completions",
            method="OPTIONS",
            headers={"Origin": "http://app.localhost", "Access-Control-Request-Method": "POST"},
        )
        with urllib.request.urlopen(preflight, timeout=30) as response:
            assert response.headers["access-control-allow-origin"] == "http://app.localhost"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="demo", max_tokens=4000, messages=[{"role": "user", "content": "Go on and on."}]
        )
    assert reply.choices[0].finish_reason == "timeout" and reply.usage.completion_tokens < 4000  # not a length stop


def test_models_lists_the_checkpoint(server):
    assert [m.id for m in _openai(server).models.list()] == ["demo"]


@pytest.fixture(scope="module")
def tokenizer(hf_tokenizer_dir):
    return load_tokenizer(hf_tokenizer_dir)


def _scripted(tokenizer, text: str) -> Reply:
    """Feed `text`'s tokens through a Reply the way stream_generate hands them out."""
    reply = Reply(tokenizer)
    detokenizer = tokenizer.detokenizer
    hidden = set(tokenizer.all_special_ids)
    for token in tokenizer.encode(text, add_special_tokens=False):
        if token not in hidden:
            detokenizer.add_token(token)
        reply.add(token, detokenizer.last_segment)
    return reply


def test_tool_turns_round_trip_through_the_template(tokenizer, hf_tokenizer_dir, tmp_path):
    from mlx_gemma4u.processing import Gemma4UProcessor

    folder = tmp_path / "tools"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((hf_tokenizer_dir / name).read_bytes())
    (folder / "chat_template.jinja").write_text((FIXTURES / "chat_template/gemma4.jinja").read_text())
    processor = Gemma4UProcessor.from_pretrained(folder)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    conversation = openai_messages(
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21})},
        ],
        MediaReader(MediaLimits()),
    )
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tools=tools)
    assert "<|tool>declaration:get_weather" in text
    call = text[text.index("<|tool_call>") : text.index("<tool_call|>") + len("<tool_call|>")]
    assert "response:get_weather{temperature:21}" in text
    parsed = _scripted(tokenizer, call).tool_calls  # what the model wrote parses back to the same call
    assert [(c.name, c.arguments) for c in parsed] == [("get_weather", {"city": "Paris"})]


def test_audio_data_is_decoded_to_samples():
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    item = MediaReader(MediaLimits()).audio(base64.b64encode(buffer.getvalue()).decode(), "wav")
    samples, rate = item["audio"]
    assert rate == 16000 and samples.shape == (1600,)
