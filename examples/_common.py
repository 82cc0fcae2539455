"""Shared by the examples: pick the model from the command line (the demo checkpoint by default)."""

import argparse
import sys

import mlx_gemma4u
from mlx_gemma4u.weights.demo import WARNING, ensure_demo


def load_model(description: str, media: str | None = None):
    """Parse --model (and a media path if `media` names one) -> (model, processor, args)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", help="model folder or Hugging Face repo id (default: the random demo)")
    if media:
        parser.add_argument(media, help=f"the {media} file")
    args = parser.parse_args()
    if args.model is None:
        print(WARNING, file=sys.stderr)
    model, processor = mlx_gemma4u.load(args.model or ensure_demo())
    return model, processor, args
