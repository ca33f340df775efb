"""The process group and its helpers (flux_lora.parallel.session), under torchrun with gloo; DDP's
gradient averaging against one process.   pytest -q tests/test_session.py"""

import json

from conftest import ROOT, cli_env, torchrun
from flux_lora.parallel.session import DistInfo, env_dist_info, shard_indices


def test_shard_indices_cover_everything_once():
    for n in (0, 1, 5, 17):
        for world in (1, 2, 3, 8):
            parts = [shard_indices(n, r, world) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))
            assert all(i % world == r for r, p in enumerate(parts) for i in p)


def test_world_size_one_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    di = env_dist_info()
    assert isinstance(di, DistInfo) and di.rank == 0 and di.world_size == 1 and not di.distributed


def test_two_ranks_shard_and_agree(tmp_path):
    torchrun(2, str(ROOT / "tests" / "dist_probe.py"), module=False, timeout=120, env=cli_env(OUT_DIR=str(tmp_path)))
    rows = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in rows] == [0, 1]
    assert rows[0]["mine"] == [0, 2, 4] and rows[1]["mine"] == [1, 3]
    assert all(r["gathered"] == [0, 10] for r in rows), "every rank sees every rank's object, in rank order"
    assert all(r["sums"] == [2.0, 1.0] for r in rows)
    assert all(r["shared"] == "from rank 0" for r in rows)


def test_ddp_gradients_average_the_ranks_kept_or_freed(tmp_path):
    """CUDA graphs keep the gradients allocated (zeroed, not freed), and the comm hook averages
    per bucket; with no_sync accumulation and the optimizer, every mode must train exactly like
    one process on all ranks' data."""
    modes = ("free", "keep", "per-tensor")
    for mode in modes:
        proc = torchrun(2, str(ROOT / "tests" / "ddp_grads_probe.py"), module=False, timeout=120, check=False,
                        env=cli_env(OUT_DIR=str(tmp_path), MODE=mode))
        written = all((tmp_path / f"{mode}-rank-{r}.json").is_file() for r in (0, 1))
        # rarely (seen once in this session's ten full runs) gloo's threads abort the process on the way out, after
        # every rank wrote its numbers: a teardown race in torch's CPU backend, not the maths tested here
        teardown_abort = written and "terminate called without an active exception" in proc.stderr
        assert proc.returncode == 0 or teardown_abort, proc.stderr[-3000:]
    rows = {(m, r): json.loads((tmp_path / f"{m}-rank-{r}.json").read_text()) for m in modes for r in (0, 1)}
    assert all(rows["keep", r]["grads_allocated"] == [True] * 4 for r in (0, 1))
    assert all(rows["free", r]["grads_allocated"] == [False] * 4 for r in (0, 1))
    want = rows["free", 0]["reference"]
    for mode in modes:
        assert rows[mode, 0]["params"] == rows[mode, 1]["params"], mode  # the ranks agree
        assert max(abs(a - b) for a, b in zip(rows[mode, 0]["params"], want)) < 1e-6, mode
