"""`mlx-gemma4u chat`: the terminal chat. rich draws the output; readline gives line editing and history.

    load (spinner) -> read a line -> a /command runs (chat_session) | a message is sent ->
    the reply streams live (thought dimmed, answer as Markdown, a tool call as a line of code, the
    newest screenful shown) ->
    printed whole as Markdown, then a status line -> read the next line

The conversation's PromptCache lives here, so each turn prefills only its new tokens. Ctrl-C during
a reply only sets a flag, checked between tokens: the reply stops cleanly and the cache stays valid.
"""

from __future__ import annotations

import argparse
import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from mlx_gemma4u.cli.chat_session import (
    HELP,
    SET_NAMES,
    Conversation,
    media_item,
    parse_command,
    pull_media_paths,
    set_param,
    split_paths,
    status_line,
)
from mlx_gemma4u.errors import Gemma4UError, InputError
from mlx_gemma4u.generation.api import stream_generate
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.generation.prompt_cache import PromptCache
from mlx_gemma4u.generation.reply import Delta, Reply, ToolCall

THOUGHT_STYLE = "dim italic"


def add_arguments(chat: argparse.ArgumentParser) -> None:
    """The chat subcommand's flags."""
    from mlx_gemma4u.cli.flags import add_draft_args, add_model_args, add_sampling_args

    add_model_args(chat)
    add_draft_args(chat)
    chat.add_argument("--system", help="a system prompt")
    add_sampling_args(chat, max_tokens=1024)
    chat.add_argument("--think", action="store_true", help="let the model think before answering")
    chat.add_argument("--hide-thinking", action="store_true", help="think, but do not show the thoughts")


def run(args: argparse.Namespace) -> None:
    from mlx_gemma4u.cli.flags import draft_kwargs, load_from_args, sampling_params

    params = sampling_params(args)
    console = Console(highlight=False)
    with console.status("Loading the model…"):
        model, processor = load_from_args(args, args.adapter_path)
        draft = draft_kwargs(args, model)
    conversation = Conversation(system=args.system, thinking=args.think or args.hide_thinking)
    Chat(console, model, processor, conversation, params, show_thinking=not args.hide_thinking, draft=draft).run()


