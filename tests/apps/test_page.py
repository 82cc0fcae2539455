"""The chat page at / (mlx_gemma4u/serve/chat.html) in a real browser: Debian's Chromium, headless,
driven by playwright against the real `mlx-gemma4u serve --demo` process. What the page shows is
checked against what the official openai client gets from the same server. Traffic goes to
127.0.0.1 only (tests/support/browser.py fails a test whose page asked anywhere else); every wait
is bounded."""

import base64
import io
import os
import re
import time
import urllib.error
import urllib.request
import wave
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from browser import (
    SCREENSHOT_REPLY,
    TIMEOUT_MS,
    chromium,
    chromium_path,
    finished_reply,
    open_page,
    send,
    set_settings,
)
from serving import running

openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (test extra) is not installed")
expect = sync_api.expect
expect.set_options(timeout=TIMEOUT_MS)

KEY = "secret"
SHORT = 12  # tokens in a reply compared word for word
LONG = 2000  # a reply long enough to stop midway: about 35 s of the demo on this machine
ACCESS_LINE = re.compile(r"POST /v1/chat/completions \S+ (\d+) tokens in, (\d+) out")


@contextmanager
def _server(demo_home, log: Path, *flags: str):
    """The demo server for a module; no request may have caused a traceback."""
    with running(demo_home, log, *flags) as (url, _):
        yield url
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def server(demo_home, tmp_path_factory):
    log = tmp_path_factory.mktemp("page") / "server.log"
    with _server(demo_home, log) as url:
        yield url, log


@pytest.fixture(scope="module")
def keyed(demo_home, tmp_path_factory):
    with _server(demo_home, tmp_path_factory.mktemp("page-key") / "server.log", "--api-key", KEY) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if chromium_path() is None:
        if os.environ.get("CI"):  # .ci/run installs it: CI must not pass by skipping the page
            pytest.fail("no chromium on PATH in CI (.ci/run installs Debian's package `chromium`)")
        pytest.skip("no chromium on PATH (Debian's package `chromium`)")
    with chromium() as launched:
        yield launched


def _greedy(url: str, messages: list[dict], max_tokens: int):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    return client.chat.completions.create(model="demo", messages=messages, max_tokens=max_tokens, temperature=0)


def _wav(part: dict) -> tuple[tuple[int, int, int], np.ndarray]:
    """An input_audio part -> ((rate, channels, bytes a sample), its samples)."""
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
    with wave.open(io.BytesIO(base64.b64decode(part["input_audio"]["data"]))) as clip:
        shape = (clip.getframerate(), clip.getnchannels(), clip.getsampwidth())
        return shape, np.frombuffer(clip.readframes(clip.getnframes()), dtype="<i2")


def test_the_page_shows_the_greedy_reply_and_keeps_the_conversation(browser, server):
    url, _ = server
    with open_page(browser, url) as page:
        expect(page.locator("#model")).to_have_text("demo")
        page.fill("#input", "Name a color.")
        page.press("#input", "Shift+Enter")  # a new line, not a send
        assert page.input_value("#input") == "Name a color.\n" and page.locator(".msg").count() == 0
        set_settings(page, temperature=0, max_tokens=SHORT)
        send(page, "Name a color.")
        first = finished_reply(page)
        send(page, "And another one?")
        second = finished_reply(page)
        conversation = page.evaluate("window.conversation")
        page.click("#new-chat")
        assert page.locator(".msg").count() == 0 and page.evaluate("window.conversation.length") == 0
    one = [{"role": "user", "content": "Name a color."}]
    expected = _greedy(url, one, SHORT)
    assert first["raw"] == expected.choices[0].message.content
    tokens = (expected.usage.prompt_tokens, expected.usage.completion_tokens)
    assert (first["prompt_tokens"], first["completion_tokens"]) == tokens
    assert first["usage"] == f"{tokens[0]} tokens in · {tokens[1]} out"
    # every turn went back with the second message: its reply is the one for the whole conversation
    two = [*one, {"role": "assistant", "content": first["raw"]}, {"role": "user", "content": "And another one?"}]
    assert conversation == [*two, {"role": "assistant", "content": second["raw"]}]
    assert second["raw"] == _greedy(url, two, SHORT).choices[0].message.content


