"""How much work one decode step asks of MLX: the primitives in its graph and the weight bytes it
reads, ours beside mlx-vlm 0.7.10's gemma4_unified on the same checkpoint.

    python -m benchmarks.graph [--size demo] [--context 64] [--out benchmarks/results/graph.md]

Steps: a plain decode step at batch 1 and at batch 8 (every row with its own `--context`-token
prompt already in its caches), and one drafted round with K = 4 (the drafter's four steps and the
target's (B, 5) verify pass, as one graph). Each step is built lazily and exported with
mx.export_to_dot before anything runs: its primitives are counted by kind, and the parameters
among its inputs are summed (a gathered embedding counts whole; the tied output head reads it
whole anyway). The counts are of the plain model (MLX_GEMMA4U_CPU_CORES=1 turns the CPU-core cut
off); where MLX composes its fast ops (RMS norm, RoPE, attention) from basic ones, as on its CPU
backend, there are more nodes than on a GPU, for both implementations alike. mlx-vlm runs its own
decode call, `model.language_model(tokens, cache=...)`, with B equal-length rows in one cache (no
padding, so its fewest ops); its drafted round is driven by its speculative loop rather than one
call, so it is not counted here. The drafted round needs the demo drafter, so it is counted on the
demo checkpoint only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from unittest import mock

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_gemma4u.files import write_text

from .checkpoints import ensure_checkpoint
from .compare import CACHE, RESULTS

K = 4
BATCHES = (1, 8)


def graph(outputs: list[mx.array], parameters: dict[str, mx.array]) -> dict:
    """The unevaluated graph behind `outputs` -> {"ops": total, "kinds": Counter, "weight_bytes"}."""
    with tempfile.TemporaryDirectory() as folder:
        dot = Path(folder) / "step.dot"
        names = {re.sub(r"\W", "_", name): value for name, value in parameters.items()}
        mx.export_to_dot(str(dot), *outputs, **names)
        text = dot.read_text()
    kinds = Counter(re.findall(r'label ="([^"]+)", shape=rectangle', text))
    read = set(re.findall(r'"(\w+)" ->', text)) & set(names)  # inputs with an edge into the graph
    return {"ops": sum(kinds.values()), "kinds": kinds, "weight_bytes": sum(names[n].nbytes for n in read)}


def prompt(batch: int, context: int, vocab: int) -> mx.array:
    return mx.random.randint(10, vocab, (batch, context), key=mx.random.key(0)).astype(mx.int32)


def ours(path: Path, drafter_path: Path | None, context: int) -> dict[str, dict]:
    from mlx_gemma4u.generation.prompt_cache import PromptCache
    from mlx_gemma4u.weights.loading import load_draft_model, load_model

    with mock.patch.dict(os.environ, {"MLX_GEMMA4U_CPU_CORES": "1"}):  # the plain model
        model = load_model(path)
        drafter = load_draft_model(drafter_path) if drafter_path else None
    weights = dict(tree_flatten(model.parameters()))
    if drafter:
        weights |= {f"drafter.{k}": v for k, v in tree_flatten(drafter.parameters())}
    vocab = model.config.text.vocab_size

    def filled(batch: int) -> tuple[list[list], mx.array]:
        caches, hidden = [], []
        for row in prompt(batch, context, vocab):
            cache = PromptCache(model).caches
            _, h = model(row[None], cache=cache, return_hidden=True)
            mx.eval(h, [c.state for c in cache])
            caches.append(cache)
            hidden.append(h[:, -1:])
        return caches, mx.concatenate(hidden)

    out = {}
    for batch in BATCHES:
        caches, _ = filled(batch)
        tokens = mx.ones((batch, 1), dtype=mx.int32)
        logits = model(tokens, cache=caches[0], logits_to_keep=1) if batch == 1 else model.rows(tokens, caches)
        out[f"decode, batch {batch}"] = graph([logits], weights)
    for batch in BATCHES if drafter else ():
        caches, hidden = filled(batch)
        last = mx.ones((batch,), dtype=mx.int32)
        drafts = drafter.draft(model, [model.shared_kv(c) for c in caches], last, hidden, K)
        logits, hiddens = model.rows(mx.concatenate([last[:, None], drafts], axis=1), caches, return_hidden=True)
        out[f"drafted round K={K}, batch {batch}"] = graph([logits, hiddens], weights)
    return out


def mlx_vlm(path: Path, context: int) -> dict[str, dict]:
    from mlx_vlm.utils import load_model

    model = load_model(path)
    weights = dict(tree_flatten(model.parameters()))
    vocab = json.loads((path / "config.json").read_text())["text_config"]["vocab_size"]
    out = {}
    for batch in BATCHES:
        cache = model.make_cache()
        mx.eval(model.language_model(prompt(batch, context, vocab), cache=cache).logits, [c.state for c in cache])
        logits = model.language_model(mx.ones((batch, 1), dtype=mx.int32), cache=cache, logits_to_keep=1).logits
        out[f"decode, batch {batch}"] = graph([logits], weights)
    return out


def attention_calls(counts: dict) -> int:
    """Attention products in the step: MLX's fused primitive, or (where the backend composes it from
    ops, as the CPU does) its softmax."""
    return counts["kinds"].get("ScaledDotProductAttention", 0) + counts["kinds"].get("Softmax", 0)


def table(size: str, context: int, results: dict[str, dict[str, dict]], layers: int) -> str:
    """Markdown: one line per step, ours beside mlx-vlm."""
    lines = [
        f"Checkpoint `{size}` ({layers} layers), {context}-token context per row, plain model, MLX "
        f"{mx.__version__} on {mx.default_device()} (fast ops composed from basic ones where the backend "
        "has no kernel for them).",
        "",
        "| step | ours ops | mlx-vlm ops | ours / mlx-vlm | ours attention calls | mlx-vlm attention calls "
        "| ours weight MB | mlx-vlm weight MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for step, mine in results["ours"].items():
        theirs = results.get("mlx-vlm", {}).get(step)
        cells = [
            str(mine["ops"]),
            str(theirs["ops"]) if theirs else "not counted",
            f"{mine['ops'] / theirs['ops']:.2f}" if theirs else "",
            str(attention_calls(mine)),
            str(attention_calls(theirs)) if theirs else "",
            f"{mine['weight_bytes'] / 1e6:.1f}",
            f"{theirs['weight_bytes'] / 1e6:.1f}" if theirs else "",
        ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Most frequent primitives, ours at batch 8: "
        + ", ".join(f"{kind} {n}" for kind, n in results["ours"]["decode, batch 8"]["kinds"].most_common(8))
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.graph", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="demo", choices=["demo", "mid", "12b-2l"])
    parser.add_argument("--context", type=int, default=64, help="prompt tokens in each row's caches")
    parser.add_argument("--out", type=Path, default=RESULTS / "graph.md")
    args = parser.parse_args(argv)

    from mlx_gemma4u.weights.demo import ensure_demo_drafter

    path = ensure_checkpoint(args.size, CACHE)
    drafter = ensure_demo_drafter(CACHE / "demo-drafter") if args.size == "demo" else None  # made for the demo
    results = {"ours": ours(path, drafter, args.context)}
    try:
        results["mlx-vlm"] = mlx_vlm(path, args.context)
    except ImportError:
        print("mlx-vlm is not installed (pip install -e '.[bench]'): ours only", file=sys.stderr)
    layers = json.loads((path / "config.json").read_text())["text_config"]["num_hidden_layers"]
    text = table(args.size, args.context, results, layers)
    write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
