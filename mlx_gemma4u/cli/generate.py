"""`mlx-gemma4u generate`: one prompt (with any images, videos and audio clips) through the chat
template, the reply streamed to stdout and its figures to stderr."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mlx_gemma4u.cli import flags
from mlx_gemma4u.cli.flags import add_draft_args, add_model_args, add_sampling_args, draft_line


def add_arguments(gen: argparse.ArgumentParser) -> None:
    """The generate subcommand's flags."""
    from mlx_gemma4u.processing.audio import FORMATS as AUDIO_FORMATS

    add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="the user message")
    gen.add_argument("--system", help="a system prompt")
    gen.add_argument("--image", action="append", metavar="PATH", help="an image file or URL (repeatable)")
    gen.add_argument("--video", action="append", metavar="PATH", help="a video file (repeatable)")
    gen.add_argument(
        "--audio", action="append", metavar="PATH", help=f"an audio file or URL: {AUDIO_FORMATS} (repeatable)"
    )
    add_sampling_args(gen, max_tokens=256)
    shape = gen.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE", help="hold the reply to the JSON schema in FILE")
    shape.add_argument("--regex", metavar="PATTERN", help="hold the reply to a regular expression")
    shape.add_argument(
        "--grammar", metavar="FILE", help="hold the reply to the Lark grammar in FILE (from rule `start`)"
    )
    add_draft_args(gen)
    flags.add_parallel_args(gen)


def run(args: argparse.Namespace) -> None:
    from mlx_gemma4u.generation.api import stream_generate

    params = flags.sampling_params(args, response_format=_response_format(args))
    flags.check_media_files(args)
    model, processor = flags.load_from_args(args, args.adapter_path)
    draft = flags.draft_kwargs(args, model)
    group = flags.parallel_group(args)
    params = flags.same_seed(params, group)
    shown = group is None or group.rank() == 0  # under mlx.launch every process generates, the first prints
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    last = None
    for last in stream_generate(
        model, processor, messages, images=args.image, videos=args.video, audio=args.audio, params=params, **draft
    ):
        if shown:
            print(last.text, end="", flush=True)
    if not shown:
        return
    print()
    if last is not None:
        print(
            f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s | "
            f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s | "
            f"peak memory: {last.peak_memory:.2f} GB" + (f" | {draft_line(last.draft)}" if last.draft else ""),
            file=sys.stderr,
        )


def _response_format(args: argparse.Namespace) -> dict | None:
    """--json-schema / --regex / --grammar as a response format, its file read and checked here."""
    if args.regex is not None:
        return {"type": "regex", "regex": args.regex}
    path = args.json_schema or args.grammar
    if path is None:
        return None
    from mlx_gemma4u.errors import InputError

    flag = "--json-schema" if args.json_schema else "--grammar"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"Could not read {flag} {path} ({getattr(error, 'strerror', None) or error}).") from None
    if args.grammar:
        return {"type": "lark", "grammar": text}
    try:
        return {"type": "json_schema", "json_schema": {"schema": json.loads(text)}}
    except json.JSONDecodeError as error:
        raise InputError(f"--json-schema {path} is not JSON ({error}).") from None
