"""FLOP counts of training steps and inference (lorank.core.flops, lorank.training.flops).

What is counted, precisely: matrix products and convolutions, forward and backward, one
multiply-add = 2 FLOPs (bias adds, activations, the loss and the optimizer update are not
counted). For ``Linear(n → m)`` on a batch of b: forward 2·m·n·b; backward 2·m·n·b for the
weight gradient plus 2·m·n·b for the input gradient, which autograd computes only when
something before the layer needs it (so 6·m·n·b for a hidden layer, 4·m·n·b for the first).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lorank.core.flops import FlopCounter, count_flops, qr_flops, svd_flops
from lorank.core.layers import LowRankLinear
from lorank.methods import build
from lorank.training.config import load_config
from lorank.training.evaluate import task_loss
from lorank.training.flops import INFERENCE_SAMPLES, FlopMeter, train_step_flops
from lorank.training.trainer import train

B = 32


def _batch(n_in: int, classes: int = 10, b: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, n_in, generator=g), torch.randint(0, classes, (b,), generator=g)


def _method(config: dict, model: nn.Module) -> tuple:
    method = build(config)
    method.attach(loss_fn=task_loss)
    method.prepare(model)
    optimizer = torch.optim.SGD(method.parameters(model), lr=0.01)
    return method, optimizer


def test_dense_linear_step_is_6mnb_and_4mnb_for_the_first_layer():
    n0, n, m = 48, 40, 24
    model = nn.Sequential(nn.Linear(n0, n), nn.ReLU(), nn.Linear(n, m))
    method, optimizer = _method({"name": "dense"}, model)
    flops, estimated = train_step_flops(method, model, optimizer, _batch(n0, m), task_loss)
    assert estimated == 0  # no decomposition in a dense step
    first = 4 * n0 * n * B  # forward 2·n0·n·b + weight gradient 2·n0·n·b; no input gradient
    hidden = 6 * n * m * B  # forward 2mnb + weight and input gradients 4mnb
    assert flops == pytest.approx(first + hidden, rel=0.01)
    assert flops == first + hidden  # nothing else (bias, ReLU, loss, SGD) is counted


def test_a_single_linear_whose_input_needs_a_gradient_counts_6mnb():
    n, m = 64, 32
    layer = nn.Linear(n, m)
    x = torch.randn(B, n, requires_grad=True)
    _, flops = count_flops(lambda: layer(x).square().sum().backward())
    assert flops == pytest.approx(6 * m * n * B, rel=0.01)


def test_rank_r_factorized_step_is_6r_m_plus_n_b():
    n0, n, m, r = 48, 40, 36, 5
    model = nn.Sequential(nn.Linear(n0, n), nn.ReLU(), LowRankLinear(n, m, r, core="none"))
    method, optimizer = _method({"name": "dense"}, model)  # trains the factors as they are
    flops, _ = train_step_flops(method, model, optimizer, _batch(n0, m), task_loss)
    assert flops == pytest.approx(4 * n0 * n * B + 6 * r * (m + n) * B, rel=0.01)


def _dlrt(integrator: str) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    config = {"name": "dlrt", "integrator": integrator, "adaptive": False, "init_rank": 8}
    method, optimizer = _method(config, model)
    return method, model, optimizer


def test_a_kls_step_counts_about_three_passes():
    batch = _batch(64)
    one_pass = {}
    steps = {}
    for integrator in ("parallel", "bug", "kls"):
        method, model, optimizer = _dlrt(integrator)
        with FlopCounter() as full:
            task_loss(model, batch).backward()  # one forward/backward of every parameter
        one_pass[integrator] = full.total
        with FlopCounter() as step:
            method.train_step(model, optimizer, batch, task_loss)
        steps[integrator] = (step.total, step.estimated)
    assert one_pass["parallel"] == one_pass["bug"] == one_pass["kls"]
    kls, kls_estimated = steps["kls"]
    # Three forwards and three backwards; each backward computes only the gradients its
    # sub-step needs (K: ∇U only, L: ∇V only, S: the rest), so a little under 3 full passes.
    assert 2.3 * one_pass["kls"] < kls - kls_estimated < 3.0 * one_pass["kls"]
    # The parallel integrator takes one pass (plus the K/L gradient products and the basis
    # work, ~0.7 pass at rank 8 of 64), the augmented BUG integrator a second, S-only pass at
    # the augmented point: measured 1.70, 2.06 and 2.66 passes for parallel, bug and kls.
    parallel, bug = steps["parallel"][0], steps["bug"][0]
    assert one_pass["kls"] < parallel < 1.9 * one_pass["kls"]
    assert parallel < bug < kls
    # The fixed-rank step's QRs (Cholesky QR: a Cholesky and a triangular solve) are estimated.
    assert kls_estimated > 0


def test_counts_follow_a_rank_change_and_a_mid_epoch_change_is_averaged():
    n0, n, m = 32, 40, 36

    def expected(r: int) -> float:
        return 4 * n0 * n * B + 6 * r * (m + n) * B

    model = nn.Sequential(nn.Linear(n0, n), nn.ReLU(), LowRankLinear(n, m, 8, core="none"))
    method, optimizer = _method({"name": "dense"}, model)
    meter = FlopMeter(method, task_loss, _batch(n0, m), _batch(n0, m)[0])

    def steps(k: int) -> None:
        for _ in range(k):
            meter.after_step(model, optimizer)

    meter.begin_epoch(model, optimizer)
    assert meter.step_flops == expected(8) and meter.counts == 1
    steps(10)  # a check after FIRST_CHECK = 8 steps finds no change: no count
    meter.end_epoch(model, optimizer)
    assert meter.total == 10 * expected(8) and meter.counts == 1

    def set_rank(r: int) -> None:
        layer = model[2]
        with torch.no_grad():
            layer.set_factors(layer.U[:, :r].clone(), None, layer.V[:, :r].clone())
        optimizer.param_groups[0]["params"] = list(model.parameters())

    set_rank(4)  # between epochs (e.g. pruning in on_epoch_end)
    meter.begin_epoch(model, optimizer)
    assert meter.step_flops == expected(4) and meter.counts == 2
    steps(3)
    set_rank(2)  # during the epoch (a rank-adaptive method)
    steps(5)  # the check at step 8 counts again; the 8 steps get the mean (trapezoid)
    assert meter.step_flops == expected(2) and meter.counts == 3
    steps(2)
    meter.end_epoch(model, optimizer)
    assert meter.total == 10 * expected(8) + 8 * (expected(4) + expected(2)) / 2 + 2 * expected(2)
    assert meter.record(model)["inference_flops"] == 2 * n0 * n + 2 * 2 * (m + n)

    # A resumed run's meter carries on exactly (the state goes through JSON).
    again = FlopMeter(method, task_loss, _batch(n0, m), None)
    again.load_state_dict(json.loads(json.dumps(meter.state_dict())))
    again.begin_epoch(model, optimizer)
    assert again.counts == 3 and again.total == meter.total  # same structure: no recount


def test_counting_leaves_the_run_untouched():
    method, model, optimizer = _dlrt("kls")
    # A scheduler wraps optimizer.step with a reference to this optimizer; the copy must
    # step itself (the wrapper would step the original, or nothing).
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    flops, _ = train_step_flops(method, model, optimizer, _batch(64), task_loss)
    assert flops > 0 and "step" in optimizer.__dict__  # the original keeps its wrapper
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert method.step == 0 and not optimizer.state


def test_decomposition_estimates():
    a, s = torch.randn(100, 20), torch.randn(20, 20)
    with FlopCounter() as counter:
        torch.linalg.qr(a)
        torch.linalg.svd(s, full_matrices=False)
    assert counter.total == counter.estimated == round(qr_flops(100, 20)) + round(svd_flops(20, 20))
    assert qr_flops(100, 20) == 4 * 20 * 20 * (100 - 20 / 3)
    assert svd_flops(20, 20) == 22 * 20**3
    assert svd_flops(1000, 20) == 6 * 1000 * 400 + 20 * 20**3  # R-SVD for tall matrices


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_cumulative_train_flops_and_inference_flops(tmp_path):
    hidden = [48, 32]
    overrides = [
        "data.name=synthetic",
        f"model.hidden={hidden}",
        "train.epochs=2",
        "data.batch_size=64",
        "train.threads=1",
    ]
    config = load_config(None, overrides)
    run = train(config, tmp_path / "dense", quiet=True)
    records = _records(run)
    summary = json.loads((run / "summary.json").read_text())
    n_in, classes = math.prod(config.data.synthetic_shape), config.data.synthetic_classes
    dims = [n_in, *hidden, classes]
    per_sample = sum(2 * a * b for a, b in zip(dims, dims[1:], strict=False))
    assert [r["inference_flops"] for r in records] == [per_sample] * 3
    steps = config.data.synthetic_train // 64
    step = 3 * per_sample * 64 - 2 * n_in * hidden[0] * 64  # no input gradient, first layer
    assert records[0]["train_flops"] == 0
    assert records[1]["train_flops"] == steps * step
    assert records[2]["train_flops"] == 2 * steps * step
    assert summary["train_flops"] == records[-1]["train_flops"]
    assert summary["inference_flops"] == per_sample
    assert summary["flop_count_s"] >= 0


@pytest.mark.slow
def test_an_adaptive_dlrt_run_recounts_as_its_ranks_change(tmp_path):
    overrides = [
        "data.name=synthetic",
        "model.hidden=[64, 64]",
        "train.epochs=3",
        "data.batch_size=64",
        "train.threads=1",
        "method.name=dlrt",
        "method.tolerance=0.3",
    ]
    config = load_config(None, overrides)
    run = train(config, tmp_path / "dlrt", quiet=True)
    records = _records(run)
    flops = [r["train_flops"] for r in records]
    assert flops == sorted(flops) and flops[0] > 0  # the conversion's QRs at epoch 0
    for r in records:
        # The final layer stays dense; the others cost 2·r·(m + n) per sample at their rank.
        dims = [math.prod(config.data.synthetic_shape), 64, 64, config.data.synthetic_classes]
        ranks = list(r["ranks"].values())
        low = sum(2 * k * (a + b) for k, a, b in zip(ranks, dims, dims[1:], strict=False))
        # DLRT's layers hold a full core S: each forward forms U·S (2·m·r² FLOPs) once for
        # the whole batch of INFERENCE_SAMPLES.
        core = sum(2 * b * k * k for k, b in zip(ranks, dims[1:], strict=False))
        expected = low + core / INFERENCE_SAMPLES + 2 * 64 * dims[-1]
        assert r["inference_flops"] == pytest.approx(expected, rel=1e-9)
    assert len({r["inference_flops"] for r in records}) > 1  # the ranks did change


def test_oialr_reports_its_switch_and_basis_updates_as_extra_flops():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 36), nn.ReLU(), nn.Linear(36, 10)
    )
    config = {"name": "oialr", "delay": 1, "frequency": 2, "cutoff": 0.0}
    method, optimizer = _method(config, model)
    batch = _batch(48)
    assert method.extra_flops() == 0
    method.train_step(model, optimizer, batch, task_loss)  # step 1: the switch (an SVD each)
    switch = method.extra_flops()
    assert switch >= svd_flops(40, 48) + svd_flops(36, 40)
    assert method.extra_flops() == 0  # reset by reading
    method.train_step(model, optimizer, batch, task_loss)  # step 2: no update
    assert method.extra_flops() == 0
    method.train_step(model, optimizer, batch, task_loss)  # step 3: a basis update
    assert method.extra_flops() >= svd_flops(40, 40) + svd_flops(36, 36)  # the r×r cores
    # A counted step that happens to rotate the bases is not charged that rotation (the
    # method reports it as extra_flops, added once): steps 4 and 5 cost the same.
    step4, _ = train_step_flops(method, model, optimizer, batch, task_loss)
    method.train_step(model, optimizer, batch, task_loss)  # step 4
    assert method.extra_flops() == 0
    step5, _ = train_step_flops(method, model, optimizer, batch, task_loss)  # rotates
    assert step5 == step4 < svd_flops(40, 40)