class Chat:
    """The read-command-or-message loop on a console; every state change goes through Conversation."""

    def __init__(
        self,
        console: Console,
        model,
        processor,
        conversation: Conversation,
        params: SamplingParams,
        show_thinking: bool = True,
        draft: dict | None = None,
    ):
        self.console, self.model, self.processor = console, model, processor
        self.draft = draft or {}  # stream_generate's draft_model / num_draft_tokens, if drafting
        self.conversation, self.params, self.show_thinking = conversation, params, show_thinking
        self.cache = PromptCache(model, params.kv_bits)
        self.last = None  # the last reply's final GenerationResponse
        self.can_think = "enable_thinking" in (processor.chat_template or "")

    def run(self) -> None:
        _enable_history()
        self.say("Chat ready. Type a message, /help for commands, Ctrl-D to quit.", "bold")
        while True:
            try:
                line = input(self.prompt_text())
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return
            try:
                if not self.handle(line):
                    return
            except Gemma4UError as exc:
                self.say(f"error: {exc}", "red")

    def prompt_text(self) -> str:
        pending = self.conversation.pending
        return f"[{len(pending)} attached] > " if pending else "> "

    def say(self, message: str, style: str = "") -> None:
        self.console.print(Text(message, style=style))

    def handle(self, line: str) -> bool:
        """Run one typed line; False when the chat should end."""
        command = parse_command(line)
        if command is None:
            self.send(line)
            return True
        name, argument = command
        if name in ("quit", "exit"):
            return False
        method = getattr(self, f"cmd_{name}", None)
        if method is None:
            raise InputError(f"Unknown command /{name}; /help lists the commands.")
        method(argument)
        return True

    def send(self, line: str) -> None:
        text, dragged = pull_media_paths(line)
        self.conversation.pending.extend(dragged)
        if not text:
            if dragged:
                self.say(f"Attached {len(dragged)} file(s); they go with your next message.", "green")
            return
        self.conversation.add_user(text)
        try:
            self.reply()
        except Gemma4UError:
            self.conversation.drop_last_user()
            raise

    def reply(self) -> None:
        """Stream one reply into a live view, then print it whole with its status line."""
        view = ReplyView(Reply(self.processor.tokenizer), self.show_thinking)
        last = None
        with (
            _sigint_as_flag() as stop,
            _no_autowrap(self.console),
            Live(view, console=self.console, transient=True, refresh_per_second=8, vertical_overflow="crop"),
        ):
            for last in stream_generate(
                self.model,
                self.processor,
                self.conversation.prompt(),
                prompt_cache=self.cache,
                params=self.params.replace(enable_thinking=self.conversation.thinking),
                **self.draft,
            ):
                view.add(last.token, last.text)
                if stop.requested:
                    break
        view.finish()
        self.console.print(view.final())
        self.conversation.add_reply(view.answer.strip())
        if last is not None:
            self.last = last
            stopped = "stopped (Ctrl-C) · " if stop.requested else ""
            self.say(stopped + status_line(last, len(self.cache.tokens), self.context_size()), "dim")

    def context_size(self) -> int:
        return self.model.config.text.max_position_embeddings

    def attach(self, kind: str, argument: str) -> None:
        items = [media_item(path, kind) for path in split_paths(argument)]
        self.conversation.pending.extend(items)
        names = ", ".join(item["path"] for item in items)
        self.say(f"Attached {kind} {names}; it goes with your next message.", "green")

    def cmd_image(self, argument: str) -> None:
        self.attach("image", argument)

    def cmd_audio(self, argument: str) -> None:
        self.attach("audio", argument)

    def cmd_video(self, argument: str) -> None:
        self.attach("video", argument)

    def cmd_help(self, _: str) -> None:
        table = Table(show_header=False, box=None, padding=(0, 2))
        for usage, meaning in HELP:
            table.add_row(Text(usage, style="bold"), meaning)
        self.console.print(table)
        self.say("Ctrl-C stops a reply; at the prompt it quits. Arrow keys recall earlier lines.", "dim")

    def cmd_reset(self, _: str) -> None:
        self.conversation.reset()
        self.cache = PromptCache(self.model, self.params.kv_bits)
        self.say("New conversation.", "green")

    def cmd_system(self, argument: str) -> None:
        self.conversation.system = argument or None
        self.say("System prompt set." if argument else "System prompt cleared.", "green")

    def cmd_think(self, argument: str) -> None:
        if argument not in ("on", "off"):
            raise InputError("Use /think on or /think off.")
        if argument == "on" and not self.can_think:
            raise InputError("This model's chat template has no thinking mode.")
        self.conversation.thinking = argument == "on"
        self.say(f"Thinking {argument}.", "green")

    def cmd_set(self, argument: str) -> None:
        self.params, attr = set_param(self.params, argument)
        self.say(f"{attr} = {getattr(self.params, attr)}", "green")

    def cmd_retry(self, _: str) -> None:
        self.conversation.take_back_reply()
        self.reply()

    def cmd_save(self, argument: str) -> None:
        path = _one_path(argument, "/save FILE")
        self.conversation.save(path)
        self.say(f"Saved {len(self.conversation.messages)} messages to {path}", "green")

    def cmd_load(self, argument: str) -> None:
        path = _one_path(argument, "/load FILE")
        self.conversation = Conversation.load(path)
        self.say(f"Loaded {len(self.conversation.messages)} messages from {path}", "green")

    def cmd_stats(self, _: str) -> None:
        messages = self.conversation.messages
        self.say(
            f"{len(messages)} messages · context {len(self.cache.tokens):,} of {self.context_size():,} tokens · "
            f"thinking {'on' if self.conversation.thinking else 'off'} · settings {_shown(self.params)}"
        )
        if self.last is not None:
            self.say("last reply: " + status_line(self.last, len(self.cache.tokens), self.context_size()))