def test_markdown_is_rendered_without_letting_html_or_scripts_through(browser, server):
    source = (
        "# Title\n<img src=x onerror=alert(1)> **bold** and *it*\n"
        '- <i onmouseover=go>i</i> [ok](https://example.org/?a=1&b=2) [bad](javascript:go) [quote](https://x.org/"onmouseover="go)\n'
        "```\n<script>alert(1)</script>\n```\n`<b>code</b>` snake_case_name\n\n" + ">" * 5000 + " deep"
    )
    with open_page(browser, server[0]) as page:
        found = page.evaluate(
            """(source) => {
                const box = document.createElement('div');
                box.innerHTML = markdown(source);
                return {
                    unsafe: box.querySelectorAll('img, script, [onerror], [onmouseover], a:not([href^="https://"])').length,
                    links: [...box.querySelectorAll('a')].map((a) => a.getAttribute('href')),
                    tags: [...box.querySelectorAll('h1, strong, em, li, pre, code')].map((e) => e.localName),
                    code: box.querySelector('pre code').textContent,
                    text: box.textContent,
                };
            }""",
            source,
        )
    assert found["unsafe"] == 0
    assert found["links"] == ["https://example.org/?a=1&b=2", 'https://x.org/"onmouseover="go']
    assert found["tags"] == ["h1", "strong", "em", "li", "pre", "code", "code"]
    assert found["code"] == "<script>alert(1)</script>" and "<img src=x onerror=alert(1)>" in found["text"]
    assert "snake_case_name" in found["text"] and found["text"].endswith(" deep")  # no emphasis; no stack overflow


def _text_only_then_new_chat(page, text: str) -> int:
    """Send `text` alone (greedy, 4 tokens) -> its prompt's tokens; then start a new chat."""
    set_settings(page, temperature=0, max_tokens=4)
    send(page, text)
    tokens = finished_reply(page)["prompt_tokens"]
    page.click("#new-chat")
    return tokens


def test_an_attached_image_adds_its_tokens(browser, server, fixtures_dir):
    with open_page(browser, server[0]) as page:
        text_only = _text_only_then_new_chat(page, "Describe it.")
        page.set_input_files("#file", fixtures_dir / "images/tiny_coffee_40x27.png")
        video = base64.b64encode((fixtures_dir / "video/pan_coffee_240x160_15fps_2s_vp9.webm").read_bytes()).decode()
        dropped = page.evaluate_handle(
            """(data) => {
                const transfer = new DataTransfer();
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                transfer.items.add(new File([bytes], 'pan.webm', { type: 'video/webm' }));
                return transfer;
            }""",
            video,
        )
        page.dispatch_event("#log", "drop", {"dataTransfer": dropped})  # dragged onto the page
        expect(page.locator("#attachments .chip")).to_have_count(2)
        page.click("#attachments .chip.video button")  # changed my mind: the video goes
        expect(page.locator("#attachments .chip")).to_have_count(1)
        send(page, "Describe it.")
        seen = finished_reply(page)
        parts = page.evaluate("window.conversation[0].content.map((part) => part.type)")
        assert page.locator(".msg.user img").count() == 1 and page.locator("#attachments .chip").count() == 0
    assert parts == ["image_url", "text"]
    assert seen["prompt_tokens"] > text_only + 10  # the image's soft tokens are in the prompt


def test_recorded_voice_and_audio_files_are_sent_as_16k_mono_wav(browser, server, fixtures_dir):
    with open_page(browser, server[0]) as page:
        text_only = _text_only_then_new_chat(page, "What did I say?")
        page.click("#record")  # the fake microphone: a beep, no permission prompt
        expect(page.locator("#record")).to_have_attribute("aria-pressed", "true")
        page.wait_for_timeout(1500)  # the fake microphone beeps twice a second
        page.click("#record")
        expect(page.locator("#attachments .chip.audio")).to_have_count(1)
        page.set_input_files("#file", fixtures_dir / "audio/speech_48k_stereo.wav")
        expect(page.locator("#attachments .chip.audio")).to_have_count(2)
        send(page, "What did I say?")
        heard = finished_reply(page)
        parts = page.evaluate("window.conversation[0].content")
    (recorded_shape, recorded), (uploaded_shape, uploaded) = _wav(parts[0]), _wav(parts[1])
    assert recorded_shape == uploaded_shape == (16000, 1, 2)
    assert 0.8 < len(recorded) / 16000 < 6 and np.abs(recorded).max() > 1000  # about 1.5 s, beeps in it
    assert abs(len(uploaded) / 16000 - 55462 / 48000) < 0.01  # the 48 kHz stereo file, resampled and downmixed
    assert parts[2] == {"type": "text", "text": "What did I say?"}
    assert heard["prompt_tokens"] > text_only + 40  # both clips' audio tokens (25 a second) are in the prompt


