import sys

from mlx_gemma4u.cli.main import main

sys.exit(main())
