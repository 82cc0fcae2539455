"""The transformers-free tokenizer equals transformers' on the real Gemma 4 tokenizer, streams text
without cutting characters, and starting the package or generating never imports transformers or torch."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from mlx_gemma4u.processing.text import load_tokenizer

TEXTS = [
    "Hello world",
    "  two  spaces, a tab\tand\n\nnew lines\n",
    "<bos><|turn>user\nDescribe <|image|> and <|audio|> and <|video|><turn|>\n<|turn>model\n",
    "Unicode: café, naïve, 日本語のテキスト, русский, עברית, emoji 🦙🚀👩‍👩‍👧",
    "code:\n    def f(x):\n        return x ** 2  # squared\n",
    '<|channel>thought<channel|><|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>',
    "ᚠᛇᚻ᛫ᛒᛦᚦ ⠊⠀⠉⠁⠝ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width",
    "",
]


@pytest.fixture(scope="module", params=["real", "demo"])
def pair(request, hf_tokenizer_dir, demo_home):
    folder = hf_tokenizer_dir if request.param == "real" else demo_home / "demo-v1"
    return load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("text", TEXTS)
def test_encodings_equal_transformers(pair, text):
    ours, theirs = pair
    for special in (True, False):
        assert ours.encode(text, add_special_tokens=special) == theirs.encode(text, add_special_tokens=special)
    ids = theirs.encode(text)
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_special_tokens_and_template_equal_transformers(pair):
    ours, theirs = pair
    assert ours.all_special_ids == sorted(theirs.all_special_ids)
    assert (ours.bos_token, ours.bos_token_id, ours.pad_token_id, ours.unk_token_id) == (
        theirs.bos_token,
        theirs.bos_token_id,
        theirs.pad_token_id,
        theirs.unk_token_id,
    )
    assert ours.padding_side == theirs.padding_side
    assert ours.chat_template == theirs.chat_template
    tokens = ["<|image|>", "<|video|>", "<turn|>", "<|channel>"]
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.convert_ids_to_tokens([2, 106, 258880]) == theirs.convert_ids_to_tokens([2, 106, 258880])


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_never_cuts_a_character(pair, text):
    ours, _ = pair
    ids = ours.encode(text, add_special_tokens=False)
    detokenizer = ours.detokenizer
    segments = []
    for token in ids:
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    assert all("\ufffd" not in s for s in segments)
    assert "".join(segments) == ours.decode(ids) == detokenizer.text
    if "🦙" in text:  # the emoji are byte-fallback tokens: some steps must have held text back
        assert sum(1 for s in segments if not s) > 0


def _fresh_python(code: str) -> dict:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


MODULES = "import json, sys; print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers')}))"


def test_import_pays_for_neither_transformers_nor_torch():
    assert _fresh_python(f"import mlx_gemma4u; {MODULES}") == {"torch": False, "transformers": False}


def test_generation_never_imports_torch(demo_home):
    code = (
        f"import os; os.environ['MLX_GEMMA4U_HOME'] = {str(demo_home)!r}\n"
        "import mlx_gemma4u\nmodel, processor = mlx_gemma4u.load('demo')\n"
        "mlx_gemma4u.generate(model, processor, [{'role': 'user', 'content': 'Hi'}], max_tokens=3)\n" + MODULES
    )
    assert _fresh_python(code) == {"torch": False, "transformers": False}


def test_mlx_lm_still_imports_as_usual_after_us():
    code = (
        "import mlx_gemma4u.generation.api, mlx_lm, json\n"
        "from mlx_lm import load\nimport mlx_lm.models.cache as cache\n"
        "print(json.dumps({'load': callable(load), 'cache': mlx_lm.models.cache is cache, "
        "'version': bool(mlx_lm.__version__)}))"
    )
    assert _fresh_python(code) == {"load": True, "cache": True, "version": True}
