"""`mlx-gemma4u fuse`: fold trained adapters into the model and write it as an MLX folder."""

from __future__ import annotations

import argparse

from mlx_gemma4u.cli.convert import convert_and_report
from mlx_gemma4u.convert.converter import Options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="the model the adapters were trained on: a local folder or a repo id")
    source.add_argument("--demo", action="store_true", help="the built-in demo checkpoint")
    parser.add_argument("--adapter-path", required=True, help="the adapters' folder (written by `mlx-gemma4u lora`)")
    parser.add_argument("--save-path", default="fused_model", help="destination folder (default: fused_model)")
    parser.add_argument("--dequantize", action="store_true", help="write float weights from a quantized base")
    parser.add_argument("--upload-repo", metavar="USER/NAME", help="upload the result to this Hugging Face repo")
    parser.add_argument("--force", action="store_true", help="replace an existing --save-path folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> None:
    options = Options(dequantize=args.dequantize)
    convert_and_report(args, args.model, args.save_path, options, adapter_path=args.adapter_path)
