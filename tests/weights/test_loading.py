"""Loading checkpoints: sharded files, and one clear error for every broken one."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_gemma4u.errors import CheckpointError, ConfigError, DownloadError
from mlx_gemma4u.weights.loading import load_model, resolve


@pytest.fixture
def checkpoint(hf_checkpoints, tmp_path):
    """A private copy of the "full" checkpoint that a test may break."""
    out = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints["full"][1], out)
    return out


def logits(model, n=10):
    return np.array(model(mx.array([list(range(3, 3 + n))], dtype=mx.int32)))


def test_sharded_checkpoint_with_index_loads_the_same(checkpoint, tmp_path):
    whole = logits(load_model(checkpoint))
    tensors = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, checkpoint / file, metadata={"format": "pt"})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert np.array_equal(logits(load_model(checkpoint)), whole)


def rewrite(checkpoint, change):
    tensors = load_file(checkpoint / "model.safetensors")
    change(tensors)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})


def test_unknown_key_is_named(checkpoint):
    rewrite(checkpoint, lambda t: t.update({"model.language_model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"'language_model\.layers\.0\.extra\.weight'"):
        load_model(checkpoint)


def test_missing_key_is_named(checkpoint):
    rewrite(checkpoint, lambda t: t.pop("model.language_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks the weight 'language_model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(checkpoint)


def test_wrong_shape_is_named(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"'language_model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(128, 64\)"
    ):
        load_model(checkpoint)


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(ConfigError, match="needs a config.json"):
        load_model(checkpoint)


def test_unknown_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "gemma3"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="model_type 'gemma3' is not a Gemma 4 Unified model"):
        load_model(checkpoint)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_safetensors(checkpoint, cut):
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(checkpoint)


def test_overlapping_tensors(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    first, second = [k for k in header if k != "__metadata__"][:2]
    header[second]["data_offsets"] = [header[first]["data_offsets"][0], header[second]["data_offsets"][1]]
    blob = json.dumps(header).encode().ljust(n)
    path.write_bytes(data[:8] + blob + data[8 + n :])
    with pytest.raises(CheckpointError, match="overlap"):
        load_model(checkpoint)


def test_pickles_are_never_loaded(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(checkpoint)


def test_repo_id_offline_is_one_clear_sentence(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = "from mlx_gemma4u.weights.loading import resolve; resolve('nobody/no-such-model')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PATH": ""})
    assert "DownloadError" in run.stderr and "nobody/no-such-model" in run.stderr
    with pytest.raises(CheckpointError, match="not a model folder"):
        resolve(tmp_path / "missing" / "folder")
    assert issubclass(DownloadError, OSError)


def test_memory_guard_refuses_weights_larger_than_the_machine(checkpoint, monkeypatch):
    from mlx_gemma4u.errors import MemoryLimitError
    from mlx_gemma4u.weights import loading

    size = (checkpoint / "model.safetensors").stat().st_size
    monkeypatch.setattr(loading, "machine_memory", lambda: size)  # 90% of it is less than the weights
    with pytest.raises(MemoryLimitError, match=r"no-memory-check"):
        load_model(checkpoint)
    with pytest.raises(MemoryLimitError):  # float32 weights stay float32: same size
        load_model(checkpoint, dtype="float32")
    load_model(checkpoint, dtype="bfloat16")  # cast to bf16 they take half, which fits
    load_model(checkpoint, check_memory=False)


def test_tensor_size_that_disagrees_with_its_shape(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [10**12]
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n :])
    with pytest.raises(CheckpointError, match="claims shape"):
        load_model(checkpoint)
