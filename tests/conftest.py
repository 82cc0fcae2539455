"""Shared fixtures: paths to ../shared, and a Hugging Face tokenizer folder built once per session."""

import subprocess
import sys
from pathlib import Path

import pytest

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

    Names are the text configs of tests/reference.py; "<name>-published" is the same checkpoint
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
