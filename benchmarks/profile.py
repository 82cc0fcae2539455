"""Where a decode step and a prefill spend their time: each part of our model beside the same part of
mlx-vlm's gemma4_unified, timed on its own in one process, with the CPU-core cut off (one MLX stream,
what a Mac's GPU runs), and ours once more with the cut (mlx_gemma4u/backends/cpu_cores.py).

    python -m benchmarks.profile [--sizes demo mid 12b-2l] [--dtype bfloat16] [--tokens 512]
                                 [--out benchmarks/results/profile.json]

Parts, over `tokens` prompt positions (prefill) and over one position after them (decode):

    attention, sliding / full   one layer's projections, norms, RoPE, cache update and attention
    MLP                          one layer's gate, up, GELU and down
    norms and residual adds      one layer's four norms, two residual adds and layer scalar
    head                         the tied output head and soft-cap over one position
    sampling                     greedy: the token from the logits, as each generation loop does it
    forward pass                 the whole model, once (from fresh caches for a prefill)
    generation loop              (decode) the median time between tokens of each one's own loop
    loop overhead                (decode) that, less the forward pass and sampling: Python and
                                 scheduling around the model (negative where the loop overlaps
                                 them, evaluating one step while it prepares the next)

Each figure is the median of --repeats evaluations, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from mlx_gemma4u.files import write_text

from .checkpoints import SIZES, ensure_checkpoint
from .compare import CACHE
from .report import machine

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "profile.json"
LOOP_TOKENS = 24


def median_ms(run: Callable, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def random_like(shape: tuple, dtype, seed: int):
    import mlx.core as mx

    x = mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)
    mx.eval(x)
    return x


class Ours:
    """Our model's parts. The caches a decode part runs after are filled once; each run adds its position."""

    def __init__(self, path: Path, dtype: str):
        from mlx_gemma4u.weights.loading import load_model

        self.model = load_model(path, dtype=dtype)
        self.text = self.model.config.text
        self.dtype = self.model.language_model.norm.weight.dtype

    def layer_index(self, kind: str) -> int:
        return next(i for i, s in enumerate(self.text.layers) if s.layer_type == kind and s.kv_mode != "reuse")

    def attention(self, kind: str, x, lo: int, hi: int) -> Callable:
        import mlx.core as mx

        model, index = self.model, self.layer_index(kind)
        layer, slot = model.language_model.layers[index], model.language_model._cache_slot[index]
        prompt = model.make_cache()[slot]
        if lo:
            mx.eval(layer.self_attn(x[:, :lo], model._step((1, lo), [prompt], None, None), prompt))

        def run():
            cache = prompt if lo else model.make_cache()[slot]
            mx.eval(layer.self_attn(x[:, lo:hi], model._step((1, hi - lo), [cache], None, None), cache))

        return run

    def mlp(self, x) -> Callable:
        import mlx.core as mx

        layer = self.model.language_model.layers[0]
        return lambda: mx.eval(layer.mlp(x))

    def norms(self, x, attn, mlp) -> Callable:
        import mlx.core as mx

        from mlx_gemma4u.kernels import residual_norm

        layer, eps = self.model.language_model.layers[0], self.text.rms_norm_eps
        post_attn, pre_mlp = layer.post_attention_layernorm.weight, layer.pre_feedforward_layernorm.weight
        post_mlp, pre_next = layer.post_feedforward_layernorm.weight, layer.input_layernorm.weight

        def run():
            h, normed = residual_norm(x, attn, post_attn, pre_mlp, eps, None)
            mx.eval(normed, residual_norm(h, mlp, post_mlp, pre_next, eps, layer.layer_scalar))

        return run

    def head(self, x) -> Callable:
        import mlx.core as mx

        return lambda: mx.eval(self.model.logits(x))

    def sampling(self, logits) -> Callable:
        import mlx.core as mx
        from mlx_lm.sample_utils import greedy_sampler

        from mlx_gemma4u.generation.steps import TokenSampler

        sampler = TokenSampler(greedy_sampler, None, mx.array([1]))
        return lambda: mx.eval(sampler(logits)[0])

    def forward(self, ids, decode: bool) -> Callable:
        import mlx.core as mx

        prompt = self.model.make_cache()
        if decode:
            mx.eval(self.model(ids, cache=prompt, logits_to_keep=1))

        def run():
            cache = prompt if decode else self.model.make_cache()
            mx.eval(self.model(ids[:, -1:] if decode else ids, cache=cache, logits_to_keep=1))

        return run

    def loop_ms(self, ids) -> float:
        """Median milliseconds between tokens of our generation loop (stream_inputs, greedy)."""
        from mlx_gemma4u.generation.api import stream_inputs
        from mlx_gemma4u.generation.params import SamplingParams
        from mlx_gemma4u.generation.prompt_cache import PromptCache

        params = SamplingParams(max_tokens=LOOP_TOKENS)
        steps = stream_inputs(self.model, None, {"input_ids": ids}, params, PromptCache(self.model))
        return _gaps_ms(steps)


