"""Shared fixtures: paths to ../shared, the tiny checkpoints and the demo, built once per session.

The tests are grouped by the part of the data flow they check (processing/, models/, weights/,
generation/, apps/, project/); the helpers they share live in support/, importable by name.
"""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"the shared fixtures are not at {FIXTURES}")
    return FIXTURES


@pytest.fixture(scope="session")
def hf_tokenizer_dir(fixtures_dir, tmp_path_factory) -> Path:
    """The real Gemma 4 tokenizer as transformers' own converter writes it (make_tokenizer.py)."""
    out = tmp_path_factory.mktemp("hf_tokenizer")
    subprocess.run(
        [sys.executable, str(fixtures_dir / "make_tokenizer.py"), str(out), "--no-check"],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Random tiny transformers checkpoints, built once: name -> (torch model, saved folder).

    Names are the text configs of tests/support/reference.py; "<name>-published" is the same checkpoint
    with config.json rewritten in the form Google publishes.
    """
    import reference

    built = {}
    for name, overrides in reference.TEXT_CONFIGS.items():
        model = reference.build(overrides, seed=1)
        root = tmp_path_factory.mktemp(name)
        built[name] = (model, reference.save(model, root / "saved"))
        built[f"{name}-published"] = (model, reference.save(model, root / "published", published_form=True))
    return built


@pytest.fixture(scope="session")
def golden_dir(fixtures_dir) -> Path:
    """transformers 5.23's own processor outputs for the shared media (see golden/make_goldens.py)."""
    return fixtures_dir / "golden"


@pytest.fixture(scope="session")
def golden_index(golden_dir) -> dict:
    import json

    return json.loads((golden_dir / "index.json").read_text())


@pytest.fixture(scope="session")
def processor(hf_tokenizer_dir):
    """The torch-free Gemma4UProcessor on the real Gemma 4 tokenizer folder."""
    from mlx_gemma4u.processing import Gemma4UProcessor

    return Gemma4UProcessor.from_pretrained(hf_tokenizer_dir)


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory) -> Path:
    """An MLX_GEMMA4U_HOME holding the built-in demo checkpoint, written once per session."""
    from mlx_gemma4u.weights.demo import ensure_demo

    home = tmp_path_factory.mktemp("home")
    ensure_demo(home / "demo-v1")
    return home


@pytest.fixture(scope="session")
def demo_pair(demo_home):
    """((target, processor), drafter): the demo checkpoint and load_draft_model("demo"), the demo
    drafter written into demo_home once."""
    from mlx_gemma4u.weights.loading import load, load_draft_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLX_GEMMA4U_HOME", str(demo_home))
        patch.chdir(demo_home)  # no folder named demo here
        drafter = load_draft_model("demo")
    return load(demo_home / "demo-v1"), drafter
