"""`mlx-gemma4u convert`: mlx-lm's convert flags, plus our --quant-recipe names and --force."""

from __future__ import annotations

import argparse
import sys

from mlx_gemma4u.convert import quantize
from mlx_gemma4u.convert.converter import Options, convert
from mlx_gemma4u.weights.demo import WARNING, ensure_demo
from mlx_gemma4u.weights.loading import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags mlx-lm's convert has, plus --quant-recipe names of ours and --force."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-path", "--model", help="source: a local folder or a Hugging Face repo id")
    source.add_argument(
        "--demo",
        action="store_true",
        help="source: the built-in demo checkpoint (random weights: nonsense output, no download)",
    )
    parser.add_argument("--mlx-path", default="mlx_model", help="destination folder (default: mlx_model)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="dtype of the float weights (default: the source's)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    parser.add_argument("--q-bits", type=int, choices=[2, 3, 4, 5, 6, 8], help="bits per weight (default 4)")
    parser.add_argument("--q-group-size", type=int, choices=[32, 64, 128], help="group size (default 64)")
    parser.add_argument("--q-mode", choices=list(quantize.MODE_DEFAULTS), default="affine", help="quantization mode")
    parser.add_argument(
        "--quant-recipe",
        choices=list(quantize.RECIPES),
        help="which layers get how many bits (default: qat for a QAT source, else default; see the README)",
    )
    parser.add_argument("--dequantize", action="store_true", help="turn a quantized source back into floats")
    parser.add_argument("--upload-repo", metavar="USER/NAME", help="upload the result to this Hugging Face repo")
    parser.add_argument("--force", action="store_true", help="replace an existing --mlx-path model folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> None:
    options = Options(
        dtype=args.dtype,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        q_mode=args.q_mode,
        quant_recipe=args.quant_recipe,
        dequantize=args.dequantize,
    )
    convert_and_report(args, args.hf_path, args.mlx_path, options)


def convert_and_report(args: argparse.Namespace, source: str, destination: str, options: Options, **more) -> None:
    """convert() with the shared flags (--demo, --upload-repo, --force, --quiet), its summary on stderr."""
    if args.demo:
        print(WARNING, file=sys.stderr)
    summary = convert(
        ensure_demo() if args.demo else source,
        destination,
        options,
        upload_repo=args.upload_repo,
        force=args.force,
        quiet=args.quiet,
        **more,
    )
    print(summary, file=sys.stderr)
    if summary.url:
        print(f"uploaded to {summary.url}", file=sys.stderr)
