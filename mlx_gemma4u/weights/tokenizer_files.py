"""Build a Hugging Face tokenizer folder from Google's Gemma 4 SentencePiece model.

The demo checkpoint must work on a fresh machine without a download, so its tokenizer is made at
demo-creation time from the bundled `assets/tokenizer_gemma4.model`, without transformers or torch.

What flows: the .model protobuf (pieces, scores, types) -> a BPE vocabulary plus the merges that
reproduce SentencePiece's encodings -> a `tokenizers.Tokenizer` with Gemma's normalizer,
pre-tokenizer and decoder -> tokenizer.json. Next to it go tokenizer_config.json (the special-token
attributes transformers, mlx-lm and the processor read) and chat_template.jinja.

The result matches what transformers' Gemma 4 converter writes (see the fixtures' make_tokenizer.py),
with one deliberate change it shares: piece 258884, the placeholder "<unused2968>" in the .model, is
renamed "<|video|>" because the Gemma 4 configs use 258884 as video_token_id.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing

from mlx_gemma4u.errors import CheckpointError
from mlx_gemma4u.files import write_text

BUNDLED_SPM_MODEL = Path(__file__).resolve().parents[1] / "assets" / "tokenizer_gemma4.model"
VOCAB_SIZE = 262_144
VIDEO_ID, VIDEO_PLACEHOLDER, VIDEO_TOKEN = 258_884, "<unused2968>", "<|video|>"
SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# The base special tokens, by the attribute name transformers gives them.
BASE_SPECIAL = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}

# Gemma 4's control tokens, by the attribute names of transformers' Gemma 4 conversion (+ video).
EXTRA_SPECIAL = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "video_token": VIDEO_TOKEN,
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}

# Ids the model was trained with; a .model that disagrees is not a Gemma 4 vocabulary.
EXPECTED_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<|turn>": 105,
    "<turn|>": 106,
    "<|image>": 255_999,
    "<|audio>": 256_000,
    "<|image|>": 258_880,
    "<|audio|>": 258_881,
    "<image|>": 258_882,
    "<audio|>": 258_883,
}

# Gemma 4 chat format: <bos>, a system turn when there is a system/developer message or
# enable_thinking, then one "<|turn>ROLE\n...<turn|>\n" per message with assistant shown as model.
# Text is trimmed, media items become their placeholder, and a model turn keeps only the answer
# after its thought channel. Tools are not rendered.
CHAT_TEMPLATE = """\
{%- macro render_text(text, is_model) -%}
  {%- if is_model -%}{%- set text = text.split('<channel|>') | last -%}{%- endif -%}
  {{- text | trim -}}
{%- endmacro -%}
{%- macro render_content(content, is_model) -%}
  {%- if content is string -%}
    {{- render_text(content, is_model) -}}
  {%- elif content is iterable -%}
    {%- for item in content -%}
      {%- if item.type == 'text' -%}
        {{- render_text(item.text, is_model) -}}
      {%- elif item.type in ('image', 'audio', 'video') -%}
        {{- '<|' ~ item.type ~ '|>' -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- set thinking = enable_thinking | default(false) -%}
{%- set has_system = messages | length > 0 and messages[0].role in ('system', 'developer') -%}
{{- bos_token -}}
{%- if thinking or has_system -%}
  {{- '<|turn>system\\n' -}}
  {%- if thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}
  {%- if has_system -%}{{- render_content(messages[0].content, false) -}}{%- endif -%}
  {{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in messages[1 if has_system else 0:] -%}
  {%- set role = 'model' if message.role == 'assistant' else message.role -%}
  {{- '<|turn>' ~ role ~ '\\n' ~ render_content(message.content, role == 'model') ~ '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}
"""


def write_tokenizer_files(out_dir: Path, spm_model: Path = BUNDLED_SPM_MODEL) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into `out_dir`.

    Each file is written to a temporary name in `out_dir` and renamed into place, so a crash never
    leaves a half-written file. Raises CheckpointError if `spm_model` is missing, unreadable or not
    a Gemma 4 vocabulary.
    """
    pieces, scores, user_defined = _read_spm(Path(spm_model))
    tokenizer = _build_tokenizer(pieces, scores, user_defined)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "tokenizer.json", tokenizer.to_str(pretty=False))
    write_text(out_dir / "tokenizer_config.json", json.dumps(_tokenizer_config(), indent=2) + "\n")
    write_text(out_dir / "chat_template.jinja", CHAT_TEMPLATE)


def _read_spm(path: Path) -> tuple[list[str], list[float], list[str]]:
    """Parse the .model protobuf into pieces (id order, video renamed), scores and USER_DEFINED pieces."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (OSError, DecodeError) as exc:
        raise CheckpointError(
            f"Cannot read the SentencePiece model {path}: {exc}. "
            "Reinstall mlx-gemma4u or pass a valid Gemma 4 tokenizer .model file."
        ) from exc
    pieces = [p.piece for p in proto.pieces]
    _check_vocabulary(path, pieces, proto.trainer_spec.model_type == spm_pb2.TrainerSpec.BPE)
    pieces[VIDEO_ID] = VIDEO_TOKEN
    user_type = spm_pb2.ModelProto.SentencePiece.USER_DEFINED
    user_defined = [pieces[i] for i, p in enumerate(proto.pieces) if p.type == user_type]
    return pieces, [p.score for p in proto.pieces], user_defined


def _check_vocabulary(path: Path, pieces: list[str], is_bpe: bool) -> None:
    """Refuse a .model that is not Gemma 4's BPE vocabulary, since the ids here are baked in."""
    problem = _vocabulary_problem(pieces, is_bpe)
    if problem:
        raise CheckpointError(f"{path} is not the Gemma 4 SentencePiece model: {problem}.")


def _vocabulary_problem(pieces: list[str], is_bpe: bool) -> str | None:
    """Say what makes `pieces` differ from the Gemma 4 vocabulary, or None when they match."""
    if not is_bpe or len(pieces) != VOCAB_SIZE:
        return f"expected a BPE model with {VOCAB_SIZE} pieces, got {len(pieces)} pieces"
    if pieces[VIDEO_ID] != VIDEO_PLACEHOLDER:
        return f"piece {VIDEO_ID} is {pieces[VIDEO_ID]!r}, expected {VIDEO_PLACEHOLDER!r}"
    wrong = {token: i for token, i in EXPECTED_IDS.items() if pieces[i] != token}
    return f"control tokens not at their Gemma 4 ids: {wrong}" if wrong else None


def _bpe_merges(pieces: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Derive BPE merges that make `tokenizers` reproduce SentencePiece's BPE encodings.

    Every split of a piece into two pieces that are both in the vocabulary is a merge. Merges rank
    by the merged piece's score (higher first), then by the longer left part, then the longer right
    part; ties keep piece-id order, then the ids of the two parts. This is the order transformers'
    converter produces, so the encodings agree with its tokenizer.json.
    """
    ids = {piece: i for i, piece in enumerate(pieces)}
    ranked = []
    for merged_id, piece in enumerate(pieces):
        negative_score = -scores[merged_id]
        for cut in range(1, len(piece)):
            left_id, right_id = ids.get(piece[:cut]), ids.get(piece[cut:])
            if left_id is not None and right_id is not None:
                rank = (negative_score, -cut, cut - len(piece), merged_id, left_id, right_id)
                ranked.append(rank)
    ranked.sort()
    return [(pieces[left], pieces[right]) for *_, left, right in ranked]


def _build_tokenizer(pieces: list[str], scores: list[float], user_defined: list[str]) -> Tokenizer:
    """Assemble the `tokenizers` pipeline Gemma uses: "▁" for spaces, BPE with byte fallback."""
    model = BPE(
        vocab={piece: i for i, piece in enumerate(pieces)},
        merges=_bpe_merges(pieces, scores),
        unk_token=BASE_SPECIAL["unk_token"],
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.post_processor = TemplateProcessing(single="$A", pair="$A $B:1")  # no <bos> added
    special = [*BASE_SPECIAL.values(), *EXTRA_SPECIAL.values()]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    # SentencePiece keeps USER_DEFINED pieces (<unusedN>, <table>, "\n" runs...) whole; listing them
    # as non-special added tokens does the same here while still decoding them as text.
    plain = [t for t in user_defined if t not in special]
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return tokenizer


def _tokenizer_config() -> dict:
    """The tokenizer_config.json that transformers' GemmaTokenizer and mlx-lm load."""
    return {
        "add_bos_token": False,  # the chat template writes <bos> itself
        "backend": "tokenizers",
        **BASE_SPECIAL,
        **EXTRA_SPECIAL,
        "extra_special_tokens": [],
        "model_max_length": 131072,
        "padding_side": "left",
        "tokenizer_class": "GemmaTokenizer",
    }
