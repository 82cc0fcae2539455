"""LoRA and QLoRA training steps: tokens/s and peak memory, with and without gradient checkpointing,
ours beside mlx-vlm's, on the same batch.

    python -m benchmarks.lora [--size mid] [--steps 2] [--batch 1] [--reply 32] [--out FILE]

The batch: `--batch` examples, each an image (a random 480 x 336 picture, 70 soft tokens), a
16-token question and a `--reply`-token answer; only the answers are trained. Both sides get the
very same token ids and processor arrays, rank-8 adapters on every decoder projection (q, k, v, o,
gate, up, down of every layer) and Adam at 1e-5, and run the same step loop: value_and_grad of
the implementation's own loss, optimizer.update, one evaluation. Ours: mlx_gemma4u.training
(batches.loss, `language_model.checkpointed`); mlx-vlm 0.7.10: its trainer's pieces, get_peft_model,
vlm_sft_loss (completion-only) and enable_model_gradient_checkpointing. "LoRA" trains over the
bfloat16 base, "QLoRA" over the base's decoder quantized to 4 bits (benchmarks.workers.quantize,
the same layers for both).

Each configuration runs in a fresh process: load, one warm-up step, then `--steps` timed steps;
peak memory is MLX's peak over the timed steps (weights included). tokens/s counts every token of
the batch (prompt, image and answer), as mlx-lm's trainer reports it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoints import ensure_checkpoint
from .compare import CACHE, RESULTS
from .report import save

IMPLS = ("ours", "mlx-vlm")
MODES = ("lora", "qlora")
NAMES = {"lora": "LoRA (bf16 base)", "qlora": "QLoRA (4-bit base)"}
RANK, LEARNING_RATE, QUESTION = 8, 1e-5, 16
PICTURE = (336, 480)  # 7 x 10 blocks of 48 px: 70 soft tokens


def build_batch(checkpoint: Path, batch: int, reply: int) -> dict[str, np.ndarray]:
    """The batch both sides train on: ids (B, L), which positions are answer tokens, the image arrays."""
    from mlx_gemma4u.processing.image import Gemma4UImageProcessor

    config = json.loads((checkpoint / "config.json").read_text())
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (*PICTURE, 3), dtype=np.uint8) for _ in range(batch)]
    arrays = Gemma4UImageProcessor(70)(pictures, return_tensors="np")
    soft = int(arrays["num_soft_tokens_per_image"][0])
    rows, answers = [], []
    for _ in range(batch):
        question, answer = rng.integers(1000, 200000, QUESTION), rng.integers(1000, 200000, reply)
        image = [config["boi_token_id"], *[config["image_token_id"]] * soft, config["eoi_token_id"]]
        rows.append([2, *image, *question, *answer, 1])
        answers.append([0] * (1 + len(image) + QUESTION) + [1] * (reply + 1))
    ids = np.array(rows, dtype=np.int32)
    return {
        "input_ids": ids,
        "answer": np.array(answers, dtype=np.int32),
        "mm_token_type_ids": (ids == config["image_token_id"]).astype(np.int32),
        "pixel_values": arrays["pixel_values"],
        "image_position_ids": arrays["image_position_ids"],
    }


def ours(checkpoint: Path, arrays: dict, mode: str, checkpointed: bool):
    """(model, loss function, batch) for our trainer's step."""
    from mlx_gemma4u.models import lora
    from mlx_gemma4u.training.batches import Example, collate, loss
    from mlx_gemma4u.weights.loading import load_model

    from .workers import quantize

    model = load_model(checkpoint, dtype="bfloat16")
    if mode == "qlora":
        quantize(model)
    lora.apply(model, lora.AdapterConfig(num_layers=-1, rank=RANK))
    model.language_model.checkpointed = checkpointed
    examples = [
        Example(
            arrays["input_ids"][i],
            arrays["mm_token_type_ids"][i],
            int(np.argmax(arrays["answer"][i])),
            {k: arrays[k][i : i + 1] for k in ("pixel_values", "image_position_ids")},
        )
        for i in range(len(arrays["input_ids"]))
    ]
    return model, loss, collate(examples)