class MlxVlm:
    """The same parts of mlx-vlm 0.7.10's gemma4_unified (its layers, caches, masks and generate_step)."""

    def __init__(self, path: Path, dtype: str):
        import mlx.core as mx
        from mlx_vlm.utils import load_model

        self.model = load_model(Path(path))
        if dtype == "float32":
            self.model.set_dtype(mx.float32)
        mx.eval(self.model.parameters())
        self.lm = self.model.language_model
        self.layers = self.lm.model.layers

    def layer_index(self, kind: str) -> int:
        return next(i for i, layer in enumerate(self.layers) if layer.layer_type == kind)

    def attention(self, kind: str, x, lo: int, hi: int) -> Callable:
        import mlx.core as mx

        index = self.layer_index(kind)
        attn = self.layers[index].self_attn
        prompt = self.lm.make_cache()

        def masked(cache, chunk):
            return self.lm.model._make_masks(chunk, cache, None)[index]

        if lo:
            mx.eval(attn(x[:, :lo], masked(prompt, x[:, :lo]), prompt[index])[0])

        def run():
            cache = prompt if lo else self.lm.make_cache()
            mx.eval(attn(x[:, lo:hi], masked(cache, x[:, lo:hi]), cache[index])[0])

        return run

    def mlp(self, x) -> Callable:
        import mlx.core as mx

        return lambda: mx.eval(self.layers[0].mlp(x))

    def norms(self, x, attn, mlp) -> Callable:
        import mlx.core as mx

        layer = self.layers[0]

        def run():
            h = x + layer.post_attention_layernorm(attn)
            normed = layer.pre_feedforward_layernorm(h)
            out = (h + layer.post_feedforward_layernorm(mlp)) * layer.layer_scalar
            mx.eval(normed, out, layer.input_layernorm(out))

        return run

    def head(self, x) -> Callable:
        import mlx.core as mx

        return lambda: mx.eval(self.lm.logits_from_hidden(x))

    def sampling(self, logits) -> Callable:
        import mlx.core as mx

        def run():
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            mx.eval(mx.argmax(logprobs, axis=-1), logprobs)

        return run

    def forward(self, ids, decode: bool) -> Callable:
        import mlx.core as mx

        prompt = self.lm.make_cache()
        if decode:
            mx.eval(self.lm(ids, cache=prompt, logits_to_keep=1).logits)

        def run():
            cache = prompt if decode else self.lm.make_cache()
            mx.eval(self.lm(ids[:, -1:] if decode else ids, cache=cache, logits_to_keep=1).logits)

        return run

    def loop_ms(self, ids) -> float:
        from mlx_vlm.generate import generate_step

        return _gaps_ms(generate_step(ids, self.model, None, None, max_tokens=LOOP_TOKENS, temperature=0.0))


