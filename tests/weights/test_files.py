"""Atomic writes: a failure, or a kill -9 in the middle of a write, leaves the old file or folder."""

from pathlib import Path

import pytest
from killing import kill_mid_write

from mlx_gemma4u.files import replacing_folder, write_text

REPO = Path(__file__).resolve().parents[2]


def test_write_text_replaces_and_a_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "note.json"
    write_text(target, "old")
    write_text(target, "new")
    assert target.read_text() == "new"
    with pytest.raises(TypeError):
        write_text(target, None)
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["note.json"]


def test_replacing_folder_swaps_whole_folders_and_a_failure_keeps_the_old_one(tmp_path):
    target = tmp_path / "model"
    with replacing_folder(target) as staging:
        (staging / "a.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with replacing_folder(target) as staging:
            (staging / "a.txt").write_text("2")
            raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "1"
    with replacing_folder(target) as staging:
        (staging / "b.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# Each writer runs in a child process whose disk writes stall half-way (the stand-in for a slow
# disk is installed by the child itself), and is killed there with SIGKILL. The converter's own
# kill -9 test is in test_convert.py.
STALL_TENSORS = """
import sys, time
import mlx.core as mx
def stalled_save(path, arrays, metadata=None):
    with open(path, "wb") as f:
        f.write(b"half a file")
    print("writing", flush=True)
    time.sleep(60)
mx.save_safetensors = stalled_save
"""

STALL_TEXT = """
import sys, time, pathlib
def stalled_write_text(self, text, encoding=None, errors=None, newline=None):
    with open(self, "w") as f:
        f.write(text[: len(text) // 2])
    print("writing", flush=True)
    time.sleep(60)
pathlib.Path.write_text = stalled_write_text
"""

# name: (child script, the file or folder it replaces)
WRITERS = {
    "prompt cache": (
        STALL_TENSORS + "from mlx_gemma4u.generation.prompt_cache import PromptCache\n"
        "from mlx_gemma4u.weights.loading import load_model\n"
        "model = load_model(pathlib.Path(sys.argv[2]))\n"
        "PromptCache(model).save(sys.argv[1])\n",
        "cache.safetensors",
    ),
    "demo checkpoint": (
        STALL_TENSORS + "from mlx_gemma4u.weights.demo import ensure_demo\nensure_demo(pathlib.Path(sys.argv[1]))\n",
        "demo/",
    ),
    "saved chat": (
        STALL_TEXT + "from mlx_gemma4u.cli.chat_session import Conversation\n"
        "chat = Conversation(system='be brief', thinking=False)\n"
        "chat.add_user('hello')\n"
        "chat.save(sys.argv[1])\n",
        "chat.json",
    ),
    "tokenizer files": (
        STALL_TEXT + "from mlx_gemma4u.weights.tokenizer_files import write_tokenizer_files\n"
        "write_tokenizer_files(pathlib.Path(sys.argv[1]).parent)\n",
        "tokenizer.json",
    ),
    "benchmark report": (
        STALL_TEXT + "sys.path.insert(0, sys.argv[3])\n"
        "from benchmarks import compare\n"
        "compare.write_text(pathlib.Path(sys.argv[1]), '{\"results\": []}')\n",
        "report.json",
    ),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_kill_9_mid_write_leaves_the_previous_version(writer, tmp_path, hf_checkpoints):
    script, name = WRITERS[writer]
    target = tmp_path / name.rstrip("/")
    if name.endswith("/"):
        target.mkdir()
        (target / "marker").write_text("previous")  # no config.json: ensure_demo rewrites it
    else:
        target.write_bytes(b"previous")
    kill_mid_write("import pathlib\n" + script, str(target), str(hf_checkpoints["full"][1]), str(REPO))
    if target.is_dir():
        assert [p.name for p in target.iterdir()] == ["marker"]
    else:
        assert target.read_bytes() == b"previous"
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert leftovers and all(name.startswith(".") and ".partial" in name for name in leftovers)
