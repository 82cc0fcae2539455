"""Atomic writes: a failure, or a kill -9 in the middle of a write, leaves the old file or folder."""

import pytest

from killing import kill_mid_write
from mlx_gemma4u.files import replacing_folder, write_text


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
# disk is installed by the child itself), and is killed there with SIGKILL.
STALL = """
import sys, time
import mlx.core as mx
def stalled_save(path, arrays, metadata=None):
    with open(path, "wb") as f:
        f.write(b"half a file")
    print("writing", flush=True)
    time.sleep(60)
mx.save_safetensors = stalled_save
"""

WRITERS = {
    "prompt cache": (
        "from mlx_gemma4u.generate import PromptCache\n"
        "from mlx_gemma4u.loading import load_model\n"
        "model = load_model(__import__('pathlib').Path(sys.argv[2]))\n"
        "PromptCache(model).save(sys.argv[1])\n",
        "file",
    ),
    "demo checkpoint": (
        "from mlx_gemma4u.demo import ensure_demo\n"
        "ensure_demo(__import__('pathlib').Path(sys.argv[1]))\n",
        "folder",
    ),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_kill_9_mid_write_leaves_the_previous_version(writer, tmp_path, hf_checkpoints):
    code, kind = WRITERS[writer]
    target = tmp_path / ("out.safetensors" if kind == "file" else "demo")
    if kind == "file":
        target.write_bytes(b"previous")
    else:
        target.mkdir()
        (target / "marker").write_text("previous")  # no config.json: ensure_demo rewrites it
    kill_mid_write(STALL + code, str(target), str(hf_checkpoints["full"][1]))
    if kind == "file":
        assert target.read_bytes() == b"previous"
    else:
        assert [p.name for p in target.iterdir()] == ["marker"]
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert all(name.startswith(".") and ".partial" in name for name in leftovers)
