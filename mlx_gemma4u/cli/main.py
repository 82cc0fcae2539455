"""`mlx-gemma4u`: the command line. Subcommands: generate, chat, serve, lora, fuse, convert (a module each).

Errors the user can fix are printed as one line with exit code 1; `--debug`, anywhere on the command line,
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from mlx_gemma4u.cli import flags
from mlx_gemma4u.errors import Gemma4UError

# name -> (module with add_arguments(parser) and run(args), help, description). Only the module of
# the subcommand on the command line is imported, so `--help` and a bad flag cost milliseconds.
SUBCOMMANDS = {
    "generate": (
        "mlx_gemma4u.cli.generate",
        "answer one prompt, streaming the reply to stdout",
        "Answer one prompt (with any images, videos and audio clips) through the chat template, "
        "streaming the reply to stdout and the statistics to stderr.",
    ),
    "chat": (
        "mlx_gemma4u.cli.chat",
        "chat in the terminal, with images, audio and video",
        "Chat with the model in the terminal. Type /help inside for commands.",
    ),
    "serve": (
        "mlx_gemma4u.cli.serve",
        "an OpenAI- and Anthropic-compatible HTTP server",
        "Serve the model over HTTP: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, "
        "Anthropic's /v1/messages, with images, audio, video, thinking and tools.",
    ),
    "lora": (
        "mlx_gemma4u.cli.lora",
        "fine-tune LoRA adapters on your own data (text, images, audio)",
        "Fine-tune adapters (LoRA, DoRA or whole layers) on a folder of JSONL data in mlx-lm's chat, tools, "
        "completions or text form, with images, audio and video by path; then pass --adapter-path to "
        "generate, chat or serve.",
    ),
    "fuse": (
        "mlx_gemma4u.cli.fuse",
        "fold trained adapters into the model and write it",
        "Fold the adapters of `mlx-gemma4u lora` into the model's weights and write an MLX folder "
        "(optionally de-quantized or uploaded) that loads like any other.",
    ),
    "convert": (
        "mlx_gemma4u.cli.convert",
        "convert a Hugging Face checkpoint to MLX, quantize, upload",
        "Convert a Gemma 4 Unified checkpoint (Hugging Face or MLX) to an MLX folder in the "
        "mlx-community layout (cast, quantize, requantize or dequantize), optionally uploading it.",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `command`, only that subcommand's flags are built (and its
    module imported), the others answer to their name and help line."""
    parser = argparse.ArgumentParser(
        prog="mlx-gemma4u", description="Run Gemma 4 12B Unified (text, images, video, audio) with MLX."
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of errors (also accepted after the subcommand)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_line, description) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_line, description=description)
        if command in (None, name):
            module = import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line. `--debug` is the main parser's, but a subcommand leaves it unparsed
    wherever it stands, so it is taken from the leftovers too.
    """
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((w for w in words if w in SUBCOMMANDS), ""))
    args, rest = parser.parse_known_args(argv)
    if "--debug" in rest:
        args.debug = True
        rest = [arg for arg in rest if arg != "--debug"]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "model_max_tokens", None) and args.max_tokens is None:
        args.max_tokens = flags.DEMO_MAX_TOKENS if args.demo else args.model_max_tokens
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.run(args)
    except Gemma4UError as e:
        if args.debug:
            raise
        if getattr(e, "shown", True):  # a GroupError is told once, by the first process
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except RuntimeError as e:  # MLX's distributed backends: a process of the group is gone
        if args.debug or not str(e).startswith(("[ring]", "[jaccl]", "[mpi]")):
            raise
        print(f"error: another process of the group stopped ({e}); its own output says why.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
