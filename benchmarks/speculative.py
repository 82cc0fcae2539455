"""Speculative decoding: tokens/s with and without a drafter, at set acceptance rates, adaptive and fixed K.

    python -m benchmarks.speculative [--size 12b-2l] [--dtype bfloat16] [--tokens 128] [--out FILE]

The target is a benchmark checkpoint (checkpoints.py, random weights); the drafter has the real
assistant's shape (hidden 1024, 4 layers, 3 sliding + 1 full, MLP 8192, the 262,144-row tied head:
about 420M parameters) with random weights, wrapped in a ReplayDrafter: its proposals are the
target's own recorded greedy continuation, each corrupted with probability 1 - a, so the acceptance
rate is a while every round still pays the real drafter's compute. Runs, in one process: plain
decoding, then a = 0, 0.5, 0.8, 1.0 with adaptive K and with fixed K; and the verify cost curve: one
target pass over n = 1..9 positions after the prompt, against n = 1. Every run's tokens are checked
against plain decoding's (greedy: they must be identical).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map

from benchmarks.checkpoints import ensure_checkpoint
from benchmarks.compare import CACHE
from mlx_gemma4u.generation.api import stream_inputs
from mlx_gemma4u.generation.params import SamplingParams
from mlx_gemma4u.generation.prompt_cache import PromptCache
from mlx_gemma4u.generation.speculative import DraftStats
from mlx_gemma4u.generation.steps import prefill
from mlx_gemma4u.models.drafter import DraftConfig, DraftModel
from mlx_gemma4u.weights.loading import load_model

RATES = (0.0, 0.5, 0.8, 1.0)
FIXED_K = 3
VERIFY_POSITIONS = range(1, 10)


class ReplayDrafter:
    """A drafter that proposes the recorded greedy continuation (ids by position), each proposal
    replaced by a wrong token with probability 1 - acceptance; the wrapped drafter still runs."""

    def __init__(self, drafter: DraftModel, record: list[int], acceptance: float, seed: int = 0):
        self.drafter, self.record, self.acceptance = drafter, record, acceptance
        self.vocab = drafter.config.text.vocab_size
        self.rng = random.Random(seed)

    def parameters(self) -> dict:
        return self.drafter.parameters()

    def check_target(self, target) -> None:
        self.drafter.check_target(target)

    def draft(self, target, shared_kvs: list[dict], tokens: mx.array, hidden: mx.array, k: int) -> mx.array:
        """DraftModel.draft for one sequence: (1, k) proposals."""
        real = self.drafter.draft(target, shared_kvs, tokens, hidden, k)
        first = next(iter(shared_kvs[0].values())).offset + 1  # the position of the first draft
        proposals = [self._propose(p) for p in range(first, first + k)]
        return mx.array([proposals], dtype=mx.int32) + 0 * real  # the drafter's work stays in the graph

    def _propose(self, position: int) -> int:
        right = self.record[min(position, len(self.record) - 1)]
        return right if self.rng.random() < self.acceptance else (right + 1) % self.vocab


def assistant_config(target, hidden: int = 1024, intermediate: int = 8192) -> dict:
    """config.json of an assistant for `target`: the real one's shape by default, its attention
    heads the target's (it reads the target's keys and values)."""
    t = target.config.text
    heads = {
        name: getattr(t, name)
        for name in (
            "vocab_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "global_head_dim",
            "num_global_key_value_heads",
            "attention_k_eq_v",
            "sliding_window",
            "max_position_embeddings",
            "rope_parameters",
        )
    }
    text = dict(
        model_type="gemma4_unified_text",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=4,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        final_logit_softcapping=None,
        **heads,
    )
    return {"model_type": "gemma4_unified_assistant", "text_config": text, "backbone_hidden_size": t.hidden_size}


def random_drafter(target, dtype, **sizes) -> DraftModel:
    """A drafter for `target` with random weights (assistant_config's shape and `sizes`)."""
    drafter = DraftModel(DraftConfig.from_dict(assistant_config(target, **sizes)))
    drafter.update(
        tree_map(
            lambda p: (0.02 * mx.random.normal(p.shape)).astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
            drafter.parameters(),
        )
    )
    mx.eval(drafter.parameters())
    return drafter


def decode(model, ids: mx.array, tokens: int, drafter=None, draft_length=None) -> tuple[list[int], float, DraftStats]:
    """Greedy reply of `tokens` tokens -> (tokens, decode tokens/s after the first, drafting stats)."""
    responses = stream_inputs(
        model,
        None,
        {"input_ids": ids},
        SamplingParams(max_tokens=tokens),
        PromptCache(model),
        draft_model=drafter,
        num_draft_tokens=draft_length,
    )
    last = next(responses)
    out, start = [last.token], time.perf_counter()
    for last in responses:
        out.append(last.token)
    return out, (len(out) - 1) / (time.perf_counter() - start), last.draft or DraftStats()


def verify_curve(model, ids: mx.array, repeats: int) -> dict[int, float]:
    """Seconds of one target pass over n positions after the prompt (median of `repeats`), by n."""
    cache = PromptCache(model)
    mx.eval(prefill(model, {"input_ids": ids}, cache))
    curve = {}
    for n in VERIFY_POSITIONS:
        times = []
        for _ in range(repeats):
            block = mx.random.randint(1000, 200000, (1, n)).astype(mx.int32)
            start = time.perf_counter()
            logits = model(block, cache=cache.caches, logits_to_keep=n)
            mx.eval(logits)
            times.append(time.perf_counter() - start)
            cache.keep(ids.shape[1])
        curve[n] = statistics.median(times)
    return curve


def run(size: str, dtype: str, tokens: int, prompt_tokens: int, repeats: int) -> dict:
    model = load_model(ensure_checkpoint(size, CACHE), dtype=dtype)
    drafter = random_drafter(model, model.language_model.embed_tokens.weight.dtype)
    ids = mx.random.randint(1000, 200000, (1, prompt_tokens)).astype(mx.int32)
    decode(model, ids, 8)  # warm-up
    runs = {}

    def timed(name, **kw):
        speeds = []
        for _ in range(repeats):
            out, tps, stats = decode(model, ids, tokens, **kw)
            speeds.append(tps)
        runs[name] = {
            "tps": statistics.median(speeds),
            "spread": [min(speeds), max(speeds)],
            "drafted": stats.drafted,
            "accepted": stats.accepted,
            "plain_tokens": stats.plain,
            "ks": stats.ks,
            "tokens": out,
        }
        print(
            f"{name:>16}: {runs[name]['tps']:.2f} tok/s  drafted {stats.drafted} accepted {stats.accepted} "
            f"plain {stats.plain} K {sorted(set(stats.ks))}",
            flush=True,
        )

    timed("plain")
    record = ids[0].tolist() + runs["plain"]["tokens"]
    for a in RATES:
        replay = ReplayDrafter(drafter, record, a)
        timed(f"a={a} adaptive", drafter=replay)
        timed(f"a={a} K={FIXED_K}", drafter=replay, draft_length=FIXED_K)
    curve = verify_curve(model, ids, repeats=repeats + 1)
    plain = runs["plain"]
    for r in runs.values():
        r["vs_plain"], r["identical"] = r["tps"] / plain["tps"], r["tokens"] == plain["tokens"]
    for r in runs.values():
        del r["tokens"]
    return {
        "size": size,
        "dtype": dtype,
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "machine": platform.processor() or platform.machine(),
        "runs": runs,
        "verify_s": curve,
        "verify_vs_one": {n: t / curve[1] for n, t in curve.items()},
    }


def table(report: dict) -> str:
    rows = ["| run | tok/s | vs plain | drafted | accepted | plain tokens | K used |", "|---|---|---|---|---|---|---|"]
    for name, r in report["runs"].items():
        ks = sorted(set(r["ks"])) or ["-"]
        rows.append(
            f"| {name} | {r['tps']:.2f} | {r['vs_plain']:.2f}x | {r['drafted']} | {r['accepted']} | "
            f"{r['plain_tokens']} | {', '.join(map(str, ks))} |"
        )
    curve = " · ".join(f"{n}: {v:.2f}x" for n, v in report["verify_vs_one"].items())
    return "\n".join(rows) + f"\n\nVerify pass over n positions vs 1: {curve}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="12b-2l", choices=["demo", "mid", "12b-2l"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per reply")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the report (JSON) and a Markdown table beside it")
    args = parser.parse_args()
    report = run(args.size, args.dtype, args.tokens, args.prompt_tokens, args.repeats)
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(table(report))


if __name__ == "__main__":
    main()
