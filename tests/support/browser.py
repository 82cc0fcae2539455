"""The chat page (GET /, mlx_gemma4u/serve/chat.html) driven in Debian's Chromium through playwright:
the helpers tests/apps/test_page.py uses, and the script that draws docs/images/chat-page.png:

    python tests/support/browser.py docs/images/chat-page.png

The screenshot's replies are canned (playwright answers the API calls in the browser, nothing leaves
it): the demo model's random weights write nonsense and never think, and the picture is there to show
the page, Markdown and folded thinking included."""

from __future__ import annotations

import json
import shutil
import sys
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

# A fake microphone (a beep) that needs no permission prompt, for the recording test.
FAKE_MEDIA = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
PAGE = Path(__file__).resolve().parents[2] / "mlx_gemma4u" / "serve" / "chat.html"
IMAGES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "images"
TIMEOUT_MS = 60_000  # the longest any step waits (a reply on a busy 2-core machine)


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def chromium():
    """Headless Chromium (the system's, not playwright's download) -> playwright's Browser."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=FAKE_MEDIA)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def open_page(browser, url: str, routes: dict | None = None, **context_options):
    """A fresh context (its own sessionStorage and localStorage) with the page at `url` loaded;
    `routes` (URL -> handler) answers those requests in the browser."""
    context = browser.new_context(**context_options)
    context.set_default_timeout(TIMEOUT_MS)
    for pattern, handler in (routes or {}).items():
        context.route(pattern, handler)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    origin = urllib.parse.urlsplit(url).netloc
    elsewhere: list[str] = []  # anything the page asked of another server
    page.on(
        "request",
        lambda request: urllib.parse.urlsplit(request.url).netloc in (origin, "") or elsewhere.append(request.url),
    )
    try:
        page.goto(url)
        yield page
        assert not errors, f"the page's script failed: {errors}"
        assert not elsewhere, f"the page fetched from elsewhere: {elsewhere}"
    finally:
        context.close()


def set_settings(page, thinking: bool | None = None, **numbers) -> None:
    """Fill the settings panel: temperature=, top_p=, top_k=, max_tokens=, seed= (as typed), thinking."""
    if page.locator("#settings").is_hidden():
        page.click("#settings-button")
    for name, value in numbers.items():
        page.fill(f"#set-{name}", str(value))
    if thinking is not None:
        page.set_checked("#set-thinking", thinking)
    page.click("#settings-button")  # fold it again


def send(page, text: str) -> None:
    """Type `text` into the message box and press Enter, as a person would."""
    page.fill("#input", text)
    page.press("#input", "Enter")


def finished_reply(page, index: int = -1) -> dict:
    """Wait until reply `index` (in page order) is done -> what the page shows of it."""
    from playwright.sync_api import expect

    reply = page.locator(".msg.assistant").nth(index)
    expect(reply).to_have_attribute("data-done", "true", timeout=TIMEOUT_MS)
    usage = reply.locator(".usage")
    prompt, completion = usage.get_attribute("data-prompt-tokens"), usage.get_attribute("data-completion-tokens")
    return {
        "raw": reply.get_attribute("data-raw"),
        "finish": reply.get_attribute("data-finish"),
        "usage": usage.inner_text(),
        "prompt_tokens": int(prompt) if prompt is not None else None,
        "completion_tokens": int(completion) if completion is not None else None,
        "error": reply.locator(".error").inner_text(),
    }


def _events(*chunks: dict) -> str:
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


def _canned(reasoning: str, content: str, usage: tuple[int, int]) -> str:
    """One reply as the server streams it, a few characters a chunk."""
    pieces = [{"reasoning_content": reasoning[i : i + 12]} for i in range(0, len(reasoning), 12)]
    pieces += [{"content": content[i : i + 12]} for i in range(0, len(content), 12)]
    chunks = [{"choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in pieces]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}})
    return _events(*chunks)


SCREENSHOT_REPLY = _canned(
    "The user shows a photo of a rocket on a launch pad at dusk and asks what is happening. "
    "Look at the pad, the towers and the light before answering.",
    "This is a **rocket standing on its launch pad** at dusk, before lift-off:\n\n"
    "- the vehicle is vertical and still; there is no exhaust plume or smoke yet\n"
    "- the tall lattice towers around it are *lightning masts*, which protect the pad\n"
    "- the floodlights at the base are on, as they are for a launch at twilight\n\n"
    "So it is being readied for launch, probably within hours. The slim white body and the "
    "rounded payload fairing suggest a two-stage orbital launcher such as a `Falcon 9`.",
    (298, 112),
)


def canned_site(site: str, model: str = "mlx-community/gemma-4-12B-it-4bit") -> dict:
    """Routes that answer as the server would at `site`: the page, the model list and SCREENSHOT_REPLY."""
    return {
        f"{site}/": lambda route: route.fulfill(body=PAGE.read_text(), content_type="text/html"),
        f"{site}/v1/models": lambda route: route.fulfill(json={"object": "list", "data": [{"id": model}]}),
        f"{site}/v1/chat/completions": lambda route: route.fulfill(
            body=SCREENSHOT_REPLY, content_type="text/event-stream"
        ),
    }


def screenshot(out: Path) -> None:
    """The page with one exchange (an image, folded thinking, a Markdown reply) -> `out` (PNG)."""
    site = "http://127.0.0.1:9"  # never reached: every request is answered by the routes
    size = {"width": 900, "height": 640}
    with chromium() as browser, open_page(browser, f"{site}/", canned_site(site), viewport=size) as page:
        set_settings(page, thinking=True)
        page.set_input_files("#file", IMAGES / "landscape_rocket_640x427.jpg")
        send(page, "What is happening in this picture?")
        finished_reply(page)
        page.fill("#input", "How tall is it?")
        page.mouse.move(450, 600)  # no hover highlight on the last button clicked
        page.screenshot(path=str(out))


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/images/chat-page.png"))
