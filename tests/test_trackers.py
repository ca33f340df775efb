"""`--log-to tensorboard,wandb` (outputs/trackers.py): every number of events.jsonl reaches
TensorBoard's event files and an offline wandb run at the same step, read back from their own files.

    pytest -q tests/test_trackers.py
"""

import json
import time
import struct

import pytest

from conftest import cli_env, torchrun, train_args
from flux_lora.outputs import trackers


def test_events_become_tags_once_per_step():
    ev = {"v": 1, "event": "progress", "stage": "train", "time": 1.0, "step": 3, "total_steps": 9, "loss": 0.5,
          "learning_rate": 1e-4, "eta_s": None, "flag": True}
    assert trackers.scalars(ev) == {"train/loss": 0.5, "train/learning_rate": 1e-4}
    assert trackers.scalars({"event": "validation", "step": 3, "loss": 0.25}) == {"validation/loss": 0.25}
    assert trackers.scalars({"event": "progress", "stage": "preprocess", "done": 3}) == {}
    assert trackers.scalars({"event": "warning", "message": "x"}) == {}
    assert trackers.parse_log_to(" tensorboard, wandb,tensorboard ") == ["tensorboard", "wandb"]


def test_an_unknown_tracker_is_one_line():
    from flux_lora.config import build_config
    from flux_lora.errors import ConfigError

    with pytest.raises(ConfigError, match="output.log_to.*'mlflow'.*tensorboard, wandb"):
        build_config(flags={"output.log_to": "tensorboard,mlflow"})


def _wandb_records(path, block=32768):
    """wandb's offline .wandb file: a 7-byte header, then LevelDB log records of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, pending = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _wandb_history(run_dir):
    rows = {}
    for record in _wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            rows[row["_step"]] = row
    return rows


def test_tensorboard_and_offline_wandb_get_every_step(tiny_model, cache_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    env = cli_env(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
                  WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_DATA_DIR=str(tmp_path / "wandb-data"))
    args = ["--sample-every", "2", "--validation-split", "0.25", "--checkpoint-every", "2", "--log-to", "tensorboard,wandb"]
    torchrun(2, *train_args(tiny_model, cache_dir, out, "--steps", "4", *args), env=env)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in events if e["event"] == "progress"}
    validation = {e["step"]: e["loss"] for e in events if e["event"] == "validation"}
    assert sorted(losses) == [1, 2, 3, 4] and validation

    board = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert {s.step: s.value for s in board.Scalars("train/loss")} == pytest.approx(losses, rel=1e-6)
    assert {s.step: s.value for s in board.Scalars("validation/loss")} == pytest.approx(validation, rel=1e-6)
    assert [i.step for i in board.Images("samples")] == [e["step"] for e in events if e["event"] == "sample"]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 only

    (run,) = (out / "wandb").glob("offline-run-*")
    history = _wandb_history(run)
    assert {s: history[s]["train/loss"] for s in losses} == pytest.approx(losses, rel=1e-9)
    assert all(history[s]["validation/loss"] == pytest.approx(v) for s, v in validation.items())
    run_id = (out / "wandb" / "flux_lora-run-id").read_text().strip()
    assert run.name.endswith(run_id)

    # resumed (same output folder): the same wandb run goes on, TensorBoard gets the new steps
    monkeypatch.setenv("WANDB_MODE", "offline")
    for key in ("WANDB_SILENT", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, env[key])
    resumed = trackers.Trackers(["tensorboard", "wandb"], out)
    for step in (5, 6):
        resumed.write({"event": "progress", "stage": "train", "step": step, "loss": 0.5 / step})
    resumed.close()
    runs = sorted((out / "wandb").glob("offline-run-*"), key=lambda r: r.stat().st_mtime)
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    # wandb's service process writes the file behind finish() on a loaded machine (seen once in the full suite)
    for _ in range(50):
        resumed_steps = sorted(s for s in _wandb_history(runs[-1]) if s > 4)
        if resumed_steps == [5, 6]:
            break
        time.sleep(0.2)
    assert resumed_steps == [5, 6]
    steps = [s.step for s in EventAccumulator(str(out / "tensorboard")).Reload().Scalars("train/loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
