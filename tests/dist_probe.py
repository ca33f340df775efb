"""Run by tests/test_session.py under torchrun: writes what each rank sees to OUT_DIR/rank-R.json."""

import json
import os
from pathlib import Path

import torch

from flux_lora.parallel import session

with session.process_group(timeout_s=60) as di:
    mine = session.shard_indices(5, di.rank, di.world_size)
    gathered = session.gather_objects(10 * di.rank)
    sums = session.all_sum_on_device(torch.tensor([1.0, float(di.rank)])).tolist()
    shared = session.main_then_share(lambda: "from rank 0")
    session.barrier()
    row = {"rank": di.rank, "world": di.world_size, "mine": mine, "gathered": gathered, "sums": sums, "shared": shared}
    Path(os.environ["OUT_DIR"], f"rank-{di.rank}.json").write_text(json.dumps(row))
