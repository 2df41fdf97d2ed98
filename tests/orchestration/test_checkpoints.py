"""The one checkpoint/resume helper: snapshots, pointers, pruning, corrupt files, no unpickling."""

from __future__ import annotations

import io
import json

import pytest
import torch

from generalist.train import EarlyStopping
from orchestration.checkpoints import Checkpointer, CheckpointError, load_snapshot


def _loop(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    stopper = EarlyStopping(patience=2)
    return model, {"optimizer": optimizer, "scheduler": scheduler, "early_stopping": stopper}


def _train_step(model, stateful):
    loss = model(torch.ones(4, 3)).pow(2).sum()
    loss.backward()
    stateful["optimizer"].step()
    stateful["optimizer"].zero_grad()
    stateful["scheduler"].step()
    return float(loss.detach())


def test_resume_restores_weights_optimizer_scheduler_stopper_and_extra(tmp_path):
    model, stateful = _loop()
    for epoch in (1, 2):
        stateful["early_stopping"].step(_train_step(model, stateful), epoch)
        Checkpointer(tmp_path).save(epoch, model, stateful, extra={"progress": [epoch]},
                                    metadata={"note": "x"}, best=epoch == 1)
    fresh, fresh_state = _loop(seed=1)
    snapshot = Checkpointer(tmp_path).resume(fresh, fresh_state)
    assert snapshot.epoch == 2 and snapshot.extra == {"progress": [2]} and snapshot.metadata["note"] == "x"
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_state["scheduler"].last_epoch == 2
    assert fresh_state["early_stopping"].state_dict() == stateful["early_stopping"].state_dict()
    momentum = stateful["optimizer"].state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(fresh_state["optimizer"].state_dict()["state"][0]["momentum_buffer"], momentum)
    # the next step continues exactly as the uninterrupted loop does
    assert _train_step(fresh, fresh_state) == pytest.approx(_train_step(model, stateful), abs=0)


def test_only_the_latest_and_the_best_snapshot_are_kept(tmp_path):
    model, stateful = _loop()
    checkpoints = Checkpointer(tmp_path)
    for epoch in (1, 2, 3, 4):
        checkpoints.save(epoch, model, stateful, best=epoch == 2)
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_0002", "epoch_0004"]
    assert json.loads((tmp_path / "latest.json").read_text()) == {"epoch": 4, "dir": "epoch_0004"}
    assert checkpoints.load_best(model) == 2


def test_no_snapshot_resumes_nothing_and_a_corrupt_one_raises(tmp_path):
    model, stateful = _loop()
    assert Checkpointer(tmp_path).resume(model, stateful) is None
    Checkpointer(tmp_path).save(1, model, stateful)
    state = tmp_path / "epoch_0001" / "state.pt"
    state.write_bytes(state.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Checkpointer(tmp_path).resume(model, stateful)
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="pointer .* is corrupt"):
        Checkpointer(tmp_path).resume(model, stateful)


def test_resume_or_restart_puts_the_loop_back_as_it_started_when_the_snapshot_is_corrupt(tmp_path):
    for clear in (True, False):
        folder = tmp_path / str(clear)
        model, stateful = _loop()
        _train_step(model, stateful)
        Checkpointer(folder).save(1, model, stateful)
        (folder / "epoch_0001" / "model.safetensors").write_bytes(b"damaged")
        fresh, fresh_state = _loop(seed=3)
        start = {k: v.clone() for k, v in fresh.state_dict().items()}
        snapshot, failed = Checkpointer(folder).resume_or_restart(fresh, fresh_state, clear=clear)
        assert snapshot is None and isinstance(failed, CheckpointError)
        assert all(torch.equal(v, start[k]) for k, v in fresh.state_dict().items())
        assert fresh_state["scheduler"].last_epoch == 0
        assert folder.exists() is not clear              # cleared only when asked (rank 0)
    model, stateful = _loop()
    Checkpointer(tmp_path / "ok").save(2, model, stateful)
    snapshot, failed = Checkpointer(tmp_path / "ok").resume_or_restart(*_loop(seed=5))
    assert failed is None and snapshot.epoch == 2


def test_a_snapshot_for_another_model_does_not_fit(tmp_path):
    model, stateful = _loop()
    Checkpointer(tmp_path).save(1, model, stateful)
    with pytest.raises(CheckpointError, match="does not fit"):
        Checkpointer(tmp_path).resume(torch.nn.Linear(5, 2), {})


class Payload:
    """Anything a weights_only load must refuse to construct."""


def test_state_files_are_read_without_unpickling_objects(tmp_path):
    model, stateful = _loop()
    Checkpointer(tmp_path).save(1, model, stateful)
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "extra": {"x": Payload()}, "stateful": {}}, buffer)
    (tmp_path / "epoch_0001" / "state.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Checkpointer(tmp_path).resume(model, {})


def test_a_snapshot_folder_is_self_contained(tmp_path):
    """What a Ray Train worker reports as a Checkpoint directory restores on its own."""
    model, stateful = _loop()
    path = Checkpointer(tmp_path / "a").save(3, model, stateful, extra={"k": 1})
    moved = tmp_path / "elsewhere"
    path.rename(moved)
    fresh, fresh_state = _loop(seed=2)
    snapshot = load_snapshot(moved, fresh, fresh_state)
    assert snapshot.epoch == 3 and snapshot.extra == {"k": 1} and torch.equal(fresh.weight, model.weight)
