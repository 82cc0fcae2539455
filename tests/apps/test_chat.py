"""The terminal chat: its state and commands directly, then the real `mlx-gemma4u chat` in a pseudo-terminal."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from mlx_gemma4u.cli.chat_session import (
    Conversation,
    media_item,
    parse_command,
    pull_media_paths,
    set_param,
    split_paths,
)
from mlx_gemma4u.errors import InputError
from mlx_gemma4u.generation.params import SamplingParams

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|[\r\x1b]")


@pytest.fixture
def photo(fixtures_dir, tmp_path):
    """A real image whose path has a space, as Finder names often do."""
    path = tmp_path / "my photo.gif"
    shutil.copy(fixtures_dir / "images" / "palette_coffee_300x200.gif", path)
    return path


def test_commands_are_slash_words_and_absolute_paths_are_not():
    assert parse_command("/image  a b.png ") == ("image", "a b.png")
    assert parse_command("/RESET") == ("reset", "")
    assert parse_command("/Users/me/photo.png what is this?") is None
    assert parse_command("hello /image") is None


def test_dragged_paths_become_attachments(photo):
    for dragged in (f"'{photo}'", f'"{photo}"', str(photo).replace(" ", "\\ ")):
        text, items = pull_media_paths(f"What is in {dragged} here?")
        assert text == "What is in here?"
        assert items == [{"type": "image", "path": str(photo)}]
    assert pull_media_paths("see notes.txt and a.png") == ("see notes.txt and a.png", [])
    assert split_paths(f"'{photo}' {photo.parent}/x\\ y.wav") == [str(photo), f"{photo.parent}/x y.wav"]


def test_bad_media_and_bad_settings_are_one_sentence(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        media_item(str(tmp_path / "gone.png"), "image")
    with pytest.raises(InputError, match="is a folder"):
        media_item(str(tmp_path), "audio")
    with pytest.raises(InputError, match="quote is not closed"):
        split_paths("'open.png")
    params, name = set_param(SamplingParams(), "max-tokens 12")
    assert name == "max_tokens" and params.max_tokens == 12
    with pytest.raises(InputError, match="whole number"):
        set_param(params, "top-k lots")
    with pytest.raises(InputError, match="NAME one of"):
        set_param(params, "warp 9")


@pytest.mark.parametrize(
    "line, message",
    [
        ("seed -1", "seed must be a whole number from 0 to 2\\*\\*64 - 1, got -1"),
        (f"seed {2**64}", "seed must be"),
        ("temp -1", "temperature must be 0"),
        ("top-p 2", "top_p must be in"),
        ("max-tokens 0", "max_tokens must be"),
    ],
)
def test_set_refuses_what_the_engine_would_and_keeps_the_old_value(line, message):
    """/set checks a value as SamplingParams does everywhere, in one sentence; the old one stays."""
    params = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, seed=3)
    with pytest.raises(InputError, match=message) as info:
        set_param(params, line)
    assert "\n" not in str(info.value)
    assert params == SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, seed=3)
    assert set_param(params, f"seed {2**64 - 1}")[0].seed == 2**64 - 1


def test_conversation_turns_retry_and_reset(photo):
    chat = Conversation(system="Be terse.")
    chat.pending.append(media_item(str(photo), "image"))
    chat.add_user("What is it?")
    assert chat.pending == []
    with pytest.raises(InputError, match="no reply"):
        chat.take_back_reply()
    chat.add_reply("Coffee.")
    assert [m["role"] for m in chat.prompt()] == ["system", "user", "assistant"]
    assert chat.prompt()[1]["content"][0] == {"type": "image", "path": str(photo)}
    chat.take_back_reply()
    assert chat.messages[-1]["role"] == "user"
    chat.drop_last_user()
    assert chat.messages == []
    chat.add_user("Hi")
    chat.reset()
    assert chat.messages == [] and chat.system == "Be terse."


def test_save_load_round_trip_is_atomic(photo, tmp_path):
    chat = Conversation(system="Be terse.", thinking=True)
    chat.pending.append(media_item(str(photo), "image"))
    chat.add_user("What is it?")
    chat.add_reply("Coffee ☕")
    path = tmp_path / "chat.json"
    chat.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "my photo.gif"]  # no temp file left
    loaded = Conversation.load(path)
    assert (loaded.system, loaded.thinking, loaded.messages) == ("Be terse.", True, chat.messages)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ('{"messages": []}', "not a saved chat"),
        ('{"format": "mlx-gemma4u-chat", "messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
        (
            '{"format": "mlx-gemma4u-chat", "messages": [{"role": "user", "content": '
            '[{"type": "image", "path": "/nowhere/a.png"}]}]}',
            "no longer exists",
        ),
    ],
)
def test_a_broken_chat_file_is_refused_in_one_line(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        Conversation.load(path)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="Could not read"):
        Conversation.load(tmp_path / "missing.json")


def test_the_reply_view_shows_the_thought_and_keeps_the_answer(processor):
    """The chat reads a reply through generation/reply.py's Reply (tests/generation/test_reply.py): the thought
    is shown (or not), the answer is what the conversation keeps, a tool call is in it as code."""
    from rich.console import Console

    from mlx_gemma4u.cli.chat import ReplyView
    from mlx_gemma4u.generation.reply import Reply

    tokenizer = processor.tokenizer
    streamed = [
        (tokenizer.convert_tokens_to_ids("<|channel>"), ""),
        (None, "thought\n"),
        (None, "Sky is"),
        (None, " blue."),
        (tokenizer.convert_tokens_to_ids("<channel|>"), ""),
        (None, "It is blue."),
    ]
    call = tokenizer.encode('<|tool_call>call:paint{colour:<|"|>blue<|"|>}<tool_call|>', add_special_tokens=False)
    for show_thinking in (True, False):
        view = ReplyView(Reply(tokenizer), show_thinking)
        for token, text in streamed + [(token, "") for token in call]:
            view.add(token, text)
        view.finish()
        console = Console(file=io.StringIO(), width=120)
        console.print(view.final())
        printed = console.file.getvalue()
        assert ("Sky is blue." in printed) == show_thinking and "thought" not in printed
        assert view.answer == 'It is blue.\n\n`paint({"colour": "blue"})`\n\n'
        assert 'paint({"colour": "blue"})' in printed


def test_a_stopped_reply_leaves_the_prompt_cache_usable(demo_home):
    """Ctrl-C breaks out of stream_generate mid-reply; the next turn must still match a cold run."""
    from mlx_gemma4u.generation.api import stream_generate
    from mlx_gemma4u.generation.prompt_cache import PromptCache
    from mlx_gemma4u.weights.loading import load

    model, processor = load(demo_home / "demo-v1")
    cache = PromptCache(model)
    turn1 = [{"role": "user", "content": "Hello"}]
    reply = ""
    for n, response in enumerate(stream_generate(model, processor, turn1, max_tokens=50, prompt_cache=cache)):
        reply += response.text
        if n == 3:
            break
    assert all(c.offset == len(cache.tokens) for c in cache.caches)
    turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "Go on"}]

    def tokens(prompt_cache):
        return [r.token for r in stream_generate(model, processor, turn2, max_tokens=5, prompt_cache=prompt_cache)]

    assert tokens(cache) == tokens(PromptCache(model))
    assert cache.reused > 0


def test_the_turn_after_an_image_does_not_embed_it_again(demo_home, photo, monkeypatch):
    """The chat session's PromptCache keeps the image's soft tokens: the second turn runs the vision
    embedder no more, and its reply equals a cold run's."""
    from rich.console import Console

    from mlx_gemma4u.cli.chat import Chat
    from mlx_gemma4u.generation.api import stream_generate
    from mlx_gemma4u.generation.prompt_cache import PromptCache
    from mlx_gemma4u.generation.reply import Reply
    from mlx_gemma4u.models.vision import VisionEmbedder
    from mlx_gemma4u.weights.loading import load

    calls = []
    embed = VisionEmbedder.__call__
    monkeypatch.setattr(VisionEmbedder, "__call__", lambda self, *a: calls.append(1) or embed(self, *a))
    model, processor = load(demo_home / "demo-v1")
    chat = Chat(Console(file=io.StringIO()), model, processor, Conversation(), SamplingParams(max_tokens=4))
    chat.handle(f"/image '{photo}'")
    chat.handle("What is in it?")
    assert len(calls) == 1
    chat.handle("And the colour?")
    assert len(calls) == 1
    reply = Reply(processor.tokenizer)
    for r in stream_generate(
        model, processor, chat.conversation.prompt()[:-1], max_tokens=4, prompt_cache=PromptCache(model)
    ):
        reply.add(r.token, r.text)
    reply.finish()
    assert len(calls) == 2  # a fresh PromptCache embeds the image again
    assert reply.content.strip() == chat.conversation.messages[-1]["content"]


