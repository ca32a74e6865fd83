"""lorank methods inside other people's loops: plain PyTorch, Hugging Face, Lightning."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_mlp
from torch import nn

from lorank.core.metrics import parameter_counts, ranks
from lorank.core.optim import optimizer_holds_only
from lorank.errors import LorankError
from lorank.integrations import LowRankHook, owns_step
from lorank.methods import build

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def blobs(n: int = 256, d: int = 16, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, d, generator=g), y


def mlp() -> nn.Module:
    return make_mlp(16, 64, 64, 4)


def test_hook_in_own_loop_equals_method_train_step():
    """The documented own-backward sequence is the method's default step, to the bit."""
    x, y = blobs()
    cfg = {"name": "svd", "rank": 16, "lambda_orth": 1.0, "lambda_sparsity": 0.01}
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    results = []
    for own_loop in (True, False):
        model, method = mlp(), build(cfg)
        hook = LowRankHook(method)
        hook.prepare(model)
        opt = torch.optim.Adam(hook.parameters(model), lr=1e-2)
        for i in range(0, 256, 32):
            batch = (x[i : i + 32], y[i : i + 32])
            if own_loop:
                opt.zero_grad()
                loss = hook.loss(model, loss_fn(model, batch))
                loss.backward()
                opt.step()
                hook.after_optimizer_step(model, opt)
            else:
                method.train_step(model, opt, batch, loss_fn)
        hook.epoch_end(model, opt, 1)
        assert set(hook.terms) <= {"orth", "sparsity"}
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hook_refuses_methods_that_own_their_step():
    method = build({"name": "dlrt"})
    assert owns_step(method) and not owns_step(build({"name": "oialr"}))
    with pytest.raises(LorankError, match="train_step"):
        LowRankHook(method).prepare(mlp())


def test_oialr_rank_changes_update_the_users_optimizer_in_place():
    x, y = blobs()
    model = mlp()
    hook = LowRankHook({"name": "oialr", "delay": 4, "frequency": 2, "cutoff": 0.3})
    hook.prepare(model)
    opt = torch.optim.AdamW(hook.parameters(model), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)
    seen = []
    for _ in range(3):
        for i in range(0, 256, 32):
            opt.zero_grad()
            hook.loss(
                model, nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            ).backward()
            opt.step()
            sched.step()
            hook.after_optimizer_step(model, opt)
            assert optimizer_holds_only(opt, model)
            seen.append(parameter_counts(model)["params_train"])
    assert seen[-1] < seen[0] / 2  # after the switch only the cores S train
    assert ranks(model) and min(ranks(model).values()) < 64


def test_plain_pytorch_example_runs():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_pytorch.py"), "--steps", "30"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "params" in done.stdout


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="no transformers")
def test_hf_callback_shrinks_a_tiny_gpt2():
    """Drive the callback with the Trainer's event order (``Trainer`` itself needs accelerate)."""
    from transformers import GPT2Config, GPT2LMHeadModel, TrainerControl, TrainerState
    from transformers.trainer_callback import CallbackHandler

    from lorank.integrations.hf import LowRankTrainerCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    )
    dense = parameter_counts(model)["params_train"]
    callback = LowRankTrainerCallback(
        {"name": "oialr", "delay": 3, "frequency": 2, "cutoff": 0.3}, model
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    handler = CallbackHandler([callback], model, None, optimizer, None)
    state, control = TrainerState(), TrainerControl()
    handler.on_train_begin(None, state, control)
    x = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    losses, counts = [], []
    for _ in range(10):
        handler.on_step_begin(None, state, control)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        handler.on_pre_optimizer_step(None, state, control)
        optimizer.step()
        handler.on_optimizer_step(None, state, control)
        optimizer.zero_grad()
        handler.on_step_end(None, state, control)
        losses.append(float(loss.detach()))
        counts.append(parameter_counts(model))
        assert optimizer_holds_only(optimizer, model)
    state.epoch = 1.0
    handler.on_epoch_end(None, state, control)
    logs: dict = {}
    handler.on_log(None, state, control, logs=logs)
    assert counts[-1]["params_train"] < dense / 2  # only the cores train after the switch
    evals = [c["params_eval"] for c in counts[3:]]
    assert evals == sorted(evals, reverse=True) and evals[-1] < evals[0]  # ranks only fall
    assert logs["lorank_params"] == counts[-1]["params_eval"]
    assert logs["lorank_params_train"] == counts[-1]["params_train"]
    layer_ranks = {k.split("/", 1)[1]: v for k, v in logs.items() if k.startswith("lorank_rank/")}
    assert layer_ranks == {k: float(v) for k, v in ranks(model).items()} and layer_ranks
    assert losses[-1] < losses[0]


@pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="the HF Trainer needs accelerate"
)
def test_real_hf_trainer_with_oialr_shrinks_and_learns(tmp_path):
    """The example, end to end: transformers' own Trainer, its optimizer changed in place."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "huggingface_gpt2.py"), "--steps", "12"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("trainable parameters")][-1]
    before, after = (int(v.replace(",", "")) for v in line.split(";")[0].split()[-3::2])
    assert after < before / 2


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="no transformers")
def test_hf_callback_refuses_an_unconverted_model():
    from transformers import TrainerControl, TrainerState

    from lorank.integrations.hf import LowRankTrainerCallback

    callback = LowRankTrainerCallback({"name": "oialr"})
    with pytest.raises(LorankError, match="before"):
        callback.on_train_begin(None, TrainerState(), TrainerControl())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning not installed")
def test_lightning_callback_ddp_spawn_two_processes_agree_through_rank_changes():
    """``strategy="ddp_spawn", accelerator="cpu", devices=2`` with OIALR (ranks change every
    4 steps); ``LORANK_DEBUG_DDP=1`` compares every parameter across processes each step."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "lightning_ddp.py"), "--devices", "2", "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LORANK_DEBUG_DDP": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The two processes print concurrently, so their lines may run together: split on the
    # "process N:" markers, not on newlines.
    lines = sorted(re.findall(r"process \d+: ranks .*? params \d+", done.stdout))
    assert len(lines) == 2, done.stdout[-2000:]
    assert lines[0].split(":", 1)[1] == lines[1].split(":", 1)[1]  # same ranks and checksum
    final = ast.literal_eval(lines[0].split("ranks ", 1)[1].split(" checksum")[0])
    assert final["net.2"] < 64  # OIALR truncated the 64×64 layer while training


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning not installed")
def test_lightning_callback_logs_ranks_and_parameter_counts(tmp_path):
    import sys as _sys

    _sys.path.insert(0, str(EXAMPLES))
    try:
        import lightning.pytorch as pl
        from lightning_ddp import Net
        from torch.utils.data import DataLoader, TensorDataset
    finally:
        _sys.path.pop(0)

    torch.manual_seed(0)
    x, y = torch.randn(64, 32), torch.randint(0, 8, (64,))
    net = Net({"name": "oialr", "delay": 2, "frequency": 2, "cutoff": 0.3})
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        callbacks=[net.lowrank],
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(net, DataLoader(TensorDataset(x, y), batch_size=16))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged["lorank/params_eval"] == parameter_counts(net)["params_eval"]
    assert logged["lorank/params_train"] == parameter_counts(net)["params_train"]
    assert {k.split("/", 2)[2]: v for k, v in logged.items() if k.startswith("lorank/rank/")} == {
        k: float(v) for k, v in ranks(net).items()
    }
