"""Launched by the distributed loading tests under `mlx.launch -n 2 --backend ring`: rank r loads
its pipeline stage of CHECKPOINT_r with sharded_load (its first collective bounded by TIMEOUT
seconds) and prints "rank r: loaded", or, as the CLI does, the GroupError it raised where that is
shown (rank 0, or a rank that timed out).

    python loading_run.py CHECKPOINT_0 CHECKPOINT_1 TIMEOUT [SLEEP_1]

SLEEP_1: seconds rank 1 takes over loading its part, before it starts (a process stuck there).
"""

import sys
import time

import mlx.core as mx

from mlx_gemma4u.errors import GroupError
from mlx_gemma4u.weights import sharded


def main(first: str, second: str, timeout: str, sleep: str = "0") -> int:
    group = mx.distributed.init(strict=True, backend="ring")
    rank = group.rank()
    sharded.load_processor = lambda path: None  # the test checkpoints hold weights only
    if rank == 1:
        load = sharded.sharded_load_model
        sharded.sharded_load_model = lambda *args: time.sleep(float(sleep)) or load(*args)
    try:
        sharded.sharded_load((first, second)[rank], pipeline_group=group, timeout=float(timeout))
    except GroupError as error:
        if error.shown:
            print(f"rank {rank}: error: {error}", flush=True)
        return 1
    print(f"rank {rank}: loaded", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
