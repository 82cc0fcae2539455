"""`mlx-gemma4u lora`: fine-tune adapters (LoRA, DoRA or full layers) on a folder of JSONL data.

mlx-lm's flags where they apply; a YAML --config may set any of them (the command line wins). Flags
parse only their type; every setting, from either, is checked once in `settings` (CHECKS).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlx_gemma4u.cli import flags
from mlx_gemma4u.errors import InputError
from mlx_gemma4u.processing.patches import SUPPORTED_BUDGETS

DEFAULTS = {
    "iters": 1000,
    "batch_size": 4,
    "learning_rate": 1e-5,
    "num_layers": 16,
    "fine_tune_type": "lora",
    "rank": 8,
    "scale": 20.0,
    "dropout": 0.0,
    "adapter_path": "adapters",
    "val_batches": 25,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "save_every": 100,
    "max_seq_length": 2048,
    "seed": 0,
    "grad_checkpoint": False,
    "adapt_media": False,
    "max_soft_tokens": None,
}
SWITCHES = ("mask_prompt", "grad_checkpoint", "adapt_media")  # the settings that are true or false


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_model_args(parser, adapters=False)
    parser.add_argument("--train", action="store_true", help="train (without it: only --test, on given adapters)")
    parser.add_argument("--test", action="store_true", help="report the loss on test.jsonl after training")
    parser.add_argument(
        "--data", help="a folder with train.jsonl and valid.jsonl (and test.jsonl): chat, tools, completions or text"
    )
    parser.add_argument("--config", type=Path, help="a YAML file of these settings (the command line wins)")
    parser.add_argument("--fine-tune-type", choices=["lora", "dora", "full"], help="what trains (default lora)")
    parser.add_argument("--num-layers", type=flags.WHOLE, help="adapt the last N decoder layers, -1 all (default 16)")
    parser.add_argument("--rank", type=flags.WHOLE, help="LoRA rank (default 8)")
    parser.add_argument("--scale", type=flags.NUMBER, help="LoRA scale (default 20)")
    parser.add_argument("--dropout", type=flags.NUMBER, help="LoRA dropout (default 0)")
    _switch(parser, "--adapt-media", "also adapt the patch and audio projections (LoRA or full, not DoRA)")
    parser.add_argument("--iters", type=flags.WHOLE, help="training steps (default 1000)")
    parser.add_argument("--batch-size", type=flags.WHOLE, help="examples per step (default 4)")
    parser.add_argument("--learning-rate", type=flags.NUMBER, help="Adam's learning rate (default 1e-5)")
    _switch(parser, "--mask-prompt", "train on the replies only (default for chat, tools, completions data)")
    parser.add_argument("--adapter-path", help="where the adapters are saved (default: adapters)")
    parser.add_argument("--resume-adapter-file", type=Path, help="start from these adapters (a folder or its file)")
    parser.add_argument("--val-batches", type=flags.WHOLE, help="validation batches per evaluation, -1 all (25)")
    parser.add_argument("--steps-per-report", type=flags.WHOLE, help="steps between loss reports (default 10)")
    parser.add_argument("--steps-per-eval", type=flags.WHOLE, help="steps between validations (default 200)")
    parser.add_argument("--save-every", type=flags.WHOLE, help="steps between saved adapters (default 100)")
    parser.add_argument("--max-seq-length", type=flags.WHOLE, help="tokens per example at most (default 2048)")
    parser.add_argument(
        "--max-soft-tokens",
        type=flags.WHOLE,
        help=f"soft tokens per image at most, one of {', '.join(map(str, SUPPORTED_BUDGETS))}: fewer train "
        "faster; give the processor the same when you run the adapters (default: the checkpoint's, 280)",
    )
    parser.add_argument("--seed", type=flags.WHOLE, help="random seed of the adapters and the batch order (0)")
    _switch(parser, "--grad-checkpoint", "recompute each layer in the backward pass: less memory, more time")


def _switch(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A true/false setting: --flag or --no-flag, None when left out (then the YAML or the default)."""
    parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)


CHECKS = {  # setting -> (what it must be, the check)
    "iters": ("a whole number > 0", lambda v: isinstance(v, int) and v > 0),
    "batch_size": ("a whole number > 0", lambda v: isinstance(v, int) and v > 0),
    "learning_rate": ("a number > 0", lambda v: isinstance(v, (int, float)) and v > 0),
    "num_layers": ("-1 or a whole number > 0", lambda v: isinstance(v, int) and (v == -1 or v > 0)),
    "fine_tune_type": ("lora, dora or full", lambda v: v in ("lora", "dora", "full")),
    "rank": ("a whole number > 0", lambda v: isinstance(v, int) and v > 0),
    "scale": ("a number", lambda v: isinstance(v, (int, float))),
    "dropout": ("a number in [0, 1)", lambda v: isinstance(v, (int, float)) and 0 <= v < 1),
    "adapter_path": ("a folder name", lambda v: isinstance(v, str) and v),
    "val_batches": ("-1 or a whole number > 0", lambda v: isinstance(v, int) and (v == -1 or v > 0)),
    "steps_per_report": ("a whole number > 0", lambda v: isinstance(v, int) and v > 0),
    "steps_per_eval": ("a whole number > 0", lambda v: isinstance(v, int) and v > 0),
    "save_every": ("a whole number > 0", lambda v: isinstance(v, int) and v > 0),
    "max_seq_length": ("a whole number > 1", lambda v: isinstance(v, int) and v > 1),
    "seed": ("a whole number >= 0", lambda v: isinstance(v, int) and v >= 0),
    "data": ("a folder name", lambda v: isinstance(v, str) and v),
    "mask_prompt": ("true or false", lambda v: True),
    "grad_checkpoint": ("true or false", lambda v: True),
    "adapt_media": ("true or false", lambda v: True),
    "max_soft_tokens": (f"one of {', '.join(map(str, SUPPORTED_BUDGETS))}", lambda v: v in SUPPORTED_BUDGETS),
}


