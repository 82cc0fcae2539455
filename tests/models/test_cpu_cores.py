"""The CPU-core cut (mlx_gemma4u/backends/cpu_cores.py): `apply` swaps a model's layers, MLPs and
attention for versions that cut their work across CPU streams.

A large matmul is cut by output rows, attention by heads; every output must be bit-identical to
the uncut op (mlx.nn's layer, MLX's attention), for float and quantized weights and caches, with
and without a bias or a mask, from any thread; a loaded model is cut after its quantization, and
its logits are the plain model's bit for bit.
"""

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gemma4u.backends import cpu_cores
from mlx_gemma4u.errors import InputError
from mlx_gemma4u.models import decoder
from mlx_gemma4u.weights.demo import ensure_demo_drafter
from mlx_gemma4u.weights.loading import load_draft_model, load_model

sdpa = cpu_cores.scaled_dot_product_attention

ROWS, WIDTH = 12289, 256  # 3.1M multiply-adds a token: three pieces, of uneven size


def rand(shape, dtype, seed) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal(shape), dtype=mx.float32).astype(dtype)


@pytest.fixture
def three_cores(monkeypatch):
    """Three pieces per large matmul, whatever this machine has."""
    monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", "3")


def cut(module: nn.Module) -> nn.Module:
    """`module` as `apply` swaps it inside a model (the module itself stays as it was)."""
    return cpu_cores.apply(nn.Sequential(module)).layers[0]


def pieces(monkeypatch, x, rows) -> int:
    """How many pieces a cut Linear cuts an (x, (rows, ...)) product into."""
    calls = []
    original = cpu_cores.CutLinear.rows
    monkeypatch.setattr(cpu_cores.CutLinear, "rows", lambda *a: calls.append(a) or original(*a))
    cut(nn.Linear(x.shape[-1], rows, bias=False))(x)
    monkeypatch.setattr(cpu_cores.CutLinear, "rows", original)
    return len(calls)


def test_a_large_product_is_cut_in_one_piece_per_core_and_a_small_one_is_not(three_cores, monkeypatch):
    assert pieces(monkeypatch, mx.zeros((1, 1, WIDTH)), ROWS) == 3
    assert pieces(monkeypatch, mx.zeros((1, 8, WIDTH)), 1024) == 2  # 2M multiply-adds: two of PIECE_WORK
    assert pieces(monkeypatch, mx.zeros((1, 1, 64)), 64) == 1  # 4K: the hand-over would cost more
    monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", "1")
    assert type(cut(nn.Linear(WIDTH, ROWS))) is nn.Linear


def test_a_bad_core_count_is_refused_in_one_sentence(monkeypatch):
    monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", "two")
    with pytest.raises(InputError, match="MLX_GEMMA4U_CPU_CORES must be a whole number of cores, got 'two'"):
        cut(nn.Linear(WIDTH, ROWS))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_split_linear_equals_mlx_linear_bit_for_bit(three_cores, dtype, bias, tokens):
    theirs = nn.Linear(WIDTH, ROWS, bias=bias)
    theirs.set_dtype(dtype)
    ours = cut(theirs)
    assert isinstance(ours, cpu_cores.CutLinear)
    x = rand((1, tokens, WIDTH), dtype, 1)
    assert mx.array_equal(ours(x), theirs(x)).item()


@pytest.mark.parametrize("mode, bits, group", [("affine", 4, 64), ("affine", 8, 32), ("mxfp8", 8, 32)])
@pytest.mark.parametrize("tokens", [1, 9])
def test_quantized_layers_are_cut_and_equal_mlx_bit_for_bit(three_cores, mode, bits, group, tokens):
    theirs_matmul = nn.Linear(WIDTH, ROWS, bias=False).to_quantized(group_size=group, bits=bits, mode=mode)
    theirs_table = nn.Embedding(ROWS, WIDTH).to_quantized(group_size=group, bits=bits, mode=mode)
    q_matmul, q_table = cut(theirs_matmul), cut(theirs_table)
    assert isinstance(q_matmul, cpu_cores.CutQuantizedLinear) and isinstance(q_table, cpu_cores.CutQuantizedEmbedding)
    x = rand((1, tokens, WIDTH), mx.bfloat16, 2)
    assert mx.array_equal(q_matmul(x), theirs_matmul(x)).item()
    assert mx.array_equal(q_table.as_linear(x), theirs_table.as_linear(x)).item()


