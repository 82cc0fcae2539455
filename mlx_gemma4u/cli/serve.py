"""`mlx-gemma4u serve`: the HTTP server's flags, and starting it (the server itself: serve/)."""

from __future__ import annotations

import argparse
import logging
import sys

from mlx_gemma4u.cli import flags
from mlx_gemma4u.cli.flags import DEMO_MAX_TOKENS, NUMBER, WHOLE, add_model_args, checked, load_from_args
from mlx_gemma4u.serve.fetch import FetchPolicy
from mlx_gemma4u.serve.guards import allowed_hosts
from mlx_gemma4u.serve.media import MediaLimits

POSITIVE = checked(int, lambda v: v > 0, "a positive whole number")
POSITIVE_NUMBER = checked(float, lambda v: v > 0, "a positive number")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve subcommand's flags."""
    add_model_args(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)",
    )
    parser.add_argument(
        "--port", type=checked(int, lambda v: 0 < v < 65536, "a port number"), default=8080, help="port (default 8080)"
    )
    parser.add_argument(
        "--idle-unload",
        type=POSITIVE_NUMBER,
        metavar="SECONDS",
        help="free the weights after this long without a request; the next request loads them "
        "again and waits for that (default: keep them)",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="what goes to stderr: info (default) has the start-up line and one line per request",
    )
    parser.add_argument(
        "--no-ui", action="store_true", help="no chat page at / (by default the server's address opens one)"
    )
    parser.add_argument("--api-key", help="require this key (Authorization: Bearer KEY, or x-api-key: KEY)")
    parser.add_argument(
        "--allowed-origins",
        nargs="*",
        metavar="ORIGIN",
        default=[],
        help="browser origins allowed to call the API (CORS); none by default",
    )
    parser.add_argument(
        "--allowed-hosts",
        nargs="*",
        metavar="HOST",
        default=[],
        help="Host header names to answer besides the bound address (and localhost when bound to "
        "loopback); a server bound to 0.0.0.0 answers any unless some are named",
    )
    parser.add_argument(
        "--draft-model",
        metavar="PATH",
        help="a Gemma 4 MTP assistant for speculative decoding (the batch drafts together, each "
        "request keeping its own accepted drafts); 'demo' for a random one to try the flag",
    )
    parser.add_argument(
        "--max-tokens",
        type=POSITIVE,
        metavar="N",
        help="a chat reply's length when the request sets none (default 1024; 32 with --demo)",
    )
    sampling = parser.add_argument_group(
        "sampling a request leaves out",
        "what a request does not set comes from these flags, else from the checkpoint's "
        "generation_config.json (Google's: temperature 1.0, top-p 0.95, top-k 64), else greedy",
    )
    sampling.add_argument("--temp", type=NUMBER, help="sampling temperature; 0 is greedy")
    sampling.add_argument("--top-p", type=NUMBER, help="nucleus sampling threshold (0 = off)")
    sampling.add_argument("--top-k", type=WHOLE, help="sample from the k most likely tokens (0 = off)")
    parser.add_argument(
        "--kv-bits",
        type=int,
        choices=[4, 8],
        help="quantize the KV cache of the full-attention layers to 4 or 8 bits (default: off)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=POSITIVE,
        default=8,
        help="requests decoded together (batched; default 8); more wait in the queue",
    )
    parser.add_argument(
        "--max-queue",
        type=POSITIVE,
        default=16,
        help="requests that may wait to be prepared, and again to be decoded; more get HTTP 429 (default 16)",
    )
    parser.add_argument(
        "--timeout",
        type=POSITIVE_NUMBER,
        default=600.0,
        help="seconds a request may generate before it is cut off (finish_reason 'timeout'; default 600)",
    )
    flags.add_parallel_args(parser)
    limits = parser.add_argument_group("limits on what a request may bring")
    limits.add_argument(
        "--max-request-mb", type=POSITIVE_NUMBER, default=32.0, help="request body size (default 32 MB)"
    )
    limits.add_argument(
        "--max-image-pixels",
        type=POSITIVE,
        default=MediaLimits.image_pixels,
        help=f"pixels of one image, read from its header before decoding (default {MediaLimits.image_pixels:,})",
    )
    limits.add_argument(
        "--max-audio-seconds",
        type=POSITIVE_NUMBER,
        default=MediaLimits.audio_seconds,
        help=f"length of one audio clip (default {MediaLimits.audio_seconds:g} s)",
    )
    limits.add_argument(
        "--max-video-seconds",
        type=POSITIVE_NUMBER,
        default=MediaLimits.video_seconds,
        help=f"length of one video (default {MediaLimits.video_seconds:g} s)",
    )
    limits.add_argument(
        "--max-video-frames",
        type=POSITIVE,
        default=MediaLimits.video_frames,
        help=f"frames of one video (default {MediaLimits.video_frames:,})",
    )
    limits.add_argument(
        "--max-fetch-mb",
        type=POSITIVE_NUMBER,
        default=FetchPolicy.max_bytes / 1e6,
        help=f"bytes of one fetched URL or local file (default {FetchPolicy.max_bytes / 1e6:g} MB)",
    )
    limits.add_argument(
        "--fetch-timeout",
        type=POSITIVE_NUMBER,
        default=FetchPolicy.seconds,
        help=f"seconds for one whole URL fetch, redirects included (default {FetchPolicy.seconds:g})",
    )
    limits.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="fetch media URLs on loopback, private and link-local addresses too (off: public "
        "addresses only, so that a request cannot reach this machine's or its network's services)",
    )
    limits.add_argument(
        "--allow-local-files",
        action="store_true",
        help="let requests name media by local path (off: data: URIs and http(s) URLs only)",
    )


