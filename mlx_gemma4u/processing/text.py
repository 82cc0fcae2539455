"""Text side of the processor: the tokenizer, multimodal token ids, placeholder expansion, type ids.

A prompt holds one placeholder per media item: `<|image|>`, `<|audio|>` or `<|video|>`. Each is
expanded, in order, to the block of soft tokens the model fills with that item's embeddings:
  image: <|image>  + <|image|> x n  + <image|>
  audio: <|audio>  + <|audio|> x n  + <audio|>
  video: per frame "MM:SS <|image>" + <|video|> x n + "<image|>", frames joined by one space
`mm_token_type_ids` marks image soft tokens 1, video 2, audio 3 and everything else 0.

Chat text is text: `TextEscapes` keeps special-token strings typed in chat messages out of the
control tokens (and out of the placeholders), so only the chat template makes those.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_gemma4u.errors import ConfigError, InputError
from mlx_gemma4u.processing.tokenizer import Tokenizer

GEMMA4_STOP_IDS = (1, 106, 50)  # <eos>, <turn|>, <|tool_response>
VIDEO_TOKEN = "<|video|>"

# config.json key -> default id in the real Gemma 4 vocabulary
_CONFIG_IDS = {
    "image_token_id": 258880,
    "audio_token_id": 258881,
    "video_token_id": 258884,
    "boi_token_id": 255999,
    "eoi_token_id": 258882,
    "boa_token_id": 256000,
    "eoa_token_index": 258883,
}
MM_TYPE_TEXT, MM_TYPE_IMAGE, MM_TYPE_VIDEO, MM_TYPE_AUDIO = 0, 1, 2, 3
# Supplementary Private Use Area-B: no template emits these code points, so a block of them can
# stand in for special-token strings while a template renders.
_PRIVATE_USE_FIRST, _PRIVATE_USE_LAST = 0x100000, 0x10FFFD
_PRIVATE_USE = re.compile("[\U00100000-\U0010fffd]")


@dataclass(frozen=True)
class MultimodalTokens:
    """Ids and strings of the placeholder and boundary tokens."""

    image_id: int
    audio_id: int
    video_id: int
    image: str
    audio: str
    video: str
    boi: str
    eoi: str
    boa: str
    eoa: str


@dataclass(frozen=True)
class TextEscapes:
    """Special-token strings typed in chat text, kept as text through the template and the tokenizer.

    Before rendering, `escape` replaces each special-token string in the messages' text by its
    sentinel, one private-use character per token from a block the messages do not use. The
    special tokens in the rendered prompt are then only the template's own: `parts` splits the
    prompt at them and puts the typed strings back into the text between, which
    `Tokenizer.encode_parts` encodes as plain text.
    """

    token: re.Pattern[str]  # one special-token string
    runs: re.Pattern[str]  # a run of them, as re.split's one group
    sentinels: dict[str, str]  # special-token string -> its sentinel
    typed: dict[int, str]  # sentinel code point -> special-token string, for str.translate

    @classmethod
    def build(cls, tokenizer: Tokenizer, text_in_use: str) -> TextEscapes:
        """Escapes for the tokenizer's special tokens, with sentinels that `text_in_use` (all the
        strings the template will see) holds nowhere, so putting them back is exact."""
        strings = list(tokenizer.added_special_tokens)
        first = _free_block(len(strings), {ord(c) for c in _PRIVATE_USE.findall(text_in_use)})
        sentinels = {string: chr(first + i) for i, string in enumerate(strings)}
        token = tokenizer.special_token_pattern
        runs = re.compile(f"((?:{token.pattern})+)")
        return cls(token, runs, sentinels, {ord(c): string for string, c in sentinels.items()})

    def escape(self, text: str) -> str:
        """`text` with each special-token string replaced by its sentinel."""
        return self.token.sub(lambda match: self.sentinels[match.group(0)], text)

    def found(self, prompt: str) -> list[str]:
        """The special tokens of a rendered prompt, in order (sentinels are not among them)."""
        return self.token.findall(prompt)

    def parts(self, prompt: str) -> list[str]:
        """The rendered prompt as `Tokenizer.encode_parts` takes it: text, a run of special
        tokens, text, ...; each text with the typed special-token strings back in place."""
        parts = self.runs.split(prompt)
        parts[0::2] = [part.translate(self.typed) for part in parts[0::2]]
        return parts


def _free_block(size: int, used: set[int]) -> int:
    """The first code point of `size` consecutive private-use ones of which none is in `used`."""
    first = _PRIVATE_USE_FIRST
    for point in sorted(used):
        if point >= first + size:
            break
        if point >= first:
            first = point + 1
    if first + size - 1 > _PRIVATE_USE_LAST:
        raise InputError(
            "The messages use too many private-use characters (U+100000 to U+10FFFD) "
            "to keep their text apart from special tokens."
        )
    return first


def load_tokenizer(model_dir: Path, eos_token_ids: Sequence[int] = GEMMA4_STOP_IDS) -> Tokenizer:
    """The checkpoint's tokenizer, with `<|video|>` registered as transformers does."""
    tokenizer = Tokenizer.from_folder(Path(model_dir), eos_token_ids)
    if tokenizer.convert_tokens_to_ids(VIDEO_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens([VIDEO_TOKEN])
    return tokenizer


def multimodal_tokens(tokenizer: Tokenizer, config: dict) -> MultimodalTokens:
    """Token ids from the parsed config.json (or Gemma 4's defaults) and their strings from the tokenizer."""
    ids = dict(_CONFIG_IDS)
    ids.update({key: config[key] for key in _CONFIG_IDS if isinstance(config.get(key), int)})
    video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    if video_id != ids["video_token_id"]:
        raise ConfigError(
            f"The tokenizer gives {VIDEO_TOKEN} id {video_id} but config.json says video_token_id="
            f"{ids['video_token_id']}; use the tokenizer that belongs to this checkpoint."
        )
    names = tokenizer.convert_ids_to_tokens(
        [
            ids[key]
            for key in (
                "image_token_id",
                "audio_token_id",
                "boi_token_id",
                "eoi_token_id",
                "boa_token_id",
                "eoa_token_index",
            )
        ]
    )
    return MultimodalTokens(
        ids["image_token_id"], ids["audio_token_id"], video_id, names[0], names[1], VIDEO_TOKEN, *names[2:]
    )


def image_block(tokens: MultimodalTokens, count: int) -> str:
    """The soft-token block that replaces one image placeholder."""
    return f"{tokens.boi}{tokens.image * count}{tokens.eoi}"


def audio_block(tokens: MultimodalTokens, count: int) -> str:
    """The soft-token block that replaces one audio placeholder."""
    return f"{tokens.boa}{tokens.audio * count}{tokens.eoa}"


def video_block(tokens: MultimodalTokens, tokens_per_frame: int, timestamps: Sequence[float]) -> str:
    """The text that replaces one video placeholder: an MM:SS-stamped image block per frame."""
    frame = f"{tokens.boi}{tokens.video * tokens_per_frame}{tokens.eoi}"
    return " ".join(f"{int(seconds // 60):02d}:{int(seconds % 60):02d} {frame}" for seconds in timestamps)


def expand_placeholders(
    texts: list[str],
    tokens: MultimodalTokens,
    images: Sequence[str] = (),
    videos: Sequence[str] = (),
    audios: Sequence[str] = (),
) -> list[str]:
    """Replace the placeholders of all prompts, in reading order, by the given blocks per modality.

    The number of placeholders of each kind must equal the number of blocks given for it. In a
    chat prompt a placeholder typed in message text is a sentinel by now (TextEscapes), so only
    the template's own ones, those of the messages' media items, count.
    """
    blocks = {tokens.image: list(images), tokens.video: list(videos), tokens.audio: list(audios)}
    for placeholder, items in blocks.items():
        found = sum(text.count(placeholder) for text in texts)
        if found != len(items):
            raise InputError(
                f"The prompt has {found} {placeholder} placeholder(s) but {len(items)} matching media item(s) "
                "were given; use one placeholder per item."
            )
    pattern = re.compile("|".join(re.escape(placeholder) for placeholder in blocks))
    queues = {placeholder: iter(items) for placeholder, items in blocks.items()}
    return [pattern.sub(lambda match: next(queues[match.group(0)]), text) for text in texts]


def encode_batch(
    tokenizer: Tokenizer, texts: list[str], add_special_tokens: bool = True, escapes: TextEscapes | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, both (batch, longest) int64, padded on the tokenizer's side.

    Without `escapes` a text is encoded verbatim, its special-token strings being those tokens;
    with them (a chat prompt) the sentinels' strings go back in as plain text.
    """
    encoded = [_encode(tokenizer, text, add_special_tokens, escapes) for text in texts]
    longest = max(len(ids) for ids in encoded)
    input_ids = np.full((len(encoded), longest), tokenizer.pad_token_id or 0, dtype=np.int64)
    attention_mask = np.zeros((len(encoded), longest), dtype=np.int64)
    for row, ids in enumerate(encoded):
        span = slice(longest - len(ids), longest) if tokenizer.padding_side == "left" else slice(0, len(ids))
        input_ids[row, span] = ids
        attention_mask[row, span] = 1
    return input_ids, attention_mask


def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool, escapes: TextEscapes | None) -> list[int]:
    if escapes is None:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return tokenizer.encode_parts(escapes.parts(text), add_special_tokens=add_special_tokens)


def mm_token_type_ids(input_ids: np.ndarray, tokens: MultimodalTokens) -> np.ndarray:
    """(batch, seq) int64: 1 image soft token, 2 video soft token, 3 audio soft token, else 0."""
    types = np.full(input_ids.shape, MM_TYPE_TEXT, dtype=np.int64)
    types[input_ids == tokens.image_id] = MM_TYPE_IMAGE
    types[input_ids == tokens.video_id] = MM_TYPE_VIDEO
    types[input_ids == tokens.audio_id] = MM_TYPE_AUDIO
    return types