def mlx_vlm(checkpoint: Path, arrays: dict, mode: str, checkpointed: bool):
    """(model, loss function, batch) for mlx-vlm's trainer pieces."""
    import mlx.core as mx
    from mlx_vlm.trainer.common.utils import enable_model_gradient_checkpointing
    from mlx_vlm.trainer.peft.utils import get_peft_model
    from mlx_vlm.trainer.vlm.sft.runtime import vlm_sft_loss
    from mlx_vlm.utils import load_model

    from .workers import quantize

    model = load_model(checkpoint)
    if mode == "qlora":
        quantize(model)
    get_peft_model(model, rank=RANK, alpha=float(RANK) * 20.0, dropout=0.0, verbose=False)  # scale 20, as ours
    if checkpointed:
        enable_model_gradient_checkpointing(model)
    batch = {
        "input_ids": mx.array(arrays["input_ids"]),
        "attention_mask": mx.ones(arrays["input_ids"].shape, dtype=mx.int32),
        "completion_mask": mx.array(arrays["answer"]),
        "pixel_values": mx.array(arrays["pixel_values"]).astype(mx.bfloat16),
        "image_position_ids": mx.array(arrays["image_position_ids"]),
        "mm_token_type_ids": mx.array(arrays["mm_token_type_ids"]),
    }

    def loss(model, batch):
        return vlm_sft_loss(model, batch, train_on_completions=True)

    return model, loss, batch


def measure(impl: str, checkpoint: Path, mode: str, checkpointed: bool, steps: int, batch: int, reply: int) -> dict:
    """One configuration, in this process: a warm-up step, then `steps` timed ones."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    arrays = build_batch(checkpoint, batch, reply)
    model, loss, data = (ours if impl == "ours" else mlx_vlm)(checkpoint, arrays, mode, checkpointed)
    model.train()
    optimizer = optim.Adam(learning_rate=LEARNING_RATE)
    step = nn.value_and_grad(model, loss)
    times, values = [], []
    for i in range(steps + 1):
        if i == 1:
            mx.reset_peak_memory()
        start = time.perf_counter()
        value, grads = step(model, data)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, value)
        times.append(time.perf_counter() - start)
        values.append(float(value[0].item()))
    timed = times[1:]
    return {
        "step_s": statistics.median(timed),
        "spread": (max(timed) - min(timed)) / statistics.median(timed),
        "tokens_per_s": arrays["input_ids"].size / statistics.median(timed),
        "peak_memory_mb": mx.get_peak_memory() / 2**20,
        "first_loss": values[0],
    }


def run_worker(config: dict, timeout_s: int = 1800) -> dict:
    """measure() in a fresh process -> its record, or {"error": reason}."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.lora", "--worker", json.dumps(config)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| training | checkpointing | ours s/step | mlx-vlm s/step | ours tok/s | mlx-vlm tok/s | ratio "
        "| ours peak MB | mlx-vlm peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        for checkpointed in (False, True):
            cell = {r["impl"]: r for r in rows if r["mode"] == mode and r["checkpointed"] == checkpointed}
            a, b = cell.get("ours", {}), cell.get("mlx-vlm", {})
            ratio = f"{b['step_s'] / a['step_s']:.2f}x" if "step_s" in a and "step_s" in b else "-"
            lines.append(
                f"| {NAMES[mode]} | {'on' if checkpointed else 'off'} "
                f"| {_figure(a, 'step_s', '.1f')} | {_figure(b, 'step_s', '.1f')} "
                f"| {_figure(a, 'tokens_per_s', '.2f')} | {_figure(b, 'tokens_per_s', '.2f')} | {ratio} "
                f"| {_figure(a, 'peak_memory_mb', '.0f')} | {_figure(b, 'peak_memory_mb', '.0f')} |"
            )
    return "\n".join(lines)


def _figure(record: dict, key: str, form: str) -> str:
    return format(record[key], form) if key in record else record.get("error", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mid", help="benchmark checkpoint (benchmarks/checkpoints.py)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--batch", type=int, default=1, help="examples per step")
    parser.add_argument("--reply", type=int, default=32, help="answer tokens per example (trained)")
    parser.add_argument("--out", type=Path, default=RESULTS / "lora.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        config = json.loads(args.worker)
        print(json.dumps(measure(**{**config, "checkpoint": Path(config["checkpoint"])})))
        return 0
    checkpoint = ensure_checkpoint(args.size, CACHE)
    rows = []
    for mode in MODES:
        for checkpointed in (False, True):
            for impl in IMPLS:
                config = dict(impl=impl, mode=mode, checkpointed=checkpointed, steps=args.steps)
                record = run_worker({**config, "checkpoint": str(checkpoint), "batch": args.batch, "reply": args.reply})
                rows.append({**config, **record})
                print(json.dumps(rows[-1]), file=sys.stderr)
    save(args.out, {"size": args.size, "batch": args.batch, "reply": args.reply, "rows": rows}, table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