def _gaps_ms(steps) -> float:
    stamps = [time.perf_counter() for _ in steps]
    return 1e3 * statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:]))


def parts(impl, tokens: int, dtype, hidden: int, vocab: int, repeats: int) -> dict[str, float]:
    """Part name -> median milliseconds, for one implementation."""
    import mlx.core as mx

    x = random_like((1, tokens + 1, hidden), dtype, 0)
    ids = mx.random.randint(1000, vocab - 1000, (1, tokens), key=mx.random.key(1)).astype(mx.int32)
    logits = random_like((1, vocab), dtype, 2)
    out = {}
    for phase, (lo, hi) in {"prefill": (0, tokens), "decode": (tokens, tokens + 1)}.items():
        chunk = x[:, lo:hi]
        runs = {
            "attention, sliding": impl.attention("sliding_attention", x, lo, hi),
            "attention, full": impl.attention("full_attention", x, lo, hi),
            "MLP": impl.mlp(chunk),
            "norms and residual adds": impl.norms(
                chunk, random_like(chunk.shape, dtype, 3), random_like(chunk.shape, dtype, 4)
            ),
            "forward pass": impl.forward(ids, decode=phase == "decode"),
        }
        out.update({f"{phase}: {name}": median_ms(run, repeats) for name, run in runs.items()})
    out["head (one position)"] = median_ms(impl.head(x[:, -1:]), repeats)
    out["sampling (greedy)"] = median_ms(impl.sampling(logits), repeats)
    loop = impl.loop_ms(ids)
    out["decode: generation loop, per token"] = loop
    out["decode: loop overhead"] = loop - out["decode: forward pass"] - out["sampling (greedy)"]
    return out


def profile(size: str, dtype: str, tokens: int, repeats: int) -> dict:
    """Part -> {"ours, cut off": ms, "mlx-vlm": ms, "ours, cut": ms}."""
    import mlx.core as mx

    from mlx_gemma4u.backends import cpu_cores

    path = ensure_checkpoint(size, CACHE)
    cores = cpu_cores.cpu_cores()
    os.environ["MLX_GEMMA4U_CPU_CORES"] = "1"  # loaded plain for the one-stream figures, cut after them
    ours = Ours(path, dtype)
    text = ours.text
    shape = (ours.dtype, text.hidden_size, text.vocab_size, repeats)
    columns = {"ours, cut off": parts(ours, tokens, *shape)}
    theirs = MlxVlm(path, dtype)
    columns["mlx-vlm"] = parts(theirs, tokens, *shape)
    del theirs
    mx.clear_cache()
    os.environ["MLX_GEMMA4U_CPU_CORES"] = str(cores)
    cpu_cores.apply(ours.model)
    os.environ.pop("MLX_GEMMA4U_CPU_CORES")
    columns[f"ours, cut ({cores} cores)"] = parts(ours, tokens, *shape)
    return {name: {column: figures[name] for column, figures in columns.items()} for name in columns["mlx-vlm"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["demo", "mid"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--tokens", type=int, default=512, help="prompt positions (default 512)")
    parser.add_argument("--repeats", type=int, default=5, help="evaluations per figure (default 5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    report = {"machine": machine(), "dtype": args.dtype, "tokens": args.tokens, "results": {}}
    for size in args.sizes:
        report["results"][size] = result = profile(size, args.dtype, args.tokens, args.repeats)
        print(f"{size}: part, then ms for {', '.join(next(iter(result.values())))}, and mlx-vlm / ours cut off")
        for name, cell in result.items():
            off, vlm, cut = cell.values()
            ratio = f"{vlm / off:5.2f}x" if off > 0 and vlm > 0 else "     "
            print(f"  {name:40s} {off:9.2f} {vlm:9.2f} {cut:9.2f}  {ratio}", flush=True)
    write_text(args.out, json.dumps(report, indent=1))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
