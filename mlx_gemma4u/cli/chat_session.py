"""The terminal chat's state and commands, free of any terminal so they can be tested directly.

typed line -> parse_command()     "/image a.png" -> ("image", "a.png"); anything else is a message
           -> pull_media_paths()  file paths dragged into the message become attachments
Conversation   system prompt, thinking flag, messages (transformers' content-list format) and the
               attachments waiting for the next message; prompt() is what stream_generate reads;
               save()/load() keep it as JSON, written atomically, media referenced by path
Settings       the sampling options, changeable mid-chat with /set
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_gemma4u.errors import InputError
from mlx_gemma4u.files import write_text
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.processing.audio import FORMATS as AUDIO_FORMATS
from mlx_gemma4u.processing.messages import check_messages

FORMAT = "mlx-gemma4u-chat"
MEDIA_SUFFIXES = {
    "image": {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"},
    "audio": {".wav", ".flac", ".ogg", ".mp3"},
    "video": {".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi"},
}
HELP = [
    ("/image PATH", "attach an image to your next message (several allowed; dragging a file in works too)"),
    ("/audio PATH", f"attach an audio clip: {AUDIO_FORMATS}"),
    ("/video PATH", "attach a video: mp4, mov, webm"),
    ("/system TEXT", "set the system prompt (empty clears it)"),
    ("/think on|off", "let the model think before it answers (if its chat template can)"),
    ("/set NAME VALUE", "change max-tokens, temp, top-p, top-k, min-p or seed"),
    ("/retry", "regenerate the last reply"),
    ("/reset", "start a new conversation"),
    ("/save FILE", "write the conversation to a JSON file"),
    ("/load FILE", "continue a conversation saved with /save"),
    ("/stats", "speed, context and memory figures"),
    ("/help", "this list"),
    ("/quit", "leave (Ctrl-D does too)"),
]
# A quoted path, or a run of non-space characters where "\ " stands for a space (macOS Terminal's drag).
_PATH_LIKE = re.compile(r"'[^']+'|\"[^\"]+\"|(?:\\.|[^\s'\"\\])+")


def parse_command(line: str) -> tuple[str, str] | None:
    """("name", "argument") for a line like "/name argument", else None (a message to send).

    Only letters may follow the slash, so a dragged absolute path ("/Users/me/a.png") is not a command.
    """
    match = re.fullmatch(r"/([A-Za-z]+)(?:\s+(.*))?", line.strip(), flags=re.DOTALL)
    return (match.group(1).lower(), (match.group(2) or "").strip()) if match else None


def media_kind(path: str | Path) -> str | None:
    """ "image", "audio" or "video" from the file name's suffix; None for anything else."""
    suffix = Path(path).suffix.lower()
    return next((kind for kind, suffixes in MEDIA_SUFFIXES.items() if suffix in suffixes), None)


def media_item(raw: str, kind: str) -> dict[str, str]:
    """A content item {"type": kind, "path": absolute path} for a file that exists and can be read."""
    path = Path(raw).expanduser()
    if not path.exists():
        raise InputError(f"The {kind} file {raw!r} does not exist; check the path.")
    if not path.is_file():
        raise InputError(f"{raw!r} is a folder, not {'a' if kind == 'video' else 'an'} {kind} file.")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise InputError(f"The {kind} file {raw!r} cannot be read ({exc.strerror}).") from None
    return {"type": kind, "path": str(path.resolve())}


def split_paths(argument: str) -> list[str]:
    """The paths of a /image, /audio or /video argument, shell-quoted or backslash-escaped as dragged."""
    try:
        paths = shlex.split(argument)
    except ValueError:
        raise InputError("A quote is not closed in that path.") from None
    if not paths:
        raise InputError("Give a file path after the command, for example /image ~/Desktop/photo.jpg.")
    return paths


def pull_media_paths(text: str) -> tuple[str, list[dict[str, str]]]:
    """Take the paths of existing media files out of a typed message: (the rest of it, their items).

    Terminals paste a dragged file as a path, quoted or with "\\ " for spaces; those become attachments.
    """
    items, rest, last = [], [], 0
    for match in _PATH_LIKE.finditer(text):
        raw = match.group()
        path = raw[1:-1] if raw[0] in "'\"" else re.sub(r"\\(.)", r"\1", raw)
        kind = media_kind(path)
        if kind and Path(path).expanduser().is_file():
            items.append(media_item(path, kind))
            rest.append(text[last : match.start()])
            last = match.end()
    rest.append(text[last:])
    return " ".join(" ".join(rest).split()), items


