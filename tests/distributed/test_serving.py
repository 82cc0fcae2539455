"""`mlx-gemma4u serve --pipeline | --tensor-parallel` under `mlx.launch -n 2 --backend ring`, as its
users meet it: the openai client with concurrent streams, a client that leaves mid-reply, a second
turn from the prefix cache, a seeded sampled reply, a reply held to JSON and an image. Rank 0 serves
HTTP; the other process steps the same engine (generation/lockstep.py).

- Pipeline: every reply is exactly what the same server answers as one process (the demo is
  bfloat16, and a pipeline adds nothing up in another order).
- Tensor parallel, with the demo drafter split alike: the all_sums add in another order, which in
  bfloat16 flips the random demo's near-ties within a few tokens; on the demo cast to float32 every
  reply is the one process's without a drafter.
- A rank killed mid-reply ends the open stream within a bound, the server stops, and no process
  is left.
"""

import base64
import os
import re
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from launching import left_running, rank_pid
from serving import running

openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")

IMAGE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "images" / "tiny_coffee_40x27.png"
QUESTIONS = ("Tell me about the sea.", "Why is the sky blue?")


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def _streamed(url: str, content, **settings) -> str:
    chunks = _client(url).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": content}], max_tokens=16, stream=True, **settings
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _leaving(url: str) -> None:
    """A client that reads two chunks of a long reply and goes away."""
    chunks = _client(url).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Count to fifty."}], max_tokens=200, stream=True
    )
    for i, _ in enumerate(chunks):
        if i == 2:
            break
    chunks.close()


def session(url: str) -> dict:
    """What a few users get: two concurrent streams (and a client leaving among them), a second
    turn, a seeded sampled reply, a reply held to JSON (with a stop string), and an image and a
    second turn about it."""
    with ThreadPoolExecutor(3) as pool:
        leaving = pool.submit(_leaving, url)
        replies = dict(zip(QUESTIONS, pool.map(lambda q: _streamed(url, q), QUESTIONS)))
        leaving.result()
    turns = [
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": replies[QUESTIONS[0]]},
        {"role": "user", "content": "And then?"},
    ]
    second = _client(url).chat.completions.create(model="demo", messages=turns, max_tokens=16)
    replies["second turn"] = second.choices[0].message.content
    replies["cached"] = second.usage.prompt_tokens_details.cached_tokens
    replies["sampled"] = _streamed(url, "Pick a word.", temperature=1.0, seed=7)
    replies["json"] = _streamed(url, "Answer in JSON.", response_format={"type": "json_object"}, stop=["\n\n"])
    image = f"data:image/png;base64,{base64.b64encode(IMAGE.read_bytes()).decode()}"
    asked = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe it."}]
    first = _client(url).chat.completions.create(
        model="demo", messages=[{"role": "user", "content": asked}], max_tokens=16
    )
    replies["image"], replies["image tokens"] = first.choices[0].message.content, first.usage.prompt_tokens
    turns = [
        {"role": "user", "content": asked},
        {"role": "assistant", "content": replies["image"]},
        {"role": "user", "content": "What else?"},
    ]
    again = _client(url).chat.completions.create(model="demo", messages=turns, max_tokens=16)
    replies["image turn"] = again.choices[0].message.content
    replies["image cached"] = again.usage.prompt_tokens_details.cached_tokens
    return replies


@pytest.fixture(scope="module")
def alone(demo_home, tmp_path_factory) -> dict:
    with running(demo_home, tmp_path_factory.mktemp("alone") / "server.log") as (url, _):
        return session(url)


@pytest.fixture(scope="module")
def demo32(demo_home, tmp_path_factory) -> Path:
    from commands import cli

    folder = tmp_path_factory.mktemp("demo32") / "demo-float32"
    run = cli("convert", "--demo", "--dtype", "float32", "--mlx-path", str(folder), home=demo_home)
    assert run.returncode == 0, run.stderr
    return folder


def test_a_pipeline_server_answers_what_one_process_answers(alone, demo_home, tmp_path):
    """With the demo drafter on the stage that holds its keys; stopped by SIGTERM to the first
    process, which tells the other to stop before it exits."""
    log = tmp_path / "server.log"
    with running(demo_home, log, "--pipeline", "--draft-model", "demo", launch=2) as (url, _):
        got = session(url)
    assert got == alone and alone["cached"] > 10  # the second turn started from the first's cache
    assert alone["image cached"] > alone["image tokens"] // 2  # the image turn too: its soft tokens were cached
    assert alone["json"].startswith("{") and alone["sampled"] != alone["json"]
    text = log.read_text()
    assert "[ring]" not in text, text[-2000:]  # no process was left waiting on a lost peer
    assert "Traceback" not in text and text.count("Serving demo") == 1


def test_a_tensor_parallel_server_answers_what_one_process_answers(demo32, demo_home, tmp_path):
    with running(demo_home, tmp_path / "alone.log", model=demo32) as (url, _):
        want = session(url)
    flags = ("--tensor-parallel", "--draft-model", "demo")
    with running(demo_home, tmp_path / "server.log", *flags, model=demo32, launch=2) as (url, _):
        got = session(url)
        metrics = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    assert got == want and want["cached"] > 10
    drafted = re.search(r"^mlx_gemma4u_draft_tokens_total (\S+)$", metrics, re.MULTILINE)
    assert drafted and float(drafted[1]) > 0  # the split drafter drafted (and the replies stayed the same)


def test_a_rank_killed_mid_reply_ends_the_stream_and_the_server(demo_home, tmp_path):
    with running(demo_home, tmp_path / "server.log", "--pipeline", launch=2) as (url, launcher):
        port = url.rsplit(":", 1)[1]
        rank_1 = rank_pid(f"mlx_gemma4u serve .*--port {port}", 1)
        chunks = _client(url).chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Go on."}], max_tokens=2000, stream=True
        )
        start, received = time.monotonic(), 0
        try:
            for _ in chunks:
                received += 1
                if received == 3:
                    os.kill(rank_1, signal.SIGKILL)
                assert time.monotonic() - start < 60
        except openai.APIError:
            pass  # the stream ends with an error event or a closed connection
        launcher.wait(timeout=60)
    assert received < 100 and time.monotonic() - start < 90  # it ended soon after the kill, far short of 2000
    assert not left_running(f"--port {port}")
