"""The checkpoint's tokenizer: tokenizer.json through the `tokenizers` library, and a streaming
detokenizer, without transformers (whose import costs seconds and pulls in torch where installed).

Encodings equal transformers 5.23's `GemmaTokenizer` on the same folder (tests/processing/test_tokenizer.py):
Gemma 4's tokenizer.json adds no special tokens by itself, the special tokens are the ones
tokenizer_config.json names, and the chat template is chat_template.jinja (or the config's).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Encoding
from tokenizers import Tokenizer as FastTokenizer

from mlx_gemma4u.errors import ConfigError

REPLACEMENT = "\ufffd"  # what a byte-fallback sequence decodes to until its last byte arrives


class Tokenizer:
    """The subset of transformers' tokenizer API the processor, generation and chat use."""

    def __init__(self, fast: FastTokenizer, config: dict, chat_template: str | None, eos_token_ids: Sequence[int]):
        self._fast = fast
        self.config = config
        self.chat_template = chat_template
        self.eos_token_ids = list(eos_token_ids)
        self.padding_side = config.get("padding_side", "left")
        self._special: tuple[dict[str, int], re.Pattern[str]] | None = None  # read on first use
        self._as_text: FastTokenizer | None = None  # a copy that reads special-token strings as text
        self._as_text_lock = threading.Lock()

    @classmethod
    def from_folder(cls, folder: Path, eos_token_ids: Sequence[int]) -> Tokenizer:
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ConfigError(f"{folder} has no tokenizer.json; a Gemma 4 model folder ships one.")
        try:
            fast = FastTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the tokenizers library raises a bare Exception on a bad file
            raise ConfigError(f"Could not read {folder / 'tokenizer.json'} ({exc}); check the model folder.") from None
        config = read_json(folder / "tokenizer_config.json")
        return cls(fast, config, _chat_template(folder, config), eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._fast.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_parts(self, parts: Sequence[str], add_special_tokens: bool = True) -> list[int]:
        """Ids of a text already split at its special tokens: parts alternate plain text and a run
        of special tokens (text, tokens, text, ...), as `re.split` with one group returns them.

        Special-token strings inside a text part stay text. The pieces are joined and
        post-processed as `encode` joins the segments it splits at special tokens itself, so a
        text whose text parts hold no special-token string gets exactly `encode`'s ids.
        """
        pieces = [self._encode_piece(part, is_text=i % 2 == 0) for i, part in enumerate(parts) if part]
        merged = Encoding.merge(pieces, growing_offsets=True)
        return self._fast.post_process(merged, add_special_tokens=add_special_tokens).ids

    def _encode_piece(self, part: str, is_text: bool) -> Encoding:
        special = is_text and self.special_token_pattern.search(part) is not None
        fast = self._text_reader() if special else self._fast
        return fast.encode(part, add_special_tokens=False)

    def _text_reader(self) -> FastTokenizer:
        """A copy of the tokenizer with `encode_special_tokens` on: only text that holds a
        special-token string needs it, so it is built (a second copy of the vocabulary) the first
        time such text comes; a copy, because flipping the flag on the shared one would race."""
        with self._as_text_lock:
            if self._as_text is None:
                reader = FastTokenizer.from_str(self._fast.to_str())
                reader.encode_special_tokens = True
                self._as_text = reader
            return self._as_text

    def to_json(self) -> str:
        """tokenizer.json as the tokenizers library holds it, the special tokens added since included."""
        return self._fast.to_str()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._fast.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._fast.token_to_id(tokens)
        return [self._fast.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._fast.id_to_token(i) for i in ids]

    def add_special_tokens(self, tokens: Sequence[str]) -> None:
        self._fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        with self._as_text_lock:
            self._special, self._as_text = None, None

    @property
    def added_special_tokens(self) -> dict[str, int]:
        """Every added token flagged special, string -> id: the strings `encode` turns into control
        tokens wherever they occur in a text (added tokens not flagged special stay matched too,
        in `encode_parts` as well, as transformers does)."""
        return self._special_tokens()[0]

    @property
    def special_token_pattern(self) -> re.Pattern[str]:
        """One special-token string, matched as `encode` matches them."""
        return self._special_tokens()[1]

    def _special_tokens(self) -> tuple[dict[str, int], re.Pattern[str]]:
        if self._special is None:
            added = self._fast.get_added_tokens_decoder()
            tokens = {token.content: i for i, token in added.items() if token.special}
            self._special = tokens, one_of(list(tokens))
        return self._special

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Every named special token of tokenizer_config.json ("bos_token": "<bos>", ...)."""
        return {k: v for k, v in self.config.items() if k.endswith("_token") and isinstance(v, str)}

    @property
    def all_special_ids(self) -> list[int]:
        names = [
            *self.special_tokens_map.values(),
            *self.config.get("extra_special_tokens", []),
            *self.config.get("additional_special_tokens", []),
        ]
        ids = (self._fast.token_to_id(n) for n in names if isinstance(n, str))
        return sorted({i for i in ids if i is not None})

    def _id(self, name: str) -> int | None:
        token = self.config.get(name)
        return self._fast.token_to_id(token) if isinstance(token, str) else None

    @property
    def bos_token(self) -> str | None:
        return self.config.get("bos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id("unk_token")

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Tokens in one at a time, text out in segments that never end inside a multi-byte character.

    The same contract as mlx-lm's streaming detokenizers (reset, add_token, finalize, last_segment):
    the tokens since the last emitted text are decoded together, and held back while they end in
    an incomplete byte sequence. Gemma's decoder strips no spaces, so segments concatenate exactly.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.text, self.tokens, self._pending, self._segment = "", [], [], ""

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        self._pending.append(token)
        self._flush(final=False)

    def finalize(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        if not self._pending:
            return
        text = self._tokenizer.decode(self._pending)
        if text.endswith(REPLACEMENT) and not final:
            return
        self._pending = []
        self.text += text
        self._segment += text

    @property
    def last_segment(self) -> str:
        """The text completed since the last call."""
        segment, self._segment = self._segment, ""
        return segment


def one_of(strings: Sequence[str]) -> re.Pattern[str]:
    """Any one of `strings`, the longest where several start at the same place (as the
    tokenizers library matches added tokens: leftmost, then longest); none matches nothing."""
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)) or "(?!)")


def _chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja, else chat_template.json's or tokenizer_config.json's entry (the
    "default" one where several are named), as transformers looks for it."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = read_json(folder / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def read_json(path: Path) -> dict:
    """The JSON object in `path`; {} when the folder has no such file."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Could not read {path} ({exc}); fix or remove the file.") from None
    return data if isinstance(data, dict) else {}
