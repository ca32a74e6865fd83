"""The optimizer helper that every shape change goes through, and the LR schedules."""

import pytest
import torch
from torch import nn

from lorank import LowRankLinear
from lorank.core.optim import (
    OptimConfig,
    add_parameters,
    build_optimizer,
    build_scheduler,
    optimizer_holds_only,
    swap_parameters,
)


def step(layer, opt):
    opt.zero_grad()
    layer(torch.randn(8, 12)).pow(2).sum().backward()
    opt.step()


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_swap_resets_state_and_optimizer_keeps_working(name):
    layer = LowRankLinear(12, 10, 6, core="full")
    opt = build_optimizer(layer.parameters(), OptimConfig(name=name, momentum=0.9))
    step(layer, opt)
    mapping = layer.truncate(3)
    swap_parameters(opt, mapping)
    assert optimizer_holds_only(opt, layer)
    assert all(p not in opt.state for p in mapping)
    step(layer, opt)
    assert optimizer_holds_only(opt, layer)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in layer.parameters()}


def test_swap_with_transform_slices_state_and_keeps_step():
    layer = LowRankLinear(12, 10, 6, core="diag")
    opt = torch.optim.Adam(layer.parameters())
    step(layer, opt)
    old_s = layer.S
    exp_avg = opt.state[old_s]["exp_avg"].clone()
    keep = torch.tensor([0, 2, 4])
    mapping = layer.set_factors(layer.U[:, keep], layer.S[keep], layer.V[:, keep])
    swap_parameters(opt, mapping, transform=lambda key, v, old, new: v[..., keep])
    torch.testing.assert_close(opt.state[layer.S]["exp_avg"], exp_avg[keep])
    assert opt.state[layer.S]["step"] == 1
    assert optimizer_holds_only(opt, layer)
    step(layer, opt)


def test_frozen_or_removed_parameters_leave_the_optimizer():
    layer = LowRankLinear(12, 10, 6, core="full")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    step(layer, opt)
    layer.freeze_bases()
    mapping = layer.set_factors(layer.U.detach(), layer.S.detach(), layer.V.detach())
    swap_parameters(opt, mapping)
    held = {id(p) for p in opt.param_groups[0]["params"]}
    assert held == {id(layer.S), id(layer.bias)}
    swap_parameters(opt, {layer.bias: None})
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(layer.S)}
    add_parameters(opt, [layer.bias])
    assert len(opt.param_groups[0]["params"]) == 2


def test_transform_with_wrong_shape_is_caught():
    layer = LowRankLinear(12, 10, 6, core="diag")
    opt = torch.optim.Adam(layer.parameters())
    step(layer, opt)
    mapping = layer.truncate(3)
    with pytest.raises(ValueError, match="transformed"):
        swap_parameters(opt, mapping, transform=lambda key, v, old, new: v)


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
def test_schedules_with_warmup(schedule):
    p = nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(name="sgd", lr=1.0, schedule=schedule, warmup_steps=4, step_size=2, gamma=0.5)
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10, epochs=5)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    if schedule == "constant":
        assert lrs[-1] == 1.0
    elif schedule == "step":
        assert lrs[19] == 1.0 and lrs[20] == 0.5 and lrs[40] == 0.25
    else:
        assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
