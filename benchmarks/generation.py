"""Time to first token, prefill and decode speed, and peak memory of the generation loop.

    python -m benchmarks.generation [--prompt-tokens 512] [--decode-tokens 64] [--repeats 3]

Runs on the demo checkpoint and on a larger random config (real vocabulary and head dims, 4
layers, hidden 1024) built in memory. Prints the median and spread of each figure.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from mlx_gemma4u.generation.api import stream_inputs
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.generation.prompt_cache import PromptCache
from mlx_gemma4u.models.config import ModelConfig
from mlx_gemma4u.weights.demo import CONFIG as DEMO_CONFIG
from mlx_gemma4u.weights.demo import ensure_demo
from mlx_gemma4u.weights.loading import load_model

LARGER = {
    **DEMO_CONFIG,
    "text_config": {
        **DEMO_CONFIG["text_config"],
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "global_head_dim": 512,
        "sliding_window": 1024,
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    },
    "vision_config": None,
    "audio_config": None,
}


def random_model(raw: dict):
    from mlx_gemma4u.models.model import Model

    model = Model(ModelConfig.from_dict(raw))
    model.update(tree_map(lambda p: 0.02 * mx.random.normal(p.shape).astype(mx.bfloat16), model.parameters()))
    mx.eval(model.parameters())
    return model


def run_once(model, prompt_tokens: int, decode_tokens: int) -> dict:
    ids = mx.random.randint(1000, 200000, (1, prompt_tokens)).astype(mx.int32)
    mx.reset_peak_memory()
    start = time.perf_counter()
    steps = stream_inputs(model, None, {"input_ids": ids}, SamplingParams(max_tokens=decode_tokens), PromptCache(model))
    next(steps)
    first = time.perf_counter()
    n = 1 + sum(1 for _ in steps)
    end = time.perf_counter()
    return {
        "ttft_s": first - start,
        "prefill_tps": prompt_tokens / (first - start),
        "decode_tps": (n - 1) / (end - first),
        "peak_gb": mx.get_peak_memory() / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    models = {"demo": load_model(ensure_demo()), "larger": random_model(LARGER)}
    print(f"device: {mx.default_device()}, prompt {args.prompt_tokens} tokens, decode {args.decode_tokens} tokens")
    for name, model in models.items():
        params = sum(v.size for _, v in tree_flatten(model.parameters()))
        runs = [run_once(model, args.prompt_tokens, args.decode_tokens) for _ in range(args.repeats + 1)][1:]
        cells = []
        for key in runs[0]:
            values = [r[key] for r in runs]
            cells.append(f"{key} {statistics.median(values):.3g} (±{(max(values) - min(values)) / 2:.2g})")
        print(f"{name} ({params / 1e6:.0f}M params): " + ", ".join(cells))


if __name__ == "__main__":
    main()
