"""The training loop: batches of examples -> Adam steps on the adapters, with reports, validation and
atomic checkpoints.

    for each step: batch -> loss and gradients (the model's own forward pass) -> Adam update
    every steps_per_report: train loss, learning rate, trained tokens/s, peak memory
    every steps_per_eval (and at the end): validation loss over val_batches batches
    every save_every (and at the end, or on Ctrl-C): adapters written atomically

`report` receives each event as a dict, so the terminal (a progress bar) and tests read the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_gemma4u.models.lora import AdapterConfig
from mlx_gemma4u.training.batches import Example, collate, loss
from mlx_gemma4u.weights.adapters import save_adapters


@dataclass(frozen=True)
class TrainingArgs:
    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25  # -1: the whole validation set
    save_every: int = 100
    adapter_path: str = "adapters"
    seed: int = 0
    grad_checkpoint: bool = False  # recompute each layer in the backward pass: less memory, more time


def batches(examples: list[Example], batch_size: int, rng: np.random.Generator, loop: bool) -> Iterator:
    """Batches of examples of about the same length (fewer padded tokens), each padded once, in a
    random order of batches; again and again if `loop`."""
    order = np.argsort([len(e) for e in examples], kind="stable")
    padded = [collate([examples[i] for i in order[k : k + batch_size]]) for k in range(0, len(order), batch_size)]
    if not loop:
        yield from padded
        return
    while True:
        yield from (padded[g] for g in rng.permutation(len(padded)))


def evaluate(model, examples: list[Example], batch_size: int, max_batches: int) -> float:
    """Mean loss per trained token over the first max_batches batches (-1: all)."""
    total = count = 0.0
    for i, batch in enumerate(batches(examples, batch_size, np.random.default_rng(0), loop=False)):
        if i == max_batches:
            break
        value, n = loss(model, batch)
        mx.eval(value, n)
        total, count = total + value.item() * n.item(), count + n.item()
    return total / max(count, 1.0)


def train(
    model,
    config: AdapterConfig,
    args: TrainingArgs,
    train_set: list[Example],
    valid_set: list[Example] | None,
    report: Callable[[dict], None] = lambda event: None,
    start: int = 0,
) -> Path:
    """Train `model`'s adapters (already applied) for steps start+1..iters -> the adapter folder.

    Ctrl-C stops at once and saves the adapters as the last finished step left them."""
    folder = Path(args.adapter_path)
    optimizer = optim.Adam(learning_rate=args.learning_rate)
    step_fn = nn.value_and_grad(model, loss)
    stream = batches(train_set, args.batch_size, np.random.default_rng(args.seed), loop=True)
    model.train()
    model.language_model.checkpointed = args.grad_checkpoint
    losses, tokens, since = [], 0, time.perf_counter()
    done, last_good = start, model.trainable_parameters()
    try:
        for step in range(start + 1, args.iters + 1):
            (value, n), grads = step_fn(model, next(stream))
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state, value, n)
            done, last_good = step, model.trainable_parameters()
            losses.append(value.item())
            tokens += int(n.item())
            if step % args.steps_per_report == 0 or step == args.iters:
                elapsed = time.perf_counter() - since
                report(
                    {
                        "step": step,
                        "train_loss": float(np.mean(losses)),
                        "learning_rate": float(optimizer.learning_rate),
                        "tokens_per_s": tokens / elapsed,
                        "peak_memory_gb": mx.get_peak_memory() / 1e9,
                    }
                )
                losses, tokens, since = [], 0, time.perf_counter()
            if valid_set and (step % args.steps_per_eval == 0 or step == args.iters):
                model.eval()
                report({"step": step, "val_loss": evaluate(model, valid_set, args.batch_size, args.val_batches)})
                model.train()
            if step % args.save_every == 0 and step < args.iters:
                save_adapters(folder, model, config, {"iteration": step})
                report({"step": step, "saved": str(folder)})
    except KeyboardInterrupt:
        model.update(last_good)  # the adapters as the last finished step left them
        report({"step": done, "interrupted": True})
    model.eval()
    model.language_model.checkpointed = False
    save_adapters(folder, model, config, {"iteration": done})
    report({"step": done, "saved": str(folder), "final": True})
    return folder
