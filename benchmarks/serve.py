"""Load on the HTTP servers: ours (`mlx-gemma4u serve`) and mlx-vlm's, on the same checkpoint, same run.

    python -m benchmarks.serve [--checkpoint PATH] [--clients 1 4 16] [--max-tokens 32]
                               [--endpoints chat responses] [--out benchmarks/results/serve.json]

For each server, each endpoint (OpenAI's chat completions and Responses API) and each number of
concurrent streaming clients (the official openai client, each with its own prompt, all started
together): aggregate generated tokens per second over the wall time, and time to first token,
p50 and p95. Both servers run as processes of their own on
127.0.0.1 and are stopped at the end. The checkpoint defaults to the demo.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from mlx_gemma4u.files import write_text

from .report import machine


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ours decodes as many requests at once as the most clients (mlx-vlm's default batch is unbounded).
COMMANDS = {
    "ours": lambda path, port, batch: [
        sys.executable,
        "-m",
        "mlx_gemma4u",
        "serve",
        "--model",
        path,
        "--port",
        str(port),
        "--max-concurrency",
        str(batch),
        "--max-queue",
        "64",
    ],
    "mlx-vlm": lambda path, port, batch: [
        sys.executable,
        "-m",
        "mlx_vlm.server",
        "--model",
        path,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ],
}


@contextmanager
def running(name: str, path: str, batch: int):
    """The server `name` on a free port -> its base URL; stopped on exit."""
    port = _port()
    process = subprocess.Popen(COMMANDS[name](path, port, batch), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # at most five minutes to load
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2)
                break
            except OSError:
                if process.poll() is not None:
                    raise SystemExit(f"the {name} server exited while starting") from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def _text_deltas(client, endpoint: str, model: str, prompt: str, max_tokens: int):
    """A streamed reply's text deltas from `endpoint` ("chat" or "responses")."""
    if endpoint == "responses":
        events = client.responses.create(
            model=model, input=prompt, max_output_tokens=max_tokens, temperature=0.0, stream=True
        )
        return (e.delta for e in events if e.type == "response.output_text.delta")
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0, stream=True
    )
    return (chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content)


def one_client(url: str, endpoint: str, model: str, prompt: str, max_tokens: int, start: float) -> tuple[float, int]:
    """Stream one reply -> (seconds from `start` to its first token, tokens received)."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    first, tokens = None, 0
    for _ in _text_deltas(client, endpoint, model, prompt, max_tokens):
        tokens += 1
        first = first if first is not None else time.perf_counter() - start
    return (first if first is not None else float("nan")), tokens


def load(url: str, endpoint: str, model: str, clients: int, max_tokens: int) -> dict:
    prompts = [f"Write a short story about the number {i}." for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_client(url, endpoint, model, p, max_tokens, start), prompts))
    wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return {
        "clients": clients,
        "tokens": sum(r[1] for r in results),
        "wall_s": wall,
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="model folder (default: the demo)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--endpoints", nargs="+", choices=["chat", "responses"], default=["chat", "responses"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    args = parser.parse_args(argv)
    if args.checkpoint is None:
        from mlx_gemma4u.weights.demo import ensure_demo

        args.checkpoint = str(ensure_demo())
    report = {
        "machine": machine(),
        "checkpoint": Path(args.checkpoint).name,
        "max_tokens": args.max_tokens,
        "results": {},
    }
    for name in COMMANDS:
        with running(name, args.checkpoint, max(args.clients)) as url:
            for endpoint in args.endpoints:
                load(url, endpoint, args.checkpoint, 1, 4)  # warm-up, not counted
                rows = [load(url, endpoint, args.checkpoint, n, args.max_tokens) for n in args.clients]
                report["results"].setdefault(name, {})[endpoint] = rows
    report["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(report, indent=2))
    print("| server | endpoint | clients | tokens/s (all clients) | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---|---|---|---|---|---|")
    for name, endpoints in report["results"].items():
        for endpoint, rows in endpoints.items():
            for r in rows:
                print(
                    f"| {name} | {endpoint} | {r['clients']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} "
                    f"| {r['ttft_p95_s']:.2f} |"
                )


if __name__ == "__main__":
    main()
