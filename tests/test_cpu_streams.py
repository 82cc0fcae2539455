"""Work cut into pieces across CPU streams (mlx_gemma4u/cpu_streams.py): the Linear and Embedding
layers (linear.py) and attention (decoder.attention).

A large matmul is cut by output rows, attention by heads; every output must be bit-identical to
the uncut op (mlx.nn's layer, MLX's attention), for float and quantized weights and caches, with
and without a bias or a mask, from any thread, and quantizing our layers must give our quantized
layers (so the cut survives quantization).
"""

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gemma4u.backends import linear
from mlx_gemma4u.errors import InputError
from mlx_gemma4u.models import decoder

sdpa = decoder.scaled_dot_product_attention

ROWS, WIDTH = 12289, 256  # 3.1M multiply-adds a token: three pieces, of uneven size


def rand(shape, dtype, seed) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal(shape), dtype=mx.float32).astype(dtype)


@pytest.fixture
def three_cores(monkeypatch):
    """Three pieces per large matmul, whatever this machine has."""
    monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", "3")


def pieces(monkeypatch, x, rows) -> int:
    """How many pieces a Linear cuts an (x, (rows, ...)) product into."""
    calls = []
    original = linear.Linear.rows
    monkeypatch.setattr(linear.Linear, "rows", lambda *a: calls.append(a) or original(*a))
    linear.Linear(x.shape[-1], rows, bias=False)(x)
    monkeypatch.setattr(linear.Linear, "rows", original)
    return len(calls)


def test_a_large_product_is_cut_in_one_piece_per_core_and_a_small_one_is_not(three_cores, monkeypatch):
    assert pieces(monkeypatch, mx.zeros((1, 1, WIDTH)), ROWS) == 3
    assert pieces(monkeypatch, mx.zeros((1, 8, WIDTH)), 1024) == 2  # 2M multiply-adds: two of PIECE_WORK
    assert pieces(monkeypatch, mx.zeros((1, 1, 64)), 64) == 1  # 4K: the hand-over would cost more
    monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", "1")
    assert pieces(monkeypatch, mx.zeros((1, 1, WIDTH)), ROWS) == 1


def test_a_bad_core_count_is_refused_in_one_sentence(monkeypatch):
    monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", "two")
    with pytest.raises(InputError, match="MLX_GEMMA4U_CPU_CORES must be a whole number of cores, got 'two'"):
        linear.Linear(WIDTH, ROWS)(mx.zeros((1, WIDTH)))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_split_linear_equals_mlx_linear_bit_for_bit(three_cores, dtype, bias, tokens):
    ours = linear.Linear(WIDTH, ROWS, bias=bias)
    ours.set_dtype(dtype)
    theirs = nn.Linear(WIDTH, ROWS, bias=bias)
    theirs.update(ours.parameters())
    x = rand((1, tokens, WIDTH), dtype, 1)
    assert mx.array_equal(ours(x), theirs(x)).item()


@pytest.mark.parametrize("mode, bits, group", [("affine", 4, 64), ("affine", 8, 32), ("mxfp8", 8, 32)])
@pytest.mark.parametrize("tokens", [1, 9])
def test_quantized_layers_are_ours_and_equal_mlx_bit_for_bit(three_cores, mode, bits, group, tokens):
    float_linear, table = linear.Linear(WIDTH, ROWS, bias=False), linear.Embedding(ROWS, WIDTH)
    q_linear = float_linear.to_quantized(group_size=group, bits=bits, mode=mode)
    q_table = table.to_quantized(group_size=group, bits=bits, mode=mode)
    assert isinstance(q_linear, linear.QuantizedLinear) and isinstance(q_table, linear.QuantizedEmbedding)
    theirs_linear = nn.QuantizedLinear(WIDTH, ROWS, bias=False, group_size=group, bits=bits, mode=mode)
    theirs_linear.update(q_linear.parameters())
    theirs_table = nn.QuantizedEmbedding(ROWS, WIDTH, group_size=group, bits=bits, mode=mode)
    theirs_table.update(q_table.parameters())
    x = rand((1, tokens, WIDTH), mx.bfloat16, 2)
    assert mx.array_equal(q_linear(x), theirs_linear(x)).item()
    assert mx.array_equal(q_table.as_linear(x), theirs_table.as_linear(x)).item()