SET_NAMES = {
    "max-tokens": "max_tokens",
    "temp": "temperature",
    "top-p": "top_p",
    "top-k": "top_k",
    "min-p": "min_p",
    "seed": "seed",
}  # /set's names (the command line's) -> SamplingParams'


def set_param(params: SamplingParams, argument: str) -> tuple[SamplingParams, str]:
    """/set "NAME VALUE" -> (params with that field changed, its name). Checked as every
    SamplingParams is, so a value the engine would refuse is refused here and the old one stays."""
    name, _, value = argument.partition(" ")
    if name not in SET_NAMES or not value.strip():
        raise InputError(f"Use /set NAME VALUE with NAME one of {', '.join(SET_NAMES)}.")
    attr = SET_NAMES[name]
    kind = int if attr in ("max_tokens", "top_k", "seed") else float
    try:
        parsed = kind(value.strip())
    except ValueError:
        raise InputError(
            f"{name} takes {'a whole number' if kind is int else 'a number'}, not {value.strip()!r}."
        ) from None
    return params.replace(**{attr: parsed}), attr


@dataclass
class Conversation:
    """What the model sees next turn, plus what the user has attached for the next message."""

    system: str | None = None
    thinking: bool = False
    messages: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, str]] = field(default_factory=list)

    def prompt(self) -> list[dict[str, Any]]:
        """The chat messages for stream_generate: the system prompt, then the turns so far."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def add_user(self, text: str) -> None:
        """Append a user message carrying the pending attachments, which it uses up."""
        content = [*self.pending, {"type": "text", "text": text}] if self.pending else text
        self.messages.append({"role": "user", "content": content})
        self.pending = []

    def add_reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def drop_last_user(self) -> None:
        """Forget the user message whose reply failed, so the conversation stays as it was."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()

    def take_back_reply(self) -> None:
        """Remove the last reply so it can be generated again (/retry)."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise InputError("There is no reply to retry yet.")
        self.messages.pop()

    def reset(self) -> None:
        """A new conversation; the system prompt and thinking setting stay."""
        self.messages, self.pending = [], []

    def save(self, path: str | Path) -> None:
        data = {
            "format": FORMAT,
            "version": 1,
            "system": self.system,
            "thinking": self.thinking,
            "messages": self.messages,
        }
        try:
            write_text(Path(path).expanduser(), json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise InputError(f"Could not write {path} ({exc.strerror}).") from None

    @classmethod
    def load(cls, path: str | Path) -> Conversation:
        """Read a file written by save(); a broken one raises InputError naming what is wrong."""
        try:
            data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"Could not read {path} ({exc.strerror}).") from None
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{path} is not a saved chat (it is not valid JSON).") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("messages"), list):
            raise InputError(f"{path} is not a saved chat (no '{FORMAT}' format and messages list).")
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise InputError(f"{path} has a system prompt that is not text.")
        messages = data["messages"]
        if messages:
            try:
                check_messages(messages)
            except InputError as exc:
                raise InputError(f"{path} is not a usable chat: {exc}") from None
            _check_media_exist(messages, path)
        return cls(system=system, thinking=bool(data.get("thinking")), messages=messages)


def _check_media_exist(messages: list[dict[str, Any]], path: str | Path) -> None:
    for message in messages:
        content = message["content"]
        for item in [] if isinstance(content, str) else content:
            source = item.get("path")
            if source is not None and not Path(source).expanduser().is_file():
                raise InputError(f"{path} refers to {source}, which no longer exists.")


def status_line(response: Any, context_tokens: int, context_size: int) -> str:
    """One line of figures after a reply, from its last GenerationResponse."""
    return (
        f"{response.generation_tokens} tokens at {response.generation_tps:.1f} tokens/s · "
        f"prompt {response.prompt_tokens} tokens ({response.prefilled_tokens} new) at "
        f"{response.prompt_tps:.0f} tokens/s · context {context_tokens:,} of {context_size:,} · "
        f"peak memory {response.peak_memory:.2f} GB"
        + (f" · draft acceptance {draft.rate:.0%} (K {draft.k})" if (draft := getattr(response, "draft", None)) else "")
    )
