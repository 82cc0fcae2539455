"""Structured output: what a grammar costs a reply, and llguidance against xgrammar on Gemma 4's vocabulary.

    python -m benchmarks.structured [--sizes mid 12b-2l] [--tokens 32] [--out FILE]

Three measurements, in one process:

    decode tok/s    a greedy reply of --tokens tokens, free and held to a JSON schema (a string the
                    random weights never close, so both replies run the full length), on each
                    checkpoint (benchmarks/checkpoints.py); constrained / free is the grammar's cost
    mask us         microseconds per next-token mask, walking the tokens of a sample JSON document
                    through each engine's matcher on the real Gemma 4 tokenizer (262,144 tokens)
    compile ms      time to compile each schema of SCHEMAS, per engine (the vocabulary's own set-up,
                    once per tokenizer, reported apart)

xgrammar is measured when it is installed (`pip install xgrammar`; it imports torch), llguidance
always: it is the engine the package uses.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np

from .checkpoints import ensure_checkpoint
from .compare import CACHE

LONG = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    "nested with $ref": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
            }
        },
        "type": "object",
        "properties": {"path": {"type": "array", "items": {"$ref": "#/$defs/point"}}, "label": {"enum": ["a", "b"]}},
        "required": ["path"],
    },
    "wide": {
        "type": "object",
        "properties": {f"field_{i}": {"type": ["string", "integer", "null"]} for i in range(40)},
        "required": [f"field_{i}" for i in range(0, 40, 2)],
    },
}
SAMPLE = {"path": [{"x": 1.5, "y": -2}, {"x": 0, "y": 3.25}], "label": "b"}


def decode(path: Path, tokens: int) -> dict:
    """Free and constrained greedy replies of `tokens` tokens -> their decode tok/s."""
    from mlx_gemma4u import load, stream_generate

    model, processor = load(path, dtype="float32")
    out = {}
    for name, fmt in (("free", None), ("constrained", LONG), ("free again", None)):
        replies = stream_generate(model, processor, "Tell me a story.", max_tokens=tokens, response_format=fmt)
        last = list(replies)[-1]
        out[name] = {"tokens": last.generation_tokens, "decode_tps": last.generation_tps}
        print(name, json.dumps(out[name]), flush=True)
    free = (out["free"]["decode_tps"] + out["free again"]["decode_tps"]) / 2
    out["constrained_vs_free"] = out["constrained"]["decode_tps"] / free
    return out


def sample_tokens(tokenizer) -> list[int]:
    text = json.dumps(SAMPLE)
    return tokenizer.encode(text, add_special_tokens=False)


def llguidance_figures(folder: Path) -> dict:
    import llguidance

    from mlx_gemma4u.generation.constraints import JSON_OPTIONS
    from mlx_gemma4u.processing.text import load_tokenizer

    tokenizer = load_tokenizer(folder)
    start = time.perf_counter()
    vocab = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=262144, eos_token=106)
    setup = time.perf_counter() - start
    compile_ms = {}
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema({**schema, "x-guidance": JSON_OPTIONS})
        llguidance.LLMatcher(vocab, grammar).compute_bitmask()
        compile_ms[name] = 1e3 * (time.perf_counter() - start)
    grammar = llguidance.LLMatcher.grammar_from_json_schema({**SCHEMAS["nested with $ref"], "x-guidance": JSON_OPTIONS})
    matcher = llguidance.LLMatcher(vocab, grammar)
    words = np.zeros(262144 // 32, dtype=np.int32)
    times = []
    for token in sample_tokens(tokenizer):
        start = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        times.append(time.perf_counter() - start)
        if not matcher.consume_token(token):
            raise RuntimeError(f"llguidance refused the sample at {token}: {matcher.get_error()}")
    return _figures(setup, compile_ms, times)


def xgrammar_figures(folder: Path) -> dict | None:
    try:
        import xgrammar
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    from mlx_gemma4u.processing.text import load_tokenizer

    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=262144, stop_token_ids=[106])
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    setup = time.perf_counter() - start
    compile_ms = {}
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
        xgrammar.GrammarMatcher(compiled).fill_next_token_bitmask(xgrammar.allocate_token_bitmask(1, 262144))
        compile_ms[name] = 1e3 * (time.perf_counter() - start)
    compiled = compiler.compile_json_schema(
        json.dumps(SCHEMAS["nested with $ref"]), any_whitespace=False, separators=(", ", ": ")
    )
    matcher, bitmask = xgrammar.GrammarMatcher(compiled), xgrammar.allocate_token_bitmask(1, 262144)
    times = []
    for token in sample_tokens(load_tokenizer(folder)):
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        times.append(time.perf_counter() - start)
        if not matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused the sample at {token}")
    return _figures(setup, compile_ms, times)


def _figures(setup: float, compile_ms: dict, times: list[float]) -> dict:
    us = [1e6 * t for t in times]
    return {
        "vocabulary_setup_s": setup,
        "compile_ms": compile_ms,
        "mask_us_median": statistics.median(us),
        "mask_us_max": max(us),
        "tokens": len(us),
    }


def table(report: dict) -> str:
    lines = ["| checkpoint | free tok/s | constrained tok/s | constrained / free |", "|---|---|---|---|"]
    for size, d in report["decode"].items():
        free = (d["free"]["decode_tps"] + d["free again"]["decode_tps"]) / 2
        lines.append(
            f"| {size} | {free:.2f} | {d['constrained']['decode_tps']:.2f} | {d['constrained_vs_free']:.2f}x |"
        )
    lines += [
        "",
        "| engine | vocabulary set-up s | mask us (median / max) | "
        + " | ".join(f"compile {n} ms" for n in SCHEMAS)
        + " |",
        "|" + "---|" * (3 + len(SCHEMAS)),
    ]
    for engine, f in report["engines"].items():
        if f is None:
            lines.append(f"| {engine} | not installed |" + " |" * (1 + len(SCHEMAS)))
            continue
        compiled = " | ".join(f"{f['compile_ms'][n]:.1f}" for n in SCHEMAS)
        mask = f"{f['mask_us_median']:.0f} / {f['mask_us_max']:.0f}"
        lines.append(f"| {engine} | {f['vocabulary_setup_s']:.2f} | {mask} | {compiled} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.structured",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes", nargs="+", choices=["demo", "mid", "12b-2l"], default=["mid", "12b-2l"])
    parser.add_argument("--tokens", type=int, default=32, help="tokens per reply")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"where the random checkpoints live ({CACHE})")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here, and a Markdown table beside it")
    args = parser.parse_args(argv)
    report = {"decode": {}, "engines": {}}
    for size in args.sizes:
        report["decode"][size] = decode(ensure_checkpoint(size, args.cache), args.tokens)
        gc.collect()
    folder = ensure_checkpoint(args.sizes[0], args.cache)
    report["engines"]["llguidance"] = llguidance_figures(folder)
    report["engines"]["xgrammar"] = xgrammar_figures(folder)
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(table(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