def visible(text: str) -> str:
    return ANSI.sub("", text)


def test_chat_in_a_terminal(demo_home, photo, tmp_path):
    """Drive the real chat: stream, attach, save, reset, load, interrupt, keep chatting, quit."""
    env = {**os.environ, "MLX_GEMMA4U_HOME": str(demo_home), "TERM": "xterm-256color", "COLUMNS": "200"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_gemma4u", "chat", "--demo", "--max-tokens", "6"],
        env=env,
        encoding="utf-8",
        dimensions=(40, 200),
        timeout=60,
        cwd=str(tmp_path),
    )
    child.logfile_read = log = io.StringIO()
    stats = re.compile(r"prompt (\d+) tokens \((\d+) new\)")
    try:
        child.expect("Chat ready", timeout=180)
        child.sendline("Hello")
        child.expect(stats)
        first_prompt = int(child.match.group(1))

        child.sendline(f"/image {tmp_path / 'gone.png'}")
        child.expect("error: The image file .* does not exist")
        child.sendline(f"'{photo}' What is this?")  # dragged into the terminal: quoted, with a space
        child.expect(stats)
        total, new = int(child.match.group(1)), int(child.match.group(2))
        assert total > first_prompt + 200 and new < total  # the image is in; turn 1 came from the cache

        (tmp_path / "broken.png").write_text("not a picture")
        child.sendline(f"/image {tmp_path / 'broken.png'}")
        child.expect("Attached image")
        child.sendline("Look at this")  # fails before any reply: one line, and the message is not kept
        child.expect("error: The file .*broken.png' is not an image")
        child.sendline("/frobnicate")
        child.expect("error: Unknown command /frobnicate")
        saved = tmp_path / "chat.json"
        child.sendline(f"/save {saved}")
        child.expect("Saved 4 messages")
        child.sendline("/reset")
        child.expect("New conversation")
        (tmp_path / "corrupt.json").write_text('{"format": "mlx-gemma4u-chat", "messa')
        child.sendline(f"/load {tmp_path / 'corrupt.json'}")
        child.expect("error: .*corrupt.json is not a saved chat")
        child.sendline(f"/load {saved}")
        child.expect("Loaded 4 messages")
        child.sendline("And now?")
        child.expect(stats)
        assert int(child.match.group(1)) > total

        # A fresh "Hello" with room for thousands of tokens starts with the same greedy words as turn 1:
        # seeing them before the reply could have finished shows the streaming; Ctrl-C then stops it.
        first_reply = json.loads(saved.read_text())["messages"][1]["content"]
        word = next(w for w in first_reply.split() if re.fullmatch(r"\w{2,}", w))
        child.sendline("/reset")
        child.sendline("/set max-tokens 20000")
        child.expect("max_tokens = 20000")
        child.sendline("Hello")
        child.expect(re.escape(word))
        child.sendintr()
        child.expect("stopped \\(Ctrl-C\\)")
        child.sendline("/set max-tokens 4")
        child.sendline("Still there?")
        child.expect(stats)
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "Traceback" not in visible(log.getvalue())
    assert len(json.loads(saved.read_text())["messages"]) == 4


