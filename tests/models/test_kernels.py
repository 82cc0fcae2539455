"""The fused kernels (mlx_gemma4u/kernels).

Everywhere: each MLX reference (what Linux runs) equals the operation written out in float64 numpy,
and the dispatcher, driven through its real self-check with stand-ins for the Metal call, uses a
good kernel, turns off a failing one with one warning, and keeps the model's logits equal to the
references'. Where Metal is available: each Metal kernel equals its reference over float32,
float16 and bfloat16 and odd shapes.
"""

import copy
import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_gemma4u.kernels import dispatch
from mlx_gemma4u.models.config import SPECIAL_TOKEN_KEYS, ModelConfig
from mlx_gemma4u.models.model import Model
from mlx_gemma4u.models.rope import RoPE
from mlx_gemma4u.weights.demo import CONFIG

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# The references against float64 numpy: |Δ| <= bound * (1 + |expected|).
NUMPY_BOUND = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 6e-2}
SLIDING_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
FULL_ROPE = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}
needs_metal = pytest.mark.skipif(
    not mx.metal.is_available(),
    reason="no Metal on this machine, so the Metal kernels cannot run; their MLX references are tested here instead",
)


def rand(shape, dtype, seed, scale=1.0) -> mx.array:
    return mx.array(scale * np.random.default_rng(seed).standard_normal(shape), dtype=mx.float32).astype(dtype)


def f64(a):
    """mx float arrays -> float64 numpy; integer arrays -> numpy as they are; anything else unchanged."""
    if not isinstance(a, mx.array):
        return a
    return np.array(a.astype(mx.float32)).astype(np.float64) if mx.issubdtype(a.dtype, mx.floating) else np.array(a)


# Inputs per kernel: odd shapes, head dims 256 and 512, batch > 1, sequence 1 and > 1.
def norm_rope_args(dt, D, T, offset):
    rope = RoPE(D, SLIDING_ROPE if D == 256 else FULL_ROPE)
    return rand((2, T, 3, D), dt, 1), rand((D,), dt, 2), 1e-6, rope, offset


def residual_norm_args(dt, shape, scaled):
    D = shape[-1]
    scale = rand((1,), dt, 5) if scaled else None
    return rand(shape, dt, 1), rand(shape, dt, 2, 30), rand((D,), dt, 3), rand((D,), dt, 4), 1e-6, scale


def position_norm_args(dt, positions, table_rows, D):
    shape = (*positions.shape[:2], D)
    return rand(shape, dt, 1, 5), rand((table_rows, 2, D), dt, 2), positions, rand((D,), dt, 3), rand((D,), dt, 4), 1e-5


PADDED = mx.array([[[0, 0], [8, 1], [2, 7], [-1, -1], [-1, -1]], [[1, 2]] * 5])
DIAGONAL = mx.array([[[i % 4, 3 - i % 4] for i in range(7)]])
CASES = {
    "norm_rope": [
        lambda dt: norm_rope_args(dt, 256, 1, 17),
        lambda dt: norm_rope_args(dt, 512, 7, mx.array([3, 40])),
        lambda dt: norm_rope_args(dt, 512, 1, 9),
    ],
    "residual_norm": [
        lambda dt: residual_norm_args(dt, (2, 1, 3840), True),
        lambda dt: residual_norm_args(dt, (3, 7, 200), False),
    ],
    "gelu_mul": [
        lambda dt: (rand((2, 1, 15360), dt, 1, 3), rand((2, 1, 15360), dt, 2)),
        lambda dt: (rand((3, 7, 301), dt, 1, 3), rand((3, 7, 301), dt, 2)),
    ],
    "softcap": [lambda dt: (rand((2, 1, 4099), dt, 1, 40), 30.0), lambda dt: (rand((1, 5, 262), dt, 2, 40), 30.0)],
    "position_norm": [
        lambda dt: position_norm_args(dt, PADDED, 9, 3840),
        lambda dt: position_norm_args(dt, DIAGONAL, 4, 48),
    ],
}
PARAMS = [
    pytest.param(name, make, dt, id=f"{name}-{i}-{dt}".replace("mlx.core.", ""))
    for name, makers in CASES.items()
    for i, make in enumerate(makers)
    for dt in DTYPES
]


