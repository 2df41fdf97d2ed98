"""Tests for the pure training components (generalist.train)."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from generalist.models import create_model
from generalist.train import (
    EarlyStopping,
    EpochResult,
    NonFiniteLossError,
    build_optimizer,
    build_scheduler,
    evaluate,
    iterate_batches,
    mixed_precision,
    native_cpu_bf16,
    set_seed,
    train_one_epoch,
)


def quadrant_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 linearly separable classes on 1x8x8 uint8 images: class c has a bright quadrant c plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randint(0, 80, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    for c, (r, q) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        images[labels == c, :, r : r + 4, q : q + 4] += 150
    return images, labels


def tiny_cnn(classes: int = 4) -> nn.Module:
    return create_model(
        "cnn", num_classes=classes, in_channels=1, image_size=8, channels=(8, 16), convs_per_stage=1
    )


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_model_learns_separable_problem() -> None:
    set_seed(0)
    images, labels = quadrant_data(512)
    model = tiny_cnn()
    epochs, batch = 3, 32
    optimizer = build_optimizer(model, "sgd", lr=0.1, weight_decay=5e-4)
    scheduler = build_scheduler(optimizer, total_steps=epochs * 16, warmup_steps=4)
    losses: list[float] = []
    results = []
    for epoch in range(epochs):
        batches = iterate_batches(
            images, labels, batch_size=batch, shuffle=True, seed=0, epoch=epoch
        )
        results.append(
            train_one_epoch(
                model,
                batches,
                optimizer,
                scheduler,
                epoch=epoch,
                on_step=lambda s, v: losses.append(v),
            )
        )
    last = results[-1]
    assert isinstance(last, EpochResult)
    assert (last.epoch, last.examples, len(losses)) == (2, 512, 48)
    assert last.seconds > 0 and last.examples_per_s == pytest.approx(512 / last.seconds)
    assert results[0].loss > last.loss
    assert last.accuracy > 0.9
    metrics = evaluate(model, iterate_batches(images, labels, batch_size=128, shuffle=False))
    assert metrics["top1"] > 0.9 and metrics["examples"] == 512.0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ended


def test_iterate_batches_deterministic_per_seed_and_epoch() -> None:
    images = (
        torch.arange(10 * 3 * 2 * 2, dtype=torch.int64)
        .remainder(256)
        .to(torch.uint8)
        .view(10, 3, 2, 2)
    )
    labels = torch.arange(10) * 10

    def order(**kw) -> list[int]:
        out = []
        for x, y in iterate_batches(images, labels, batch_size=4, **kw):
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            torch.testing.assert_close(x, images[y // 10].float() / 255)
            out.extend((y // 10).tolist())
        return out

    first = order(shuffle=True, seed=3, epoch=1)
    assert first == order(shuffle=True, seed=3, epoch=1)
    assert sorted(first) == list(range(10))
    assert first != order(shuffle=True, seed=3, epoch=2)
    assert first != order(shuffle=True, seed=4, epoch=1)
    assert order(shuffle=False) == list(range(10))
    assert order(shuffle=False, drop_last=True) == list(range(8))
    sizes = [len(y) for _, y in iterate_batches(images, labels, batch_size=4, shuffle=True)]
    assert sizes == [4, 4, 2]
    x, _ = next(iterate_batches(images, labels, batch_size=10, shuffle=False))
    assert x.shape == (10, 3, 2, 2) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    with pytest.raises(ValueError, match="labels"):
        iterate_batches(images, labels[:9], batch_size=4, shuffle=False)


def test_scheduler_warmup_peak_then_cosine_to_zero() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(optimizer, total_steps=20, warmup_steps=5)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert max(lrs) == pytest.approx(0.1) and lrs[5] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.05 * (1 + math.cos(math.pi * 5 / 15)))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
    no_warmup = build_scheduler(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), total_steps=4
    )
    assert no_warmup.get_last_lr() == pytest.approx([0.1])
    with pytest.raises(ValueError):
        build_scheduler(optimizer, total_steps=3, warmup_steps=4)


def test_nan_input_raises_before_step_and_keeps_weights() -> None:
    set_seed(0)
    images, labels = quadrant_data(96)
    model = tiny_cnn()
    optimizer = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.01)
    batches = list(iterate_batches(images, labels, batch_size=32, shuffle=False))
    batches[2][0][0, 0, 0, 0] = float("nan")
    snapshots: list[dict[str, torch.Tensor]] = []
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(
            model,
            batches,
            optimizer,
            None,
            epoch=3,
            on_step=lambda s, v: snapshots.append(params_of(model)),
        )
    err = info.value
    assert (err.epoch, err.step, len(snapshots)) == (3, 2, 2)
    assert math.isnan(err.loss)
    assert "epoch 3" in str(err) and "step 2" in str(err) and "checkpoint" in str(err)
    assert "lower the learning rate" in str(err)
    after = params_of(model)
    for key, value in snapshots[-1].items():  # parameters *and* BatchNorm statistics untouched
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.epoch, clone.step, str(clone)) == (3, 2, str(err))


def test_huge_lr_raises_with_last_good_weights() -> None:
    set_seed(0)
    images, labels = quadrant_data(256)
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e30)
    snapshots = [{k: v.detach().clone() for k, v in model.named_parameters()}]
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(
            model,
            iterate_batches(images, labels, batch_size=16, shuffle=True, epoch=1),
            optimizer,
            None,
            epoch=1,
            on_step=lambda s, v: snapshots.append(
                {k: p.detach().clone() for k, p in model.named_parameters()}
            ),
        )
    err = info.value
    assert err.epoch == 1 and 1 <= err.step < 16 and len(snapshots) == err.step + 1
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), snapshots[-1][name], rtol=0, atol=0, equal_nan=True)


def test_evaluate_matches_hand_computed_topk() -> None:
    logits = torch.tensor(
        [
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # y=0: top1
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # y=1: rank 5 -> top5 only
            [1.0, 0.0, 2.0, 0.5, 3.0, 4.0],  # y=1: rank 6 -> miss
            [0.0, 0.0, 9.0, 1.0, 2.0, 3.0],  # y=3: rank 4 -> top5
        ]
    )
    labels = torch.tensor([0, 1, 1, 3])
    batches = [(logits[:3].view(3, 6, 1, 1), labels[:3]), (logits[3:].view(1, 6, 1, 1), labels[3:])]
    model = nn.Flatten(1).train()
    metrics = evaluate(model, batches)
    hand_loss = (
        sum(
            math.log(sum(math.exp(v) for v in row)) - row[y]
            for row, y in zip(logits.tolist(), labels.tolist(), strict=True)
        )
        / 4
    )
    assert metrics == pytest.approx(
        {"loss": hand_loss, "top1": 0.25, "top5": 0.75, "examples": 4.0}
    )
    assert model.training  # mode restored
    # K=3 < 5: top5 is clipped to top3 = 1.0; ranks of the true class below are 1, 2, 3, 1
    three_logits = torch.tensor(
        [[5.0, 4.0, 3.0], [0.0, 1.0, 2.0], [1.0, 0.0, 2.0], [0.0, 0.5, 9.0]]
    )
    three = evaluate(
        model, [(three_logits.view(4, 3, 1, 1), torch.tensor([0, 1, 1, 2]))], topk=(1, 2, 5)
    )
    assert (three["top1"], three["top2"], three["top5"]) == (0.5, 0.75, 1.0)


def test_label_smoothing_changes_loss_as_expected() -> None:
    model = nn.Linear(1, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([2.0, 0.0, 0.0]))
    x, y = torch.zeros(2, 1), torch.tensor([0, 1])
    log_p = [
        2 - math.log(math.exp(2) + 2),
        -math.log(math.exp(2) + 2),
    ]  # log p(class 0), log p(class 1|2)
    mean_neg_log = -(log_p[0] + 2 * log_p[1]) / 3
    eps = 0.3
    hand = [(1 - eps) * -log_p[0] + eps * mean_neg_log, (1 - eps) * -log_p[1] + eps * mean_neg_log]
    for smoothing, expected in [(0.0, (-log_p[0] - log_p[1]) / 2), (eps, sum(hand) / 2)]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        result = train_one_epoch(
            model, [(x, y)], optimizer, None, epoch=0, label_smoothing=smoothing
        )
        assert result.loss == pytest.approx(expected, rel=1e-6)
        assert result.accuracy == 0.5


def test_custom_loss_fn_and_soft_targets() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    soft = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])  # argmax: 0, 0, 0

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()

    expected = float(loss_fn(model(x), soft).detach())
    result = train_one_epoch(
        model,
        [(x, soft)],
        torch.optim.SGD(model.parameters(), lr=0.0),
        None,
        epoch=0,
        loss_fn=loss_fn,
    )
    assert result.loss == pytest.approx(expected)
    assert result.accuracy == pytest.approx(2 / 3)


def test_amp_on_cpu_trains_in_bf16_close_to_float32(monkeypatch) -> None:
    images, labels = quadrant_data(64)
    results, dtypes = [], []
    for amp in (False, True):
        set_seed(0)
        model = tiny_cnn()
        hook = model.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
        optimizer = build_optimizer(model, "sgd", lr=0.05, weight_decay=0.0)
        batches = iterate_batches(images, labels, batch_size=32, shuffle=True)
        results.append(train_one_epoch(model, batches, optimizer, None, epoch=0, amp=amp).loss)
        hook.remove()
    assert set(dtypes[:2]) == {torch.float32} and set(dtypes[2:]) == {torch.bfloat16}
    assert results[0] != results[1] and math.isclose(results[0], results[1], rel_tol=0.05)

    # Whether a stage asks for it: CUDA follows its own flag; a CPU needs run.cpu_bf16 and native bf16.
    assert mixed_precision("cpu", cpu_bf16=False) is False
    assert mixed_precision("cpu", cpu_bf16=True) is native_cpu_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert native_cpu_bf16() is False and mixed_precision("cpu", cpu_bf16=True) is False
    assert mixed_precision("cuda", cuda=True) is True and mixed_precision("cuda", cuda=False) is False


def test_build_optimizer_groups_and_errors() -> None:
    model = tiny_cnn()
    model.stem[1][0].weight.requires_grad_(False)  # frozen first conv is left out
    optimizer = build_optimizer(model, "SGD", lr=0.1, weight_decay=1e-4)
    decay, no_decay = optimizer.param_groups
    assert (decay["group_name"], decay["weight_decay"], no_decay["weight_decay"]) == (
        "decay",
        1e-4,
        0.0,
    )
    # decayed: 2 remaining conv weights + head weight; not decayed: 3 BN (weight, bias) + head bias
    assert [tuple(p.shape) for p in decay["params"]] == [(8, 8, 3, 3), (16, 8, 3, 3), (4, 16)]
    assert len(no_decay["params"]) == 7 and all(p.ndim == 1 for p in no_decay["params"])
    assert optimizer.defaults["nesterov"] is True
    adamw = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, momentum=0.8)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.999)
    with pytest.raises(ValueError, match="sgd, adamw"):
        build_optimizer(model, "lamb", lr=0.1, weight_decay=0.0)


def test_early_stopping_and_state_round_trip() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    assert [stopper.step(v) for v in (1.0, 0.9, 0.95)] == [False, False, False]
    state = stopper.state_dict()
    assert state["best"] == 0.9 and state["best_epoch"] == 1 and state["num_bad_epochs"] == 1
    resumed = EarlyStopping(patience=2, min_delta=0.01)
    resumed.load_state_dict(state)
    for s in (stopper, resumed):
        assert s.step(0.895) is True  # within min_delta: second bad epoch
        assert (s.best, s.best_epoch, s.epochs_seen) == (0.9, 1, 4)
    maximise = EarlyStopping(patience=1, mode="max")
    assert [maximise.step(v) for v in (0.5, 0.6, float("nan"))] == [False, False, True]
    assert maximise.best_epoch == 1
    with pytest.raises(ValueError, match="mode"):
        maximise.load_state_dict(state)
    assert EarlyStopping(patience=0).step(1.0) is False


def test_set_seed_reproducible() -> None:
    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    set_seed(123)
    first = draw()
    set_seed(123)
    assert draw() == first


def test_warmup_plateau_reduces_on_stalls_and_its_state_travels_with_the_scheduler():
    from generalist.train import WarmupPlateau, plateau_epoch_end

    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)  # two groups, one lambda
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupPlateau(warmup_steps=2, factor=0.5, patience=2))
    lrs = []
    for _ in range(3):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1.0, 1.0, 1.0]                       # warm-up of 2 steps: 0.5, then 1.0 onwards
    plateau_epoch_end(sched, 1.0)
    plateau_epoch_end(sched, 0.9)
    plateau_epoch_end(sched, 0.95)                      # one epoch without improving: no change yet
    assert sched.lr_lambdas[0].scale == 1.0
    plateau_epoch_end(sched, 0.97)                      # the second one
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    state = sched.state_dict()
    opt2 = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                            {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1.0)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, WarmupPlateau(warmup_steps=2, factor=0.5, patience=2))
    sched2.load_state_dict(state)
    assert sched2.lr_lambdas[0].scale == 0.5 and sched2.lr_lambdas[0].best == 0.9
    with pytest.raises(ValueError, match="factor"):
        WarmupPlateau(factor=1.5)
