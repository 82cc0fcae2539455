"""`mlx-gemma4u`: the command line. Subcommands: generate, chat (chat.py), convert (convert.py), bench (benchmarks/).

Errors the user can fix are printed as one line with exit code 1; `--debug`, anywhere on the command line,
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from mlx_gemma4u.errors import Gemma4UError

# name -> (module with add_arguments(parser) and run(args), help, description). Only the module of
# the subcommand on the command line is imported, so `--help` and a bad flag cost milliseconds.
SUBCOMMANDS = {
    "generate": ("mlx_gemma4u.cli.main", "answer one prompt, streaming the reply to stdout",
                 "Answer one prompt (with any images, videos and audio clips) through the chat template, "
                 "streaming the reply to stdout and the statistics to stderr."),
    "chat": ("mlx_gemma4u.cli.chat", "chat in the terminal, with images, audio and video",
             "Chat with the model in the terminal. Type /help inside for commands."),
    "serve": ("mlx_gemma4u.serve.app", "an OpenAI- and Anthropic-compatible HTTP server",
              "Serve the model over HTTP: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, "
              "Anthropic's /v1/messages, with images, audio, video, thinking and tools."),
    "convert": ("mlx_gemma4u.convert.converter", "convert a Hugging Face checkpoint to MLX, quantize, upload",
                "Convert a Gemma 4 Unified checkpoint (Hugging Face or MLX) to an MLX folder in the "
                "mlx-community layout (cast, quantize, requantize or dequantize), optionally uploading it."),
}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local model folder or a Hugging Face repo id")
    source.add_argument("--demo", action="store_true",
                        help="the built-in demo checkpoint (random weights: nonsense output, no download)")
    parser.add_argument("--vision-mask", choices=["gemma4", "hf-forward"], default="gemma4",
                        help="attention of image/video tokens: Gemma 4's design (default) or transformers' "
                             "plain forward pass")
    parser.add_argument("--no-memory-check", action="store_true",
                        help="load even if the weights look larger than this machine's memory")


def add_draft_args(parser: argparse.ArgumentParser) -> None:
    """Speculative decoding with an MTP assistant (generate and chat)."""
    parser.add_argument("--draft-model", metavar="PATH",
                        help="a Gemma 4 assistant (drafter) folder or repo id, e.g. google/gemma-4-12B-it-assistant; "
                             "'demo': the built-in demo drafter for --demo (random weights: nonsense drafts, which "
                             "only show the flag at work; the reply stays the same)")
    parser.add_argument("--num-draft-tokens", metavar="K", type=_checked(int, lambda v: v >= 0, "an integer >= 0"),
                        help="tokens drafted per round, fixed: 0 drafts none (every step a plain one) (default: "
                             "chosen each round from the measured acceptance and costs, down to none where "
                             "drafting does not pay)")


def draft_kwargs(args: argparse.Namespace, model) -> dict:
    """stream_generate's draft_model / num_draft_tokens from --draft-model / --num-draft-tokens,
    the drafter checked against `model` (the target) so a mismatch is one line before any prompt."""
    if not args.draft_model:
        return {}
    from mlx_gemma4u.models.drafter import load_draft_model

    drafter = load_draft_model(args.draft_model, check_memory=not args.no_memory_check)
    drafter.check_target(model)
    return {"draft_model": drafter, "num_draft_tokens": args.num_draft_tokens}


DEMO_MAX_TOKENS = 32  # the demo's replies are nonsense: a first run shows a line of it, not a page


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """The sampling options generate and chat share (mlx-lm's samplers; 0 switches one off)."""
    from mlx_gemma4u.generation.generate import SEEDS  # the seeds the engine takes (generate.check_settings)

    parser.add_argument("--max-tokens", type=_checked(int, lambda v: v > 0, "a positive integer"),
                        help=f"most tokens per reply (default {max_tokens}; {DEMO_MAX_TOKENS} with --demo)")
    parser.set_defaults(model_max_tokens=max_tokens)
    parser.add_argument("--temp", type=_checked(float, lambda v: v >= 0, "a number >= 0"), default=0.0,
                        help="sampling temperature; 0 is greedy (default)")
    parser.add_argument("--top-p", type=_checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"), default=0.0,
                        help="nucleus sampling threshold (0 = off)")
    parser.add_argument("--top-k", type=_checked(int, lambda v: v >= 0, "an integer >= 0"), default=0,
                        help="sample from the k most likely tokens (0 = off)")
    parser.add_argument("--min-p", type=_checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"), default=0.0,
                        help="minimum probability relative to the top token (0 = off)")
    seed = _checked(int, lambda v: v in SEEDS, f"a whole number from {SEEDS[0]} to {SEEDS[-1]}")
    parser.add_argument("--seed", type=seed, help="random seed, for reproducible sampling")


def _checked(kind: type, ok, what: str):
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


def load_from_args(args: argparse.Namespace):
    from mlx_gemma4u.weights.demo import WARNING, ensure_demo
    from mlx_gemma4u.weights.loading import load

    if args.demo:
        print(WARNING, file=sys.stderr)
    return load(ensure_demo() if args.demo else args.model, vision_mask=args.vision_mask,
                check_memory=not args.no_memory_check)


def check_media_files(args: argparse.Namespace) -> None:
    """Refuse a missing or unreadable --image / --video / --audio file in one sentence before the
    model loads (minutes for a 12B); URLs are fetched later, by the processor."""
    from mlx_gemma4u.cli.chat_session import media_item
    from mlx_gemma4u.processing.sources import is_url

    for kind, sources in (("image", args.image), ("video", args.video), ("audio", args.audio)):
        for source in sources or []:
            if not is_url(source):
                media_item(source, kind)


def cmd_generate(args: argparse.Namespace) -> None:
    from mlx_gemma4u.generation.generate import stream_generate

    check_media_files(args)
    model, processor = load_from_args(args)
    draft = draft_kwargs(args, model)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    last = None
    for last in stream_generate(model, processor, messages, images=args.image, videos=args.video, audio=args.audio,
                                max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p,
                                top_k=args.top_k, min_p=args.min_p, seed=args.seed, **draft):
        print(last.text, end="", flush=True)
    print()
    if last is not None:
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | "
              f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | "
              f"peak memory: {last.peak_memory:.2f} GB" + (f" | {draft_line(last.draft)}" if last.draft else ""),
              file=sys.stderr)


