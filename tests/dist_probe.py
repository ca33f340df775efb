"""Run by tests/test_distributed.py under torchrun: writes what each rank sees to OUT_DIR/rank-R.json."""

import json
import os
from pathlib import Path

from flux_lora import distributed

with distributed.session(timeout_s=60) as di:
    mine = distributed.shard_indices(5, di.rank, di.world_size)
    flag_any = distributed.any_rank(di.rank == 1)
    flag_none = distributed.any_rank(False)
    sums = distributed.all_sum([1.0, float(di.rank)])
    shared = distributed.main_then_share(lambda: "from rank 0")
    distributed.barrier()
    row = {"rank": di.rank, "world": di.world_size, "mine": mine, "any": flag_any, "none": flag_none,
           "sums": sums, "shared": shared}
    Path(os.environ["OUT_DIR"], f"rank-{di.rank}.json").write_text(json.dumps(row))