def _settings(args: argparse.Namespace):
    from mlx_gemma4u.serve.app import Settings

    policy = FetchPolicy(
        allow_private=args.allow_private_urls, max_bytes=int(args.max_fetch_mb * 1e6), seconds=args.fetch_timeout
    )
    media = MediaLimits(
        image_pixels=args.max_image_pixels,
        audio_seconds=args.max_audio_seconds,
        video_seconds=args.max_video_seconds,
        video_frames=args.max_video_frames,
        allow_local_files=args.allow_local_files,
        fetch=policy,
    )
    return Settings(
        model_name="demo" if args.demo else str(args.model),
        timeout=args.timeout,
        sampling=_sampling(args),
        media=media,
        api_key=args.api_key,
        allowed_origins=tuple(args.allowed_origins),
        allowed_hosts=allowed_hosts(args.host, args.allowed_hosts),
        max_body_bytes=int(args.max_request_mb * 1e6),
        ui=not args.no_ui,
    )


def _sampling(args: argparse.Namespace) -> dict:
    """The flags' part of what a request leaves out, checked here, before the model loads."""
    from mlx_gemma4u.generation.params import SamplingParams

    flags = {"temperature": args.temp, "top_p": args.top_p, "top_k": args.top_k, "kv_bits": args.kv_bits}
    sampling = {k: v for k, v in flags.items() if v is not None}
    sampling["max_tokens"] = args.max_tokens or (DEMO_MAX_TOKENS if args.demo else 1024)
    SamplingParams(**sampling)
    return sampling


def run(args: argparse.Namespace) -> None:
    from mlx_gemma4u.errors import InputError
    from mlx_gemma4u.serve.app import serve
    from mlx_gemma4u.serve.worker import Worker

    settings = _settings(args)
    drafter = (lambda model: flags.load_drafter(args, model)) if args.draft_model else None
    group = flags.parallel_group(args)
    if group is not None and args.idle_unload:
        raise InputError("--idle-unload does not work with --pipeline or --tensor-parallel.")
    if group is not None and group.rank() > 0:  # the first process serves; the others step its engine with it
        from mlx_gemma4u.generation.lockstep import follow

        model, processor = load_from_args(args, args.adapter_path)
        follow(model, processor, group, args.max_concurrency, drafter(model) if drafter else None)
        return
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s", stream=sys.stderr)
    worker = Worker(
        lambda: load_from_args(args, args.adapter_path),
        max_queue=args.max_queue,
        max_concurrency=args.max_concurrency,
        load_drafter=drafter,
        idle_unload=args.idle_unload,
        group=group,
    )
    serve(worker, settings, args.host, args.port, args.max_queue)