# A reply whose characters rich and tmux measure differently (rich: 2 cells for an emoji with a skin
# tone, 0 for a Devanagari vowel sign; tmux, like wcwidth: 4 and 1), with CJK between, each word
# numbered so the scrollback shows whether it holds the reply once.
WIDE_REPLY = [f"w{i:04d} 👍🏽你好नमस्ते " for i in range(400)]


def fake_stream(pieces, pause: float = 0.0):
    """stream_generate's stand-in: `pieces` as responses `pause` seconds apart, with the figures
    status_line reads."""
    from types import SimpleNamespace

    def stream(model, processor, prompt, **kwargs):
        for i, text in enumerate(pieces, start=1):
            time.sleep(pause)
            yield SimpleNamespace(
                token=1000 + i,
                text=text,
                generation_tokens=i,
                generation_tps=1.0,
                prompt_tokens=3,
                prefilled_tokens=3,
                prompt_tps=1.0,
                peak_memory=0.1,
                draft=None,
            )

    return stream


def test_the_live_reply_is_drawn_without_autowrap(demo_home, monkeypatch):
    """Each live repaint moves the cursor up by rich's count of lines, so while it streams the terminal
    must not wrap a line rich fitted (it would, where its character widths differ from rich's): every
    cursor move of the live view lies between autowrap off and on, and the finished reply is printed
    after, wrapped as usual."""
    from rich.console import Console

    from mlx_gemma4u.cli.chat import AUTOWRAP_OFF, AUTOWRAP_ON, Chat
    from mlx_gemma4u.weights.loading import load

    monkeypatch.setattr("mlx_gemma4u.cli.chat.stream_generate", fake_stream(WIDE_REPLY))
    model, processor = load(demo_home / "demo-v1")
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, height=40, color_system=None)
    Chat(console, model, processor, Conversation(), SamplingParams(max_tokens=400)).handle("Hi")
    text = out.getvalue()
    off, on = text.index(AUTOWRAP_OFF), text.rindex(AUTOWRAP_ON)
    ups = [m.start() for m in re.finditer(r"\x1b\[1A", text)]
    assert text.count(AUTOWRAP_OFF) == text.count(AUTOWRAP_ON) == 1 and ups and off < ups[0] and ups[-1] < on
    assert "w0000" not in text[:off] and text[on:].count("w0399") == 1  # the whole reply, once, after


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_wide_character_reply_is_in_the_scrollback_once(demo_home, tmp_path):
    """The real chat's reply, streamed in tmux at 160 columns: every numbered word of it is in the
    scrollback exactly once (before the fix, repaints left the reply there hundreds of times)."""
    script = tmp_path / "chat_once.py"
    script.write_text(f"""
import sys
from rich.console import Console
sys.path.insert(0, {str(Path(__file__).parent)!r})
import mlx_gemma4u.cli.chat as chat
from test_chat import WIDE_REPLY, fake_stream
from mlx_gemma4u.cli.chat_session import Conversation
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.weights.loading import load

chat.stream_generate = fake_stream(WIDE_REPLY, pause=0.005)  # 2 s: Live repaints 16 times
model, processor = load({str(demo_home / "demo-v1")!r})
chat.Chat(Console(highlight=False), model, processor, Conversation(), SamplingParams(max_tokens=400)).handle("Hi")
print("END")
input()
""")
    session = f"chat-once-{os.getpid()}"
    # COLUMNS and LINES, which reach the pane from a pytest run, would make rich draw at 80 x 24
    subprocess.run(
        [
            "tmux",
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "160",
            "-y",
            "40",
            f"env -u COLUMNS -u LINES {sys.executable} {script}",
        ],
        check=True,
    )
    try:
        scrollback = ""
        for _ in range(120):
            time.sleep(0.5)
            scrollback = subprocess.run(
                ["tmux", "capture-pane", "-p", "-J", "-S", "-", "-t", session], capture_output=True, text=True
            ).stdout
            if "\nEND" in scrollback:
                break
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert "\nEND" in scrollback, scrollback[-2000:]
    counts = {word: scrollback.count(word) for word in (f"w{i:04d}" for i in range(400))}
    assert set(counts.values()) == {1}, sorted(counts.items(), key=lambda kv: -kv[1])[:5]
