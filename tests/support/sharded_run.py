"""Launched by the distributed tests under `mlx.launch -n N --backend ring`: every rank loads its part
of a checkpoint (sharded_load) and runs the same prompts; rank 0 writes the logits, the greedy
replies, and each rank's decoder bytes and the files it read, to one .npz.

    python sharded_run.py CHECKPOINT pipeline|tensor INPUTS.npz OUT.npz TOKENS [DRAFTER]

With a DRAFTER folder, each greedy reply is drafted too (K = 3, and adaptive K), split as the model is.
With DIE_AT_TOKEN=k in the environment, rank 1 exits abruptly at its k-th reply token.
"""

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_gemma4u.generation.api import stream_inputs
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.generation.prompt_cache import PromptCache
from mlx_gemma4u.weights import sharded
from mlx_gemma4u.weights.loading import load_draft_model


def main(checkpoint: str, mode: str, inputs: str, out: str, tokens: str, drafter: str = "") -> None:
    group = mx.distributed.init(strict=True, backend="ring")
    read = []
    original = sharded.read_weights
    sharded.read_weights = lambda path, dtype, check_memory, files: (
        read.append(files) or original(path, dtype, check_memory, files)
    )
    model = sharded.sharded_load_model(Path(checkpoint), **{f"{mode}_group": group})
    layers = [layer for layer in model.language_model.layers if layer is not None]
    decoder = sum(v.nbytes for layer in layers for _, v in tree_flatten(layer.parameters()))
    results = answers(model, inputs, int(tokens), group.rank(), _drafter(drafter, model))
    mine = mx.zeros((group.size(),)).at[group.rank()].add(float(decoder))
    every = mx.distributed.all_sum(mine, group=group)  # (the ring's all_gather fails on tiny arrays)
    mx.eval(every)  # on every rank: a collective runs only when all of its ranks evaluate it
    if group.rank() == 0:
        results["decoder_bytes"] = np.array(every)
        results["files_read"] = np.array(json.dumps([[str(f) for f in files or []] for files in read]))
        np.savez(out, **results)


def answers(model, inputs: str, tokens: int, rank: int = 0, drafter=None) -> dict:
    """Each prompt of the .npz's logits and greedy reply ("case.logits", "case.reply"); with a
    drafter, the reply drafted with K = 3 and with adaptive K ("case.drafted3", "case.drafted"),
    and the drafts accepted with K = 3 ("case.accepted3")."""
    results = {}
    with np.load(inputs) as data:
        cases: dict = {}
        for key in data.files:
            case, name = key.split(".", 1)
            cases.setdefault(case, {})[name] = mx.array(data[key])
    for case, arrays in cases.items():
        ids = arrays.pop("input_ids")
        results[f"{case}.logits"] = np.array(model(ids, **arrays))
        reply = stream_inputs(  # prefilled in chunks of 16, as a long prompt is in chunks of 512
            model, None, {"input_ids": ids, **arrays}, SamplingParams(max_tokens=tokens), PromptCache(model), 16
        )
        results[f"{case}.reply"] = np.array([r.token for r in _dying(reply, rank)])
        for k in (3, None) if drafter is not None else ():
            params = SamplingParams(max_tokens=tokens)
            cache = PromptCache(model)
            drafted = list(stream_inputs(model, None, {"input_ids": ids, **arrays}, params, cache, 16, drafter, k))
            results[f"{case}.drafted{k or ''}"] = np.array([r.token for r in drafted])
            results[f"{case}.accepted{k or ''}"] = np.array(drafted[-1].draft.accepted)
    return results


def _drafter(folder: str, model):
    if not folder:
        return None
    drafter = load_draft_model(folder)
    drafter.check_target(model)
    drafter.split_like(model)
    return drafter


def _dying(responses, rank: int):
    """The responses; rank 1 dies after DIE_AT_TOKEN of them if that is set (the killed-rank test)."""
    die_at = int(os.environ.get("DIE_AT_TOKEN", 0))
    for i, response in enumerate(responses):
        if die_at and rank == 1 and i == die_at:
            os._exit(9)
        yield response


if __name__ == "__main__":
    main(*sys.argv[1:])