def settings(args: argparse.Namespace) -> dict:
    """DEFAULTS, then the YAML --config, then the flags given, each setting checked."""
    merged = dict(DEFAULTS)
    if args.config:
        merged.update(_read_yaml(args.config))
    merged.update({k: v for k, v in vars(args).items() if v is not None and k in CHECKS})
    for key, value in merged.items():
        if value is None and key in DEFAULTS and DEFAULTS[key] is None:  # left to the checkpoint
            continue
        what, ok = CHECKS[key]
        if isinstance(value, bool) != (key in SWITCHES) or not ok(value):
            raise InputError(f"{key.replace('_', '-')} must be {what}, got {value!r}.")
    return merged


def _read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise InputError(f"There is no config file at {path}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise InputError(f"{path} is not readable YAML ({str(error).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of settings.")
    unknown = sorted(set(data) - set(CHECKS))
    if unknown:
        raise InputError(f"{path} has an unknown setting {unknown[0]!r}.")
    for key in ("learning_rate", "scale", "dropout"):  # YAML 1.1 reads 1e-5 as a string
        if isinstance(data.get(key), str):
            try:
                data[key] = float(data[key])
            except ValueError:
                pass
    return data


def run(args: argparse.Namespace) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_gemma4u.models import lora
    from mlx_gemma4u.training import data, trainer
    from mlx_gemma4u.weights.adapters import load_adapter_weights, read_config

    s = settings(args)
    if "data" not in s:
        raise InputError("Give --data, a folder with train.jsonl and valid.jsonl.")
    if not (args.train or args.test):
        raise InputError("Nothing to do: pass --train, --test or both.")
    trained_before = args.resume_adapter_file or (None if args.train else Path(s["adapter_path"]))
    config = (
        read_config(trained_before)
        if trained_before
        else lora.AdapterConfig(
            s["fine_tune_type"],
            s["num_layers"],
            s["rank"],
            s["scale"],
            s["dropout"],
            lora.DECODER_KEYS + (lora.MEDIA_KEYS if s["adapt_media"] else ()),
        )
    )
    mx.random.seed(s["seed"])
    model, processor = flags.load_from_args(args)

    def split(name: str):
        return data.load_split(
            s["data"], name, processor, s.get("mask_prompt"), s["max_seq_length"], s["max_soft_tokens"]
        )

    train_set = split("train") if args.train else None
    if args.train and train_set is None:
        raise InputError(f"{s['data']} has no train.jsonl.")
    valid_set = split("valid")
    test_set = split("test") if args.test else None
    if args.test and test_set is None:
        raise InputError(f"{s['data']} has no test.jsonl for --test.")
    lora.apply(model, config)
    start = load_adapter_weights(model, trained_before) if trained_before else 0
    trained = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"Trainable parameters: {trained / total:.3%} ({trained / 1e6:.3f}M of {total / 1e6:.1f}M)", file=sys.stderr)
    if args.train:
        training = trainer.TrainingArgs(**{k: s[k] for k in trainer.TrainingArgs.__dataclass_fields__})
        with _Bars(training.iters, start) as bars:
            trainer.train(model, config, training, train_set, valid_set, bars.report, start=start)
        if bars.interrupted:
            return
    if test_set:
        print(f"Test loss {trainer.evaluate(model, test_set, s['batch_size'], -1):.3f}", file=sys.stderr)


class _Bars:
    """A rich progress bar that shows the trainer's reports: step, losses, learning rate, speed, memory."""

    def __init__(self, iters: int, start: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[line]}"),
            console=Console(stderr=True),
        )
        self.task = self.progress.add_task("train", total=iters, completed=start, line="")
        self.figures: dict = {}
        self.interrupted = False

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def report(self, event: dict) -> None:
        self.progress.update(self.task, completed=event["step"])
        if "saved" in event:
            self.progress.console.print(f"step {event['step']}: adapters saved to {event['saved']}")
            return
        if event.get("interrupted"):
            self.interrupted = True
            self.progress.console.print(f"interrupted after step {event['step']}; saving the adapters")
            return
        self.figures.update({k: v for k, v in event.items() if k != "step"})
        line = "  ".join(_figures(self.figures))
        self.progress.update(self.task, line=line)
        self.progress.console.print(f"step {event['step']}: {line}", highlight=False)


def _figures(f: dict) -> list[str]:
    parts = [f"train loss {f['train_loss']:.3f}"] if "train_loss" in f else []
    parts += [f"val loss {f['val_loss']:.3f}"] if "val_loss" in f else []
    if "learning_rate" in f:
        parts += [
            f"lr {f['learning_rate']:.1e}",
            f"{f['tokens_per_s']:.0f} tok/s",
            f"peak {f['peak_memory_gb']:.2f} GB",
        ]
    return parts