def test_stop_keeps_the_partial_reply_and_the_server_stops_too(browser, server):
    url, log = server
    before = len(ACCESS_LINE.findall(log.read_text()))
    with open_page(browser, url) as page:
        set_settings(page, temperature=0, max_tokens=LONG)
        send(page, "Tell me a long story.")
        expect(page.locator(".msg.assistant")).to_have_attribute("data-raw", re.compile(".{41}", re.DOTALL))
        page.click("#stop")
        stopped = finished_reply(page)
        page.wait_for_timeout(1000)
        assert page.get_attribute(".msg.assistant", "data-raw") == stopped["raw"]  # it grows no more
        expect(page.locator("#send")).to_be_visible()
        expect(page.locator("#stop")).to_be_hidden()
        set_settings(page, max_tokens=4)
        send(page, "Go on.")
        after = finished_reply(page)
        conversation = page.evaluate("window.conversation")
    assert stopped["finish"] == "stopped" and stopped["usage"] == "stopped" and len(stopped["raw"]) > 40
    assert conversation[1] == {"role": "assistant", "content": stopped["raw"]} and len(conversation) == 4
    assert after["finish"] in ("stop", "length") and 1 <= after["completion_tokens"] <= 4
    # the server's access log counts what it made for each request: the stopped one ended far short of LONG
    for _ in range(50):  # at most 10 s for the log lines
        lines = ACCESS_LINE.findall(log.read_text())[before:]
        if len(lines) == 2:
            break
        time.sleep(0.2)
    assert len(lines) == 2 and max(int(out) for _, out in lines) < LONG // 4


def test_thinking_is_folded_above_the_answer_and_a_stream_error_keeps_the_text(browser, server):
    """The demo's random weights never think: these replies are canned, streamed as the server does."""
    bodies = []
    broken = 'data: {"choices": [{"index": 0, "delta": {"content": "Half an"}}]}\n\n'
    broken += 'data: {"error": {"message": "The reply ran out of time.", "type": "timeout"}}\n\ndata: [DONE]\n\n'
    replies = [SCREENSHOT_REPLY, broken]

    def answer(route):
        bodies.append(route.request.post_data_json)
        route.fulfill(body=replies[len(bodies) - 1], content_type="text/event-stream")

    with open_page(browser, server[0]) as page:
        page.route("**/v1/chat/completions", answer)
        set_settings(page, thinking=True)
        send(page, "What is happening in this picture?")
        thought = finished_reply(page)
        thinking = page.locator(".msg.assistant .thinking")
        folded = thinking.evaluate("(details) => !details.open && !details.hidden")
        reasoning = thinking.get_attribute("data-raw")
        send(page, "Go on.")
        cut = finished_reply(page)
    assert bodies[0]["thinking"] is True and bodies[0]["stream_options"] == {"include_usage": True}
    assert folded and reasoning.startswith("The user shows a photo of a rocket")
    assert thought["raw"].startswith("This is a **rocket") and thought["usage"] == "298 tokens in · 112 out"
    assert (cut["raw"], cut["error"], cut["finish"]) == ("Half an", "The reply ran out of time.", "error")
    assert bodies[1]["messages"][1] == {"role": "assistant", "content": thought["raw"]}  # the answer, not the thought


def test_a_refused_request_shows_why_and_gives_the_message_back(browser, server):
    with open_page(browser, server[0]) as page:
        set_settings(page, temperature=-1, max_tokens=4)
        send(page, "Hello.")
        expect(page.locator("#error")).to_contain_text("temperature must be 0 (greedy) or more")
        expect(page.locator("#input")).to_have_value("Hello.")
        assert page.locator(".msg").count() == 0 and page.evaluate("window.conversation.length") == 0
        set_settings(page, temperature=0)
        page.press("#input", "Enter")
        assert finished_reply(page)["completion_tokens"] >= 1
        expect(page.locator("#error")).to_be_hidden()


def test_the_page_asks_for_the_api_key(browser, keyed):
    with open_page(browser, keyed) as page:
        set_settings(page, temperature=0, max_tokens=4)
        send(page, "Hello.")
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#key-error")).to_be_hidden()
        page.fill("#key", "wrong")
        page.press("#key", "Enter")
        expect(page.locator("#key-error")).to_have_text("Missing or wrong API key.")
        assert page.locator(".msg.assistant[data-done]").count() == 0  # an error, not a reply
        page.click("#key-cancel")  # giving up puts the message back in the box
        expect(page.locator("#key-form")).to_be_hidden()
        expect(page.locator("#input")).to_have_value("Hello.")
        assert page.locator(".msg").count() == 0 and page.evaluate("window.conversation.length") == 0
        page.press("#input", "Enter")
        expect(page.locator("#key-error")).to_be_hidden()  # no key was sent this time: nothing was wrong
        page.fill("#key", KEY)
        page.press("#key", "Enter")
        reply = finished_reply(page)
        expect(page.locator("#model")).to_have_text("demo")  # asked again with the key
        stored = page.evaluate("sessionStorage.getItem('mlx-gemma4u.key')")
    assert reply["raw"] and reply["completion_tokens"] >= 1 and not reply["error"] and stored == KEY


def test_no_ui_turns_the_page_off(server, demo_home, tmp_path):
    with urllib.request.urlopen(f"{server[0]}/", timeout=10) as page:
        assert page.headers["content-type"].startswith("text/html")
    with running(demo_home, tmp_path / "server.log", "--no-ui") as (url, _):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/", timeout=10)
        assert refused.value.code == 404
        assert urllib.request.urlopen(f"{url}/health", timeout=10).status == 200