class ReplyView:
    """The reply as it streams: the thought dimmed (if shown), the answer as Markdown.

    `answer` is the reply's answer with its tool calls in place, each a line of code: the chat
    declares no tools, so a call is shown and kept in the conversation as what the model said.
    Live redraws only what fits on the screen, so while streaming only the newest lines are shown;
    final() is the whole reply, printed once it is complete.
    """

    def __init__(self, reply: Reply, show_thinking: bool):
        self.reply, self.show_thinking = reply, show_thinking
        self.answer = ""

    def add(self, token: int | None, text: str) -> None:
        self._take(self.reply.add(token, text))

    def finish(self) -> None:
        self._take(self.reply.finish())

    def _take(self, delta: Delta) -> None:
        self.answer += delta.content + "".join(_call_line(call) for call in delta.tool_calls)

    def final(self) -> Group:
        return self._render(empty=Text("(no reply)", style="dim"))

    def _render(self, empty) -> Group:
        thought, answer = self.reply.reasoning.strip(), self.answer
        parts = [Text(thought, style=THOUGHT_STYLE)] if self.show_thinking and thought else []
        if answer.strip():
            parts.append(Markdown(answer))
        elif not parts:
            parts.append(empty)
        return Group(*parts)

    def __rich_console__(self, console, options):
        label = " thinking…" if self.reply.in_thought else " reading the prompt…"
        lines = console.render_lines(self._render(Spinner("dots", text=Text(label, style="dim"))), options, pad=False)
        for line in lines[-max(1, console.size.height - 2) :]:
            yield from line
            yield Segment.line()


def _call_line(call: ToolCall) -> str:
    """A tool call as a Markdown paragraph of code: `name({"argument": value})`."""
    return f"\n\n`{call.name}({json.dumps(call.arguments, ensure_ascii=False)})`\n\n"


AUTOWRAP_OFF, AUTOWRAP_ON = "\x1b[?7l", "\x1b[?7h"  # DECAWM: whether a line wider than the terminal wraps


@contextmanager
def _no_autowrap(console: Console) -> Iterator[None]:
    """While the reply streams, the terminal clips a line at its right edge instead of wrapping it.

    Live repaints by moving the cursor up as many rows as rich rendered lines, each fitted to the
    width by rich's own cell widths. A terminal that gives some characters more cells (tmux and
    wcwidth-based terminals: Indic vowel signs 1 cell where rich counts 0, an emoji with a skin
    tone or a ZWJ family 4 or 6 where rich counts 2) wraps such a line onto a second row, so each
    repaint stopped short and left rows behind, until the scrollback held the reply many times over.
    With wrapping off, every rendered line is exactly one row whatever the terminal's widths; the
    finished reply is printed after this, wrapped as usual.
    """
    if not console.is_terminal:
        yield
        return
    console.file.write(AUTOWRAP_OFF)
    try:
        yield
    finally:
        console.file.write(AUTOWRAP_ON)
        console.file.flush()


class _StopFlag:
    requested = False


@contextmanager
def _sigint_as_flag() -> Iterator[_StopFlag]:
    """While a reply streams, Ctrl-C sets a flag instead of raising, so the loop can stop between tokens."""
    flag = _StopFlag()

    def on_sigint(signum, frame):
        flag.requested = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _one_path(argument: str, usage: str) -> str:
    paths = split_paths(argument) if argument else []
    if len(paths) != 1:
        raise InputError(f"Use {usage} with one file path.")
    return paths[0]


def _enable_history() -> None:
    """Arrow keys recall earlier lines: importing readline hooks it into input()."""
    try:
        import readline  # noqa: F401
    except ImportError:  # Windows has none; input() still works
        pass


def _shown(params: SamplingParams) -> str:
    """/settings' one line: the fields /set changes."""
    return ", ".join(f"{name}={getattr(params, name)}" for name in SET_NAMES.values())
