"""One model across processes (mx.distributed, started by `mlx.launch`): each rank builds its part
(models/parallel.py) and reads only the weights of that part, from only the files that hold them.

    model, processor = sharded_load(path, pipeline_group=mx.distributed.init())

mlx-lm's `sharded_load` semantics: a pipeline group splits the decoder layers into stages, a
tensor group splits every layer's heads and MLP; with neither, the whole world is one pipeline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma4u.models import layouts as checkpoints
from mlx_gemma4u.models.config import ModelConfig
from mlx_gemma4u.models.model import Model
from mlx_gemma4u.weights.loading import load_processor, read_weights, resolve, set_weights, weight_files

INDEX = "model.safetensors.index.json"


def sharded_load(
    path_or_repo: str | os.PathLike,
    pipeline_group=None,
    tensor_group=None,
    vision_mask: str = "gemma4",
    dtype: str | None = None,
    check_memory: bool = True,
):
    """This rank's part of a checkpoint -> (model, processor); every rank calls it with the same
    arguments. The model then runs as the whole one does, each call a collective of its group.
    vision_mask, dtype, check_memory: as `load`'s (the memory check counts this rank's files)."""
    path = resolve(path_or_repo)
    model = sharded_load_model(path, pipeline_group, tensor_group, vision_mask, dtype, check_memory)
    return model, load_processor(path)


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