@pytest.mark.parametrize("quantized", [False, True])
def test_mlp_cut_through_gate_and_up_equals_the_uncut_mlp_bit_for_bit(three_cores, quantized):
    mlp = decoder.MLP(WIDTH, 3 * WIDTH)
    if quantized:
        nn.quantize(mlp, group_size=64, bits=4)
    mlp.set_dtype(mx.bfloat16)
    ours = cut(mlp)
    assert isinstance(ours, cpu_cores.CutMLP) and isinstance(ours.gate_proj, cpu_cores._Rows)
    x = rand((1, 40, WIDTH), mx.bfloat16, 12)
    assert mx.array_equal(ours(x), mlp.down_proj(decoder.gelu_mul(mlp.gate_proj(x), mlp.up_proj(x)))).item()


def test_tied_head_equals_mlx_embedding_bit_for_bit(three_cores):
    theirs = nn.Embedding(ROWS, WIDTH)
    ours = cut(theirs)
    x = rand((2, 3, WIDTH), mx.float32, 3)
    assert mx.array_equal(ours.as_linear(x), theirs.as_linear(x)).item()


def on_a_new_thread(run):
    """run() on a fresh thread -> its result (MLX streams belong to the thread that made them)."""
    results = []
    worker = threading.Thread(target=lambda: results.append(run()))
    worker.start()
    worker.join(timeout=120)
    assert len(results) == 1
    return results[0]


def test_a_worker_thread_gets_streams_of_its_own(three_cores):
    layer = cut(nn.Linear(WIDTH, ROWS, bias=False))
    x = rand((1, 4, WIDTH), mx.float32, 4)
    expected = x @ layer.weight.T
    mx.eval(expected, layer(x))  # this thread's streams exist now
    assert on_a_new_thread(lambda: mx.array_equal(layer(x), expected).item())


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("kv_heads", [1, 2, 3])
@pytest.mark.parametrize("queries, mask", [(1, None), (40, "causal"), (40, "array")])
def test_attention_cut_by_heads_equals_mlx_attention_bit_for_bit(monkeypatch, dtype, kv_heads, queries, mask):
    heads, keys, dim = 6, 3000, 64  # one query: 2.3M multiply-adds, two pieces
    q = rand((1, heads, queries, dim), dtype, 5)
    k, v = rand((1, kv_heads, keys, dim), dtype, 6), rand((1, kv_heads, keys, dim), dtype, 7)
    if mask == "array":
        mask = mx.array(np.random.default_rng(8).random((1, 1, queries, keys)) < 0.7)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
    calls = []
    monkeypatch.setattr(cpu_cores, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a) or sdpa(*a, **kw))
    assert mx.array_equal(cpu_cores.attention(q, k, v, None, 1.0, mask, cores=3), expected).item()
    assert len(calls) == (2 if queries == 1 else 3 if kv_heads != 2 else 2)


def test_attention_over_a_quantized_cache_cut_by_heads_equals_it_uncut():
    class QuantizedCache:
        bits, group_size = 8, 32

    q = rand((1, 4, 40, 64), mx.bfloat16, 9)  # 4M multiply-adds: one piece per key-value head
    k, v = (mx.quantize(rand((1, 2, 200, 64), mx.bfloat16, seed), group_size=32, bits=8) for seed in (10, 11))
    uncut = cpu_cores.attention(q, k, v, QuantizedCache(), 1.0, "causal", cores=1)
    assert mx.array_equal(cpu_cores.attention(q, k, v, QuantizedCache(), 1.0, "causal", cores=3), uncut).item()


