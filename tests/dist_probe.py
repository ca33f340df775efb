"""Run by tests/test_distributed.py under torchrun: prints what each rank sees as JSON."""

import json
import os

from flux_lora import distributed

with distributed.session(timeout_s=60) as di:
    raise_on = int(os.environ.get("RAISE_ON", "1"))
    mine = distributed.shard_indices(5, di.rank, di.world_size)
    flag_any = distributed.any_rank(di.rank == raise_on)
    flag_none = distributed.any_rank(False)
    sums = distributed.all_sum([1.0, float(di.rank)])
    shared = distributed.main_then_share(lambda: "from rank 0")
    distributed.barrier()
    print(json.dumps({"rank": di.rank, "world": di.world_size, "mine": mine, "any": flag_any,
                      "none": flag_none, "sums": sums, "shared": shared}), flush=True)