@pytest.mark.parametrize("quantized", [False, True])
def test_mlp_cut_through_gate_and_up_equals_the_uncut_mlp_bit_for_bit(three_cores, monkeypatch, quantized):
    mlp = decoder.MLP(WIDTH, 3 * WIDTH)
    if quantized:
        nn.quantize(mlp, group_size=64, bits=4)
    mlp.set_dtype(mx.bfloat16)
    x = rand((1, 40, WIDTH), mx.bfloat16, 12)
    cut = mlp(x)
    monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", "1")
    assert mx.array_equal(cut, mlp.down_proj(decoder.gelu_mul(mlp.gate_proj(x), mlp.up_proj(x)))).item()


def test_nn_quantize_turns_our_layers_into_our_quantized_layers():
    model = nn.Sequential(linear.Linear(WIDTH, ROWS), linear.Embedding(ROWS, WIDTH))
    nn.quantize(model, group_size=64, bits=4)
    assert [type(m) for m in model.layers] == [linear.QuantizedLinear, linear.QuantizedEmbedding]


def test_tied_head_equals_mlx_embedding_bit_for_bit(three_cores):
    ours = linear.Embedding(ROWS, WIDTH)
    theirs = nn.Embedding(ROWS, WIDTH)
    theirs.update(ours.parameters())
    x = rand((2, 3, WIDTH), mx.float32, 3)
    assert mx.array_equal(ours.as_linear(x), theirs.as_linear(x)).item()


def test_a_worker_thread_gets_streams_of_its_own(three_cores):
    """MLX streams belong to the thread that made them: a server's worker thread must make its own."""
    layer = linear.Linear(WIDTH, ROWS, bias=False)
    x = rand((1, 4, WIDTH), mx.float32, 4)
    expected = x @ layer.weight.T
    mx.eval(expected, layer(x))  # this thread's streams exist now
    results = []
    worker = threading.Thread(target=lambda: results.append(mx.array_equal(layer(x), expected).item()))
    worker.start()
    worker.join(timeout=60)
    assert results == [True]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("kv_heads", [1, 2, 3])
@pytest.mark.parametrize("queries, mask", [(1, None), (40, "causal"), (40, "array")])
def test_attention_in_pieces_of_heads_equals_mlx_attention_bit_for_bit(three_cores, monkeypatch, dtype, kv_heads,
                                                                        queries, mask):
    heads, keys, dim = 6, 3000, 64  # one query: 2.3M multiply-adds, two pieces
    q = rand((1, heads, queries, dim), dtype, 5)
    k, v = rand((1, kv_heads, keys, dim), dtype, 6), rand((1, kv_heads, keys, dim), dtype, 7)
    if mask == "array":
        mask = mx.array(np.random.default_rng(8).random((1, 1, queries, keys)) < 0.7)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask).transpose(0, 2, 1, 3)
    calls = []
    monkeypatch.setattr(decoder, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a) or sdpa(*a, **kw))
    assert mx.array_equal(decoder.attention(q, k, v, None, mask), expected).item()
    assert len(calls) == (2 if queries == 1 else 3 if kv_heads != 2 else 2)


def test_attention_over_a_quantized_cache_in_pieces_equals_it_uncut(three_cores, monkeypatch):
    class QuantizedCache:
        bits, group_size = 8, 32

    q = rand((1, 4, 40, 64), mx.bfloat16, 9)  # 4M multiply-adds: one piece per key-value head
    k, v = (mx.quantize(rand((1, 2, 200, 64), mx.bfloat16, seed), group_size=32, bits=8) for seed in (10, 11))
    cut = decoder.attention(q, k, v, QuantizedCache(), "causal")
    monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", "1")
    assert mx.array_equal(cut, decoder.attention(q, k, v, QuantizedCache(), "causal")).item()