# ---------------------------------------------------------------- whole models, as loading cuts them

PROMPT = mx.array(np.random.default_rng(13).integers(3, 1000, (1, 200)), dtype=mx.int32)
KEEP = 8  # logits of the last positions only: a 262k-wide 4-bit head over every position is slow on the CPU


@pytest.fixture(scope="module")
def demo_4bit(demo_home, tmp_path_factory):
    from mlx_gemma4u.convert.converter import Options, convert

    return convert(
        demo_home / "demo-v1", tmp_path_factory.mktemp("q4") / "demo-4bit", Options(quantize=True), quiet=True
    ).path


def module_types(model: nn.Module) -> set:
    return {type(m) for _, m in model.named_modules()}


def test_with_one_core_a_loaded_model_is_plain_mlx(demo_home, demo_4bit, monkeypatch):
    monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", "1")
    plain = module_types(load_model(demo_home / "demo-v1")) | module_types(load_model(demo_4bit))
    assert {nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding, decoder.MLP} <= plain
    assert not any(issubclass(t, cpu_cores._Cut) for t in plain)
    attention = load_model(demo_home / "demo-v1").language_model.layers[0].self_attn
    assert attention.sdpa is decoder.scaled_dot_product_attention


def test_quantizing_a_cut_model_keeps_the_cut_and_the_plain_logits(demo_home, monkeypatch):
    """nn.quantize after load() (as mlx-lm users do): the layers stay cut, the MLP finds their rows."""
    ids = mx.array([[2, 651, 6037, 1010, 1053, 12, 1311]])
    models = []
    for cores in ("2", "1"):
        monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", cores)
        model = load_model(demo_home / "demo-v1")
        nn.quantize(model, group_size=64, bits=4)
        models.append(model)
    cut_model, plain = models
    assert {cpu_cores.CutQuantizedLinear, cpu_cores.CutMLP} <= module_types(cut_model)
    assert mx.array_equal(cut_model(ids, logits_to_keep=KEEP), plain(ids, logits_to_keep=KEEP)).item()


@pytest.mark.parametrize("quantized", [False, True])
def test_a_cut_model_gives_the_plain_models_logits_bit_for_bit_on_any_thread(
    demo_home, demo_4bit, monkeypatch, quantized
):
    folder = demo_4bit if quantized else demo_home / "demo-v1"
    monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", "1")
    expected = load_model(folder)(PROMPT, logits_to_keep=KEEP)
    monkeypatch.setenv("MLX_GEMMA4U_CPU_CORES", "3")
    model = load_model(folder)
    kinds = {
        cpu_cores.CutMLP,
        cpu_cores.CutQuantizedLinear if quantized else cpu_cores.CutLinear,
        cpu_cores.CutQuantizedEmbedding if quantized else cpu_cores.CutEmbedding,
    }
    assert kinds <= module_types(model)  # cut after it was quantized
    cut_pieces = []
    original = cpu_cores._streams
    monkeypatch.setattr(cpu_cores, "_streams", lambda n: cut_pieces.append(n) or original(n))
    assert mx.array_equal(model(PROMPT, logits_to_keep=KEEP), expected).item()
    assert cut_pieces  # some work really was cut
    assert on_a_new_thread(lambda: mx.array_equal(model(PROMPT, logits_to_keep=KEEP), expected).item())


def test_the_drafter_is_cut_when_loaded(demo_home, three_cores):
    drafter = load_draft_model(ensure_demo_drafter(demo_home / "demo-drafter-v1"))
    assert isinstance(drafter.pre_projection, cpu_cores.CutLinear)
    assert isinstance(drafter.model.layers[0].mlp, cpu_cores.CutMLP)
