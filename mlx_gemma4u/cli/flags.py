"""The flags the subcommands share, and what they build: the model, the drafter, SamplingParams.

Flags only parse their type here; their ranges are SamplingParams' (checked once, as it is built),
so the command line refuses exactly what the engine refuses, in the engine's words.
"""

from __future__ import annotations

import argparse
import sys

DEMO_MAX_TOKENS = 32  # the demo's replies are nonsense: a first run shows a line of it, not a page


def add_model_args(parser: argparse.ArgumentParser, adapters: bool = True) -> None:
    """--model or --demo, --vision-mask, --no-memory-check; and --adapter-path unless `adapters` is
    False (the lora command, whose --adapter-path is where it writes)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local model folder or a Hugging Face repo id")
    source.add_argument(
        "--demo",
        action="store_true",
        help="the built-in demo checkpoint (random weights: nonsense output, no download)",
    )
    parser.add_argument(
        "--vision-mask",
        choices=["gemma4", "hf-forward"],
        default="gemma4",
        help="attention of image/video tokens: Gemma 4's design (default) or transformers' plain forward pass",
    )
    parser.add_argument(
        "--no-memory-check", action="store_true", help="load even if the weights look larger than this machine's memory"
    )
    if adapters:
        parser.add_argument(
            "--adapter-path", help="a folder of adapters trained by `mlx-gemma4u lora` to add to the model"
        )


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """--pipeline / --tensor-parallel: one model across the processes `mlx.launch` started."""
    split = parser.add_mutually_exclusive_group()
    split.add_argument(
        "--pipeline",
        action="store_true",
        help="under mlx.launch: each process runs a share of the decoder layers and loads only their weights",
    )
    split.add_argument(
        "--tensor-parallel",
        action="store_true",
        help="under mlx.launch: each process runs a share of every layer's heads and MLP",
    )


def parallel_group(args: argparse.Namespace):
    """The group of processes mlx.launch started, if --pipeline or --tensor-parallel is given."""
    if not (getattr(args, "pipeline", False) or getattr(args, "tensor_parallel", False)):
        return None
    import mlx.core as mx

    from mlx_gemma4u.errors import InputError

    group = mx.distributed.init()
    if group.size() == 1:
        flag = "--pipeline" if args.pipeline else "--tensor-parallel"
        raise InputError(f"{flag} needs several processes: start it with `mlx.launch -n 2 ... mlx-gemma4u ...`.")
    if getattr(args, "adapter_path", None):
        raise InputError("--adapter-path does not work with --pipeline or --tensor-parallel yet.")
    return group


def same_seed(params, group):
    """SamplingParams whose seed is the same on every process of `group` (rank 0's, if none was given),
    so that all of them sample the same tokens."""
    if group is None or params.seed is not None:
        return params
    import random

    from mlx_gemma4u.models.parallel import from_first

    return params.replace(seed=from_first(random.getrandbits(31), group))


def add_draft_args(parser: argparse.ArgumentParser) -> None:
    """Speculative decoding with an MTP assistant (generate and chat)."""
    parser.add_argument(
        "--draft-model",
        metavar="PATH",
        help="a Gemma 4 assistant (drafter) folder or repo id, e.g. google/gemma-4-12B-it-assistant; "
        "'demo': the built-in demo drafter for --demo (random weights: nonsense drafts, which "
        "only show the flag at work; the reply stays the same)",
    )
    parser.add_argument(
        "--num-draft-tokens",
        metavar="K",
        type=checked(int, lambda v: v >= 0, "an integer >= 0"),
        help="tokens drafted per round, fixed: 0 drafts none (every step a plain one) (default: "
        "chosen each round from the measured acceptance and costs, down to none where "
        "drafting does not pay)",
    )


def draft_kwargs(args: argparse.Namespace, model) -> dict:
    """stream_generate's draft_model / num_draft_tokens from --draft-model / --num-draft-tokens."""
    if not args.draft_model:
        return {}
    return {"draft_model": load_drafter(args, model), "num_draft_tokens": args.num_draft_tokens}


def load_drafter(args: argparse.Namespace, model):
    """The --draft-model drafter, checked against `model` (the target) so that a mismatch is one line
    before any prompt, and split as the target is (under mlx.launch)."""
    from mlx_gemma4u.weights.loading import load_draft_model

    drafter = load_draft_model(args.draft_model, check_memory=not args.no_memory_check)
    drafter.check_target(model)
    drafter.split_like(model)
    return drafter


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """The sampling options generate, chat and serve share (mlx-lm's samplers; 0 switches one off)."""
    parser.add_argument(
        "--max-tokens",
        type=WHOLE,
        metavar="N",
        help=f"most tokens per reply (default {max_tokens}; {DEMO_MAX_TOKENS} with --demo)",
    )
    parser.set_defaults(model_max_tokens=max_tokens)
    parser.add_argument("--temp", type=NUMBER, default=0.0, help="sampling temperature; 0 is greedy (default)")
    parser.add_argument("--top-p", type=NUMBER, default=0.0, help="nucleus sampling threshold (0 = off)")
    parser.add_argument("--top-k", type=WHOLE, default=0, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument(
        "--min-p", type=NUMBER, default=0.0, help="minimum probability relative to the top token, in [0, 1) (0 = off)"
    )
    parser.add_argument("--seed", type=WHOLE, help="random seed, for reproducible sampling")
    parser.add_argument(
        "--kv-bits",
        type=int,
        choices=[4, 8],
        help="quantize the KV cache of the full-attention layers to 4 or 8 bits (default: off)",
    )


def sampling_params(args: argparse.Namespace, **more):
    """The SamplingParams of the parsed sampling flags (and `more`): refused in one sentence here,
    before the model loads."""
    from mlx_gemma4u.generation.params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        kv_bits=args.kv_bits,
        **more,
    )


def checked(kind: type, ok, what: str):
    """An argparse type: `kind` whose value passes `ok`, else argparse's one-line usage error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


WHOLE = checked(int, lambda v: True, "a whole number")
NUMBER = checked(float, lambda v: True, "a number")


def load_from_args(args: argparse.Namespace, adapter_path: str | None = None):
    """(model, processor) from add_model_args' flags, with the adapters of `adapter_path` if given."""
    from mlx_gemma4u.weights.demo import WARNING, ensure_demo
    from mlx_gemma4u.weights.loading import load

    if adapter_path is not None:
        from mlx_gemma4u.weights.adapters import read_config

        read_config(adapter_path)  # a wrong folder is refused before the model loads
    group = parallel_group(args)
    if args.demo and (group is None or group.rank() == 0):
        print(WARNING, file=sys.stderr)
    if group is not None:
        from mlx_gemma4u.weights.sharded import sharded_load

        split = {"pipeline_group" if args.pipeline else "tensor_group": group}
        source = ensure_demo() if args.demo else args.model
        return sharded_load(source, vision_mask=args.vision_mask, check_memory=not args.no_memory_check, **split)
    return load(
        ensure_demo() if args.demo else args.model,
        vision_mask=args.vision_mask,
        check_memory=not args.no_memory_check,
        adapter_path=adapter_path,
    )


def check_media_files(args: argparse.Namespace) -> None:
    """Refuse a missing or unreadable --image / --video / --audio file in one sentence before the
    model loads (minutes for a 12B); URLs are fetched later, by the processor."""
    from mlx_gemma4u.cli.chat_session import media_item
    from mlx_gemma4u.processing.sources import is_url

    for kind, sources in (("image", args.image), ("video", args.video), ("audio", args.audio)):
        for source in sources or []:
            if not is_url(source):
                media_item(source, kind)


def draft_line(stats) -> str:
    """A reply's drafting in a few words (generate's summary, chat's status line)."""
    plain = f", {stats.plain} undrafted" if stats.plain else ""
    return f"drafted {stats.drafted}, accepted {stats.accepted} ({stats.rate:.0%}), K {stats.k}{plain}"