def draft_line(stats) -> str:
    """A reply's drafting in a few words (generate's summary, chat's status line)."""
    plain = f", {stats.plain} undrafted" if stats.plain else ""
    return f"drafted {stats.drafted}, accepted {stats.accepted} ({stats.rate:.0%}), K {stats.k}{plain}"


def cmd_bench(args: argparse.Namespace) -> None:
    """Run benchmarks/compare.py, which ships with the source checkout, not with the package."""
    from pathlib import Path

    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "benchmarks" / "compare.py").is_file():
        raise Gemma4UError("The benchmark lives in the source checkout: clone the repository, "
                           "pip install -e '.[bench]', then run `mlx-gemma4u bench` there.")
    sys.path.insert(0, str(checkout))
    from benchmarks.compare import main as bench_main

    bench_main(args.bench_args)


def add_arguments(gen: argparse.ArgumentParser) -> None:
    """The generate subcommand's flags."""
    from mlx_gemma4u.processing.audio import FORMATS as AUDIO_FORMATS

    add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="the user message")
    gen.add_argument("--system", help="a system prompt")
    gen.add_argument("--image", action="append", metavar="PATH", help="an image file or URL (repeatable)")
    gen.add_argument("--video", action="append", metavar="PATH", help="a video file (repeatable)")
    gen.add_argument("--audio", action="append", metavar="PATH",
                     help=f"an audio file or URL: {AUDIO_FORMATS} (repeatable)")
    add_sampling_args(gen, max_tokens=256)
    add_draft_args(gen)


run = cmd_generate


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `command`, only that subcommand's flags are built (and its
    module imported), the others answer to their name and help line."""
    parser = argparse.ArgumentParser(prog="mlx-gemma4u",
                                     description="Run Gemma 4 12B Unified (text, images, video, audio) with MLX.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of errors (also accepted after the subcommand)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_line, description) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_line, description=description)
        if command in (None, name):
            module = import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    bench = commands.add_parser("bench", help="compare speed and logits with mlx-vlm and transformers "
                                              "(source checkout only; `mlx-gemma4u bench --help`)",
                                add_help=False)  # its options, --help included, are benchmarks/compare.py's
    bench.set_defaults(run=cmd_bench)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; the arguments after `bench` are left unparsed, in args.bench_args.

    `--debug` is the main parser's, but a subcommand leaves it unparsed wherever it stands, so it is
    taken from the leftovers too.
    """
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((w for w in words if w in SUBCOMMANDS or w == "bench"), ""))
    args, rest = parser.parse_known_args(argv)
    if "--debug" in rest:
        args.debug = True
        rest = [arg for arg in rest if arg != "--debug"]
    if args.command == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "model_max_tokens", None) and args.max_tokens is None:
        args.max_tokens = DEMO_MAX_TOKENS if args.demo else args.model_max_tokens
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.run(args)
    except Gemma4UError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
