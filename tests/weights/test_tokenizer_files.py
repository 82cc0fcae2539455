"""The demo's tokenizer folder, built without transformers, against transformers' own conversion.

`hf_tokenizer_dir` (conftest) is the reference: make_tokenizer.py run through transformers'
converter. Ours is built once per module in a subprocess, which also reports whether the build
imported transformers or torch.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import bare_package
import pytest
from tokenizers import Tokenizer

from mlx_gemma4u.errors import CheckpointError
from mlx_gemma4u.weights.tokenizer_files import write_tokenizer_files

REPO = Path(__file__).resolve().parents[2]
SPECIAL_IDS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<|turn>": 105,
    "<turn|>": 106,
    "<|image|>": 258880,
    "<|audio|>": 258881,
    "<|video|>": 258884,
    "<|image>": 255999,
    "<image|>": 258882,
    "<|audio>": 256000,
    "<audio|>": 258883,
}

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces\tand\ttabs\n\nnew paragraphs   trailing  ",
    "\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\nend\t\t\t\t\t\t\t\t\t",
    "Grüße aus Köln — naïve café; 東京の天気は？ Здравствуй, мир! مرحبا 안녕하세요",
    "emoji 🐈‍⬛ 👋🏽 🇫🇷 👨‍👩‍👧‍👦 ✨ and rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b\u00a0\ufeff",
    "digits 0 1 12 123 1234 3.14159 1,000,000 -42 1e-9 0x1F 2024-06-01",
    "def f(x):\n    return {'k': [1, 2, 3]}  # code\n\n\tif x != y: print(f\"{x!r}\")\r\n",
    "a<unused5>b [multimodal] <table><tr>x</tr></table> <unused6227><mask>",
    "Hello <|image|> world\n\n<|audio|> <|video|> <unused2968>",
    "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n"
    'x<channel|>ok<|tool><tool|><|tool_call>call:f{a:<|"|>s<|"|>}<tool_call|>'
    "<|tool_response><tool_response|><|image><image|><|audio><audio|><eos><pad><unk>",
    "",
    " ",
    "\x00\x01 control \x7f bytes \ud7ff",
]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> dict:
    """Build our folder in a fresh interpreter; return its path and the heavy modules it imported."""
    out = tmp_path_factory.mktemp("ours")
    code = bare_package.PRELUDE + (
        "import json; from pathlib import Path\n"
        "from mlx_gemma4u.weights.tokenizer_files import write_tokenizer_files\n"
        f"write_tokenizer_files(Path({str(out)!r}))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch'))))\n"
    )
    # `-c` puts the working directory, the repository, on sys.path.
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    return {"dir": out, "heavy_modules": json.loads(done.stdout.splitlines()[-1])}


@pytest.fixture(scope="module")
def ours_dir(build) -> Path:
    return build["dir"]


@pytest.fixture(scope="module")
def ours(ours_dir) -> Tokenizer:
    return Tokenizer.from_file(str(ours_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def ref(hf_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_file(str(hf_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def wrapper(ours_dir):
    """Our folder as mlx-lm loads it (AutoTokenizer inside a TokenizerWrapper)."""
    from mlx_lm.tokenizer_utils import load

    return load(ours_dir)


def test_build_imports_neither_transformers_nor_torch(build):
    assert build["heavy_modules"] == []


def test_writes_only_the_three_files(ours_dir):
    names = sorted(p.name for p in ours_dir.iterdir())
    assert names == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]


def test_tokenizer_json_equals_the_reference(ours_dir, hf_tokenizer_dir):
    ours_json = json.loads((ours_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ref_json = json.loads((hf_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert ours_json["model"]["merges"] == ref_json["model"]["merges"]
    assert ours_json == ref_json


def test_tokenizer_config_is_the_reference_plus_explicit_no_bos(ours_dir, hf_tokenizer_dir):
    config = json.loads((ours_dir / "tokenizer_config.json").read_text())
    ref_config = json.loads((hf_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config == {**ref_config, "add_bos_token": False}


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_and_round_trip(ours, ref, wrapper, text):
    ids = ours.encode(text, add_special_tokens=False).ids
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert wrapper.encode(text, add_special_tokens=False) == ids
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ref.decode(ids, skip_special_tokens=False) == text


def test_same_ids_on_project_documents(ours, ref, fixtures_dir):
    docs = [
        fixtures_dir.parent / "reference" / "SPEC.md",
        fixtures_dir.parent / "ARCHITECTURE.md",
        fixtures_dir / "README.md",
        *REPO.glob("README*"),
    ]
    texts = [p.read_text(encoding="utf-8") for p in docs]
    ours_ids = [e.ids for e in ours.encode_batch(texts, add_special_tokens=False)]
    assert ours_ids == [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
    assert sum(map(len, ours_ids)) > 10_000
    assert ours.decode_batch(ours_ids, skip_special_tokens=False) == texts


def test_same_added_tokens_and_vocab_size(ours, ref):
    def added(tok: Tokenizer) -> list[tuple[int, str, bool]]:
        return [(i, t.content, t.special) for i, t in sorted(tok.get_added_tokens_decoder().items())]

    assert added(ours) == added(ref)
    assert sum(special for *_, special in added(ours)) == 24
    assert ours.get_vocab_size() == ref.get_vocab_size() == 262144


def test_special_ids(ours, wrapper):
    for token, i in SPECIAL_IDS.items():
        assert ours.token_to_id(token) == i == wrapper.convert_tokens_to_ids(token), token
        assert ours.id_to_token(i) == token
    assert (wrapper.pad_token_id, wrapper.eos_token_id, wrapper.bos_token_id) == (0, 1, 2)
    assert (wrapper.image_token_id, wrapper.audio_token_id) == (258880, 258881)
    assert wrapper.convert_tokens_to_ids(wrapper.video_token) == 258884
    assert wrapper.encode("Hi") == wrapper.encode("Hi", add_special_tokens=False)  # no <bos> added
    assert wrapper.padding_side == "left" and wrapper.model_max_length == 131072


def test_chat_goldens_through_mlx_lm(wrapper, fixtures_dir):
    """mlx-lm turns thinking on unless told otherwise, so cases without it pass it off explicitly."""
    golden = fixtures_dir / "golden"
    cases = json.loads((golden / "chat_cases.json").read_text())
    assert len(cases) == 5
    for name, case in cases.items():
        kwargs = {"enable_thinking": False, **case["kwargs"]}
        rendered = wrapper.apply_chat_template(case["messages"], tokenize=False, **kwargs)
        assert rendered == (golden / "chat" / f"{name}.txt").read_text(encoding="utf-8"), name


def test_mlx_lm_enables_thinking_by_default(wrapper):
    rendered = wrapper.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert rendered == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n"


def test_chat_template_strips_thought_and_trims(wrapper):
    messages = [
        {"role": "developer", "content": "  Be brief.\n"},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "<|channel>thought\nhmm<channel|> Hello. "},
    ]
    rendered = wrapper.apply_chat_template(messages, tokenize=False, enable_thinking=True)
    assert rendered == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n"
    )


def test_reference_self_check_passes_on_ours(ours_dir, fixtures_dir):
    """make_tokenizer.py's own contract (sentencepiece parity, transformers loading, chat ids)."""
    spec = importlib.util.spec_from_file_location("make_tokenizer", fixtures_dir / "make_tokenizer.py")
    make_tokenizer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tokenizer)
    make_tokenizer.check(str(ours_dir))


def test_missing_model_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="missing.model"):
        write_tokenizer_files(tmp_path / "out", tmp_path / "missing.model")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"\xff\xff not a protobuf", b""])
def test_unreadable_or_foreign_model_raises_checkpoint_error(tmp_path, content):
    bad = tmp_path / "bad.model"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.model"):
        write_tokenizer_files(tmp_path / "out", bad)