def np_rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_norm_rope(x, w, eps, rope, offset):
    B, T, H, D = x.shape
    pairs = np.arange(D // 2)
    if rope.head_dim == 256:
        inverse = 10000.0 ** (-2 * pairs / D)
    else:  # proportional: only the first int(0.25 * D / 2) pairs turn
        inverse = np.where(pairs < int(0.25 * D // 2), 1e6 ** (-2 * pairs / D), 0.0)
    positions = np.broadcast_to(np.asarray(offset), (B,))[:, None] + np.arange(T)
    angle = (positions[..., None] * inverse)[:, :, None]  # (B, T, 1, D/2)
    n = np_rms(x, w, eps)
    a, c = n[..., : D // 2], n[..., D // 2 :]
    out = np.concatenate([a * np.cos(angle) - c * np.sin(angle), a * np.sin(angle) + c * np.cos(angle)], -1)
    return out.transpose(0, 2, 1, 3)


def np_residual_norm(x, y, w_post, w_next, eps, scale):
    h = (x + np_rms(y, w_post, eps)) * (1.0 if scale is None else scale)
    return h, np_rms(h, w_next, eps)


def np_position_norm(h, table, positions, weight, bias, eps):
    p = np.asarray(positions)
    v = h + np.where(p[..., :1] >= 0, table[p[..., 0], 0], 0) + np.where(p[..., 1:] >= 0, table[p[..., 1], 1], 0)
    centered = v - v.mean(-1, keepdims=True)
    return centered / np.sqrt((centered**2).mean(-1, keepdims=True) + eps) * weight + bias


NUMPY = {
    "norm_rope": np_norm_rope,
    "residual_norm": np_residual_norm,
    "gelu_mul": lambda g, u: 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * u,
    "softcap": lambda x, cap: cap * np.tanh(x / cap),
    "position_norm": np_position_norm,
}


@pytest.mark.parametrize("name, make, dtype", PARAMS)
def test_reference_equals_the_math(name, make, dtype):
    args = make(dtype)
    got = dispatch.KERNELS[name].reference(*args)
    expected = NUMPY[name](*[f64(a) for a in args])
    for g, e in zip(*((got, expected) if isinstance(got, tuple) else ((got,), (expected,)))):
        assert g.dtype == dtype and g.shape == e.shape
        assert (np.abs(f64(g) - e) / (1 + np.abs(e))).max() <= NUMPY_BOUND[dtype]


@needs_metal
@pytest.mark.parametrize("name, make, dtype", PARAMS)
def test_metal_kernel_equals_reference(name, make, dtype):
    kernel, args = dispatch.KERNELS[name], make(dtype)
    assert kernel.supports(*args)
    assert kernel.uses_metal(*args), f"the self-check switched {name} off (see the warning)"
    assert dispatch.mismatch(kernel(*args), kernel.reference(*args), dispatch.TOLERANCE[dtype]) is None


# --- The dispatcher, with stand-ins for the Metal call --------------------------------------------


def tiny_model() -> Model:
    """The demo's layout (a proportional-RoPE full layer, vision) at vocab 1024, all weights random."""
    config = copy.deepcopy(CONFIG)
    config["text_config"]["vocab_size"] = 1024
    config.update({name: 1000 + i for i, name in enumerate(SPECIAL_TOKEN_KEYS)})
    model = Model(ModelConfig.from_dict(config))
    params = tree_flatten(model.parameters())
    model.update(
        tree_unflatten(
            [(k, rand(v.shape, mx.float32, i, 0.5 if v.ndim > 1 else 1.0)) for i, (k, v) in enumerate(params)]
        )
    )
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def outputs(model: Model) -> list[mx.array]:
    """Logits of a batch of two (prefill then one cached step, left-padded row) and vision soft tokens."""
    ids = mx.array(np.random.default_rng(0).integers(3, 900, (2, 9)), dtype=mx.int32)
    mask = mx.array([[1] * 9, [0] * 2 + [1] * 7])
    cache = model.make_cache()
    prefill = model(ids, cache=cache, attention_mask=mask)
    step = model(ids[:, :1], cache=cache, attention_mask=mx.concatenate([mask, mx.ones((2, 1), mx.int32)], 1))
    positions = mx.array([[[0, 0], [1, 0], [5, 7], [-1, -1]]])
    soft = model.embed_vision(rand((1, 4, 6912), mx.float32, 3).abs(), positions)
    return [prefill, step, soft]


@pytest.fixture
def fake_metal(monkeypatch):
    """The dispatcher believes Metal is there; every kernel starts untested and is reset afterwards."""
    monkeypatch.setattr(dispatch, "metal_available", lambda: True)
    monkeypatch.delenv(dispatch.ENV, raising=False)
    for kernel in dispatch.KERNELS.values():
        kernel.reset()
    yield monkeypatch
    for kernel in dispatch.KERNELS.values():
        kernel.reset()


@pytest.fixture(scope="module")
def reference_outputs(model):
    with pytest.MonkeyPatch.context() as m:
        m.setenv(dispatch.ENV, "reference")
        return outputs(model)


def stand_in(kernel, calls: list, wrong: bool = False):
    """A builder whose "Metal" function is the reference (times 1.1 if wrong), counting its calls."""

    def run(*args):
        calls.append(kernel.name)
        out = kernel.reference(*args)
        return tuple(o * 1.1 for o in out) if wrong and isinstance(out, tuple) else out * 1.1 if wrong else out

    return lambda: run


def assert_same(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        assert mx.array_equal(x, y).item()


def test_a_passing_kernel_is_used_and_the_model_is_unchanged(fake_metal, model, reference_outputs):
    calls = []
    for kernel in dispatch.KERNELS.values():
        fake_metal.setattr(kernel, "build", stand_in(kernel, calls))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(outputs(model), reference_outputs)
    # one self-check call per (dtype, row size), then the model's own calls
    assert set(calls) == set(dispatch.KERNELS)
    assert calls.count("norm_rope") > 2 * len(model.language_model.layers)
    assert not any(k.disabled for k in dispatch.KERNELS.values())


def compile_error(name, inputs, outputs, source, header=""):
    """Stands in for mx.fast.metal_kernel where the source does not compile: the error comes on the
    first call, as Metal's does."""

    def call(**kwargs):
        raise RuntimeError(
            f"[metal::Device] Unable to build metal library from source\n"
            f"program_source:3:5: error: expected ';' in {name}"
        )

    return call


@pytest.mark.parametrize("failure", ["compile error", "wrong numbers"])
def test_a_failing_kernel_is_switched_off_with_one_warning(failure, fake_metal, model, reference_outputs):
    calls = []
    if failure == "compile error":
        fake_metal.setattr(dispatch, "metal_kernel", compile_error)
    else:
        for kernel in dispatch.KERNELS.values():
            fake_metal.setattr(kernel, "build", stand_in(kernel, calls, wrong=True))
    with pytest.warns(RuntimeWarning) as caught:
        assert_same(outputs(model), reference_outputs)
    messages = sorted(str(w.message) for w in caught if str(w.message).startswith("mlx-gemma4u: Metal kernel"))
    assert len(messages) == len(dispatch.KERNELS)  # one line per kernel
    assert all(f"kernel {name!r} switched off" in m for name, m in zip(sorted(dispatch.KERNELS), messages))
    assert all("\n" not in m and m.endswith("using the MLX reference.") for m in messages)
    reason = "failed to run (RuntimeError" if failure == "compile error" else "differs from the reference by"
    assert all(reason in m for m in messages), messages[0]
    assert all(k.disabled and not k.checked for k in dispatch.KERNELS.values())
    # the self-checks ran the stand-ins, once each; the model never did
    assert sorted(calls) == ([] if failure == "compile error" else sorted(dispatch.KERNELS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off for the process: no second warning
        assert_same(outputs(model), reference_outputs)


def test_the_environment_variable_forces_the_references(fake_metal, model, reference_outputs):
    calls = []
    for kernel in dispatch.KERNELS.values():
        fake_metal.setattr(kernel, "build", stand_in(kernel, calls))
    fake_metal.setenv(dispatch.ENV, "0")
    assert_same(outputs(model), reference_outputs)
    assert calls == [] and all(not k.checked for k in dispatch.KERNELS.values())


def test_unsupported_arguments_take_the_reference_without_a_check(fake_metal):
    kernel = dispatch.KERNELS["residual_norm"]
    fake_metal.setattr(kernel, "build", lambda: pytest.fail("built for arguments it does not support"))
    x = rand((1, 2, 64), mx.float16, 1)
    w = rand((64,), mx.float32, 2)  # float32 weights with float16 activations
    assert not kernel.supports(x, x, w, w, 1e-6, None)
    assert_same(list(kernel(x, x, w, w, 1e-6, None)), list(kernel.reference(x, x, w, w, 1e-6, None)))
    assert not kernel.checked and not kernel.disabled


def test_without_metal_no_metal_code_is_created(monkeypatch, model, reference_outputs):
    monkeypatch.setattr(dispatch, "metal_available", lambda: False)
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setattr(mx.fast, "metal_kernel", lambda *a, **k: pytest.fail("a Metal kernel was created"))
    for kernel in dispatch.KERNELS.values():
        kernel.reset()
    assert_same(outputs(model), reference_outputs)
    assert all(not k.checked and not k.disabled for k in dispatch.KERNELS.values())


def test_the_self_check_leaves_the_random_state_alone(fake_metal):
    kernel = dispatch.KERNELS["softcap"]
    fake_metal.setattr(kernel, "build", stand_in(kernel, []))
    mx.random.seed(7)
    expected = mx.random.uniform(shape=(4,))
    mx.random.seed(7)
    kernel(rand((1, 3), mx.float32, 1), 30.0)
    assert mx.array_equal(mx.random.uniform(shape=(4,)), expected).item()
