"""The sliding layers' caches (models/cache.py): past the window, a decode step's attention scores
exactly the window's keys, not the rewind room kept behind them, however long the history, after
the buffer has dropped its oldest tokens and after a rewind; with and without the CPU-core cut."""

import mlx.core as mx
import numpy as np
import pytest
import reference

from mlx_gemma4u.backends import cpu_cores
from mlx_gemma4u.models.cache import SlidingKVCache, can_rewind, rewind
from mlx_gemma4u.models.config import SLIDING
from mlx_gemma4u.models.decoder import Attention
from mlx_gemma4u.weights.loading import load_model

WINDOW = reference.BASE_TEXT["sliding_window"]


def count_keys(model) -> list[tuple[str, int, int]]:
    """Wrap every attention call of `model` -> a list that fills with (layer type, keys scored, queries)."""
    seen = []
    for _, module in model.named_modules():
        if isinstance(module, Attention):

            def sdpa(q, k, v, cache, *, scale, mask, inner=module.sdpa, kind=module.layer_type):
                seen.append((kind, k.shape[2], q.shape[2]))
                return inner(q, k, v, cache, scale=scale, mask=mask)

            module.sdpa = sdpa
    return seen


@pytest.mark.parametrize("cores", ["1", "2"])
def test_a_decode_step_scores_the_window_not_the_rewind_room(cores, hf_checkpoints, monkeypatch):
    monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", cores)
    model = cpu_cores.apply(load_model(hf_checkpoints["full"][1]))
    seen = count_keys(model)
    cache = model.make_cache()
    sliding = [c for c in cache if isinstance(c, SlidingKVCache)]
    room = sliding[0].room
    ids = np.random.default_rng(0).integers(3, reference.V - 10, size=(1, 3 * WINDOW))
    model(mx.array(ids, dtype=mx.int32), cache=cache)
    for t in range(3 * (WINDOW + room)):  # the buffer drops its oldest tokens several times over
        seen.clear()
        model(mx.array([[10 + t % 50]], dtype=mx.int32), cache=cache)
        position = 3 * WINDOW + t + 1
        assert {n for kind, n, _ in seen if kind == SLIDING} == {WINDOW}
        assert {n for kind, n, _ in seen if kind != SLIDING} == {position}
        assert all(can_rewind(c, room - room // 8) for c in sliding)
        assert max(c.keys.shape[2] for c in sliding) <= WINDOW + room  # no more memory than window + room
    for c in cache:
        rewind(c, 5)
    seen.clear()
    model(mx.array([[7, 8, 9, 10]], dtype=mx.int32), cache=cache)  # a drafted round's check: 4 new tokens
    assert {n for kind, n, _ in seen if kind == SLIDING} == {WINDOW - 1 + 4}
    seen.clear()
    model(mx.array([[11]], dtype=mx.int32), cache=cache)
    assert {n for kind, n, _ in seen if kind == SLIDING} == {WINDOW}
