"""One model across processes (mx.distributed, started by `mlx.launch`): each rank builds its part
(models/parallel.py) and reads only the weights of that part, from only the files that hold them.

    model, processor = sharded_load(path, pipeline_group=mx.distributed.init())

mlx-lm's `sharded_load` semantics: a pipeline group splits the decoder layers into stages, a
tensor group splits every layer's heads and MLP; with neither, the whole world is one pipeline.

Loading ends with the group's first collective, time-bound (`agree`): each process says whether it
loaded its part, and which checkpoint (a hash of config.json and the tensor names). A process that
failed, one that loaded another checkpoint, or one that does not answer in time is reported on
every process as one GroupError, instead of the others hanging in their first step.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_gemma4u.errors import Gemma4UError, GroupError
from mlx_gemma4u.models import layouts as checkpoints
from mlx_gemma4u.models.config import ModelConfig
from mlx_gemma4u.models.model import Model
from mlx_gemma4u.weights.loading import load_processor, read_weights, resolve, set_weights, weight_files

INDEX = "model.safetensors.index.json"
AGREE_SECONDS = 600.0  # how long a process that has loaded its part waits for the others
MESSAGE_BYTES = 480  # of a process's reason for failing, as the others hear it


def sharded_load(
    path_or_repo: str | os.PathLike,
    pipeline_group=None,
    tensor_group=None,
    vision_mask: str = "gemma4",
    dtype: str | None = None,
    check_memory: bool = True,
    timeout: float = AGREE_SECONDS,
):
    """This rank's part of a checkpoint -> (model, processor); every rank calls it with the same
    arguments. The model then runs as the whole one does, each call a collective of its group.
    vision_mask, dtype, check_memory: as `load`'s (the memory check counts this rank's files).
    timeout: seconds to wait, once loaded, for the other processes to have loaded theirs (a
    download is not counted: every process has its files before any loads)."""
    if pipeline_group is None and tensor_group is None:
        pipeline_group = mx.distributed.init()
    group = pipeline_group if pipeline_group is not None else tensor_group
    loaded, failure, mark = None, None, b""
    try:
        path = resolve(path_or_repo)
    except Exception as error:  # told to every process below, then raised there
        failure = error
    _all_sum(np.zeros(1, np.uint8), group)  # untimed: a download takes as long as it takes
    try:
        if failure is None:
            model = sharded_load_model(path, pipeline_group, tensor_group, vision_mask, dtype, check_memory)
            loaded, mark = (model, load_processor(path)), fingerprint(path)
    except Exception as error:
        failure = error
    agree(group, mark, failure, timeout)
    return loaded


def fingerprint(path: Path) -> bytes:
    """What every process of a group must have loaded the same: config.json and the tensor names."""
    names, _ = _stored_names(path)
    return hashlib.sha256((path / "config.json").read_bytes() + "\n".join(sorted(names)).encode()).digest()


def agree(group, mark: bytes, failure: BaseException | None, timeout: float) -> None:
    """The group's first collective: every process's fingerprint `mark` (or its `failure`) to every
    process, within `timeout` seconds -> None if all loaded the same checkpoint, else GroupError."""
    rank, size, slot = group.rank(), group.size(), 1 + 32 + MESSAGE_BYTES
    mine = np.zeros(size * slot, np.uint8)
    said = _reason(failure).encode()[:MESSAGE_BYTES] if failure is not None else mark
    mine[rank * slot] = 2 if failure is not None else 1
    mine[rank * slot + 1 : rank * slot + 1 + len(said)] = np.frombuffer(said, np.uint8)
    heard = {}
    worker = threading.Thread(target=lambda: heard.update(all=_all_sum(mine, group)), daemon=True)
    worker.start()
    worker.join(timeout)
    if "all" not in heard:
        raise GroupError(f"Another process of the group did not finish loading within {timeout:g} s; see its output.")
    slots = heard["all"].reshape(size, slot)
    for r in range(size):
        if slots[r, 0] == 2:
            reason = slots[r, 1:].tobytes().rstrip(b"\0").decode(errors="replace")
            raise GroupError(f"Process {r} of {size} could not load its part of the model: {reason}", rank == 0)
    for r in range(1, size):
        if slots[r, 1:33].tobytes() != slots[0, 1:33].tobytes():
            raise GroupError(
                f"Process {r} of {size} loaded another checkpoint than process 0 (config.json or the tensor names "
                "differ); give every process the same model.",
                rank == 0,
            )


def _all_sum(values: np.ndarray, group) -> np.ndarray:
    return np.array(mx.distributed.all_sum(mx.array(values), group=group))


def _reason(error: BaseException) -> str:
    return str(error) if isinstance(error, Gemma4UError) else f"{type(error).__name__}: {error}"


def sharded_load_model(
    path: Path,
    pipeline_group=None,
    tensor_group=None,
    vision_mask: str = "gemma4",
    dtype: str | None = None,
    check_memory: bool = True,
) -> Model:
    """The model part of `sharded_load`, from a local folder."""
    if pipeline_group is None and tensor_group is None:
        pipeline_group = mx.distributed.init()
    names, file_of = _stored_names(path)
    layout = checkpoints.detect(names)
    config = checkpoints.without_absent_media(ModelConfig.from_file(path / "config.json"), names, layout)
    model = Model(config, vision_mask=vision_mask)
    if pipeline_group is not None:
        model.pipeline(pipeline_group)
    own = {name for name, _ in tree_flatten(model.parameters())}
    wanted = {k for k in names if _belongs(layout.ours(k), own)}
    files = sorted({file_of[k] for k in wanted}) if file_of else None
    weights = read_weights(path, dtype, check_memory, files)
    set_weights(model, {k: v for k, v in weights.items() if k in wanted}, layout, config.quantization, dtype)
    if tensor_group is not None:
        model.shard(tensor_group)
    for layer in model.language_model.layers:  # layer by layer: a whole tensor is read before it is cut
        if layer is not None:
            mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model


def _belongs(name: str | None, own: set[str]) -> bool:
    """Whether the tensor `name` (ours) is one of `own`, the parameters of the model as built for
    this rank, or the quantization scales or biases of one of its layers."""
    if name is None:
        return False
    module, _, leaf = name.rpartition(".")
    return name in own or (leaf in ("scales", "biases") and f"{module}.weight" in own)


def _stored_names(path: Path) -> tuple[list[str], dict[str, Path]]:
    """The checkpoint's tensor names, and the file of each when an index says (else {}: one file,
    or files without an index, whose headers alone are read)."""
    files = weight_files(path)  # an index is checked here
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        return list(weight_map), {k: path / f for k, f in weight_map.items()}
    names = []
    for f in files:
        names.extend(mx.load(str(f)))
    return names, {}
