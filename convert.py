"""Convert a Hugging Face Gemma 4 Unified checkpoint to MLX: `python convert.py --hf-path SRC --mlx-path DST -q`.

The same as `mlx-gemma4u convert`; the work is in mlx_gemma4u/convert.py.
"""

import sys

from mlx_gemma4u.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
