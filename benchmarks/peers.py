"""Section 6, peers: lorank beside what a user would pick instead, in the same run.

Four comparisons, each peer behind the ``peers`` extra (``pip install -e ".[peers]"``; the
ASVD peer, ``fasterai``, with ``pip install --no-deps fasterai``: its ``fastai`` dependency
pulls torchvision, and the decomposer needs only torch). A peer that is not installed is
skipped with a one-line note; CI's default run never needs one.

1. **Training from scratch** (``train``): GaLore (``galore-torch``) vs dense AdamW vs lorank
   ``factorized`` and ``dlrt`` on lorank's char transformer (4 blocks, d 128) on tiny
   Shakespeare, batch 32 × 128, every entry with the same seed, model init, data order,
   steps and schedule (10% linear warm-up, cosine to 0.1 × lr: GaLore's
   ``torchrun_main.py``). GaLore at its authors' settings scaled to this model (the
   README's LLaMA-60M command: rank 128 of d 512, i.e. d/4 = 32 here, ``update_proj_gap``
   200, ``galore_scale`` 0.25, lr 0.01, on the attention and MLP weights) and a sweep of rank
   (16, 64) and projection gap (50).
2. **Factorized layers** (``layers``): ``tltorch.FactorizedLinear`` (CP, Tucker, block-TT;
   ``factorized`` and ``reconstructed`` forward) vs ``LowRankLinear`` vs ``nn.Linear``, at
   the parameter count of ``LowRankLinear`` at rank 64: forward + backward time at batch
   256 and the measured peak. Each case runs in its own process under an address-space
   limit, so an allocation failure is caught and reported instead of taking the machine.
3. **Fine-tuning** (``finetune``): an MLP 784-500×4-10 pretrained on MNIST, fine-tuned on
   Fashion-MNIST for one epoch: full fine-tuning, head only, LoRA (``peft``, its defaults
   r 8, α 8, no dropout, on the four hidden layers, head trained; rank sweep 4–64), lorank
   OIALR (switched at the start, only S trained; at rank r, and at the authors' β = 0.1 from
   full rank) and DLRT (SVD of the pretrained weights; fixed and adaptive rank).
4. **Post-training compression** (``compress``): ``lorank compress --budget B`` (plain and
   activation-aware SVD, uniform and greedy allocation) vs fasterai's ``FC_Decomposer``
   (plain SVD, and its ASVD with calibration data) at the same per-layer budget, on the
   trained char transformer of (1) and the pretrained MLP of (3).

Each training entry runs in a fresh process (``python -m benchmarks.peers KIND SPEC``) so
its peak memory (``VmHWM`` above the process before the model existed, as in section 4) is
its own. Ratios are taken within this run: to dense, and to the best peer entry (the peer
setting with the best loss/accuracy in that comparison).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lorank
import lorank.methods as methods
from benchmarks import common
from benchmarks.memory import _current_rss_mb, _peak_rss_mb, _reset_peak
from lorank.data import DataConfig, load_dataset
from lorank.models import CharTransformerConfig, MLPConfig, build_model

# Peer -> module that must import, and how to install it.
PEERS = {
    "galore": ("galore_torch", 'pip install -e ".[peers]" (galore-torch)'),
    "tltorch": ("tltorch", 'pip install -e ".[peers]" (tensorly, tensorly-torch)'),
    "peft": ("peft", 'pip install -e ".[peers]" (peft)'),
    "fasterai": ("fasterai.misc.fc_decomposer", "pip install --no-deps fasterai"),
}
SUBSECTIONS = ("train", "layers", "finetune", "compress")
NEEDS = {"train": "galore", "layers": "tltorch", "finetune": "peft", "compress": "fasterai"}

BLOCK, LM_BATCH, LM_LR = 128, 32, 1e-3
LM_RANK = 32  # factorized / dlrt rank, and GaLore's d/4
FT_BATCH, FT_LR, FT_RANK = 256, 1e-3, 32
LAYER_BATCH, LAYER_RANK = 256, 64
MEMORY_LIMIT_GB = 8  # address-space limit of a layer-cost process
MAX_CASE_S = 10.0  # a layer-cost case stops timing after this many seconds


def installed() -> dict[str, str | None]:
    """Each peer: None when it imports, else the one-line reason and how to install it."""
    out: dict[str, str | None] = {}
    for peer, (module, how) in PEERS.items():
        try:
            importlib.import_module(module)
            out[peer] = None
        except Exception as e:  # ImportError, or a peer that fails at import time
            out[peer] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}; {how}"
    return out


def version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(module)
    except PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- helpers


def _lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    logits = model(batch[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


@torch.no_grad()
def _evaluate(model: nn.Module, batches: Iterator[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Mean loss and accuracy per sample (per token for the language model)."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        count += y.numel()
    model.train()
    return {"loss": loss_sum / count, "acc": correct / count}


def _endless(data: Any, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The training batches of every entry, in the same order for the same seed."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield from data.train_batches(g)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size() if value.dim() > 0 else 0
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    if hasattr(value, "ortho_matrix"):  # GaLore's projector keeps its basis in the state
        return _tensor_bytes(value.ortho_matrix)
    return 0


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(_tensor_bytes(v) for s in optimizer.state.values() for v in s.values())


def _trainable(optimizer: torch.optim.Optimizer) -> int:
    return sum(p.numel() for g in optimizer.param_groups for p in g["params"])


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> Any:
    """10% linear warm-up, then cosine to 0.1 × lr (GaLore's ``torchrun_main.py``)."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train(
    model: nn.Module,
    method: Any,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[Tensor, Tensor]],
    loss_fn: Any,
    steps: int,
    scheduler: Any = None,
) -> dict[str, Any]:
    """``steps`` steps through ``method.train_step``; step time, peak memory and state."""
    method.attach(loss_fn=loss_fn)
    times, last = [], 0.0
    for _ in range(steps):
        batch = next(batches)
        start = common.clock()
        stats = method.train_step(model, optimizer, batch, loss_fn)
        times.append(common.clock() - start)
        if scheduler is not None:
            scheduler.step()
        last = float(stats["loss_task"])
    grads = sum(_tensor_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    return {
        "train_loss": last,
        "step_ms": 1e3 * statistics.median(times[min(2, len(times) - 1) :]),
        "trainable": _trainable(optimizer),
        "optimizer_mb": _optimizer_bytes(optimizer) / 2**20,
        "grads_mb": grads / 2**20,
    }


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------- 1. train from scratch


def train_entries(quick: bool) -> list[dict[str, Any]]:
    """Dense, lorank's low-rank trainers and GaLore at its authors' settings plus a sweep."""
    galore = {"kind": "galore", "rank": LM_RANK, "gap": 200, "scale": 0.25, "lr": 1e-2}
    entries = [
        {"name": "dense AdamW", "kind": "lorank", "method": {"name": "dense"}, "lr": LM_LR},
        {
            "name": f"lorank factorized r{LM_RANK}",
            "kind": "lorank",
            "method": {"name": "factorized", "rank": LM_RANK},
            "lr": LM_LR,
        },
        {
            "name": f"lorank dlrt (BUG, τ 0.1, r0 {LM_RANK})",
            "kind": "lorank",
            "method": {"name": "dlrt", "init_rank": LM_RANK, "tolerance": 0.1},
            "lr": LM_LR,
        },
        {"name": f"GaLore r{LM_RANK} gap 200 (authors)", **galore, "recommended": True},
    ]
    if quick:
        return [entries[0], entries[1], entries[3]]
    entries += [
        {"name": "GaLore r16 gap 200", **galore, "rank": 16},
        {"name": "GaLore r64 gap 200", **galore, "rank": 64},
        {"name": f"GaLore r{LM_RANK} gap 50", **galore, "gap": 50},
    ]
    return entries


def _lm_data(data_dir: str | None, eval_batch: int = 64) -> Any:
    cfg = DataConfig(
        name="tinyshakespeare", batch_size=LM_BATCH, block_size=BLOCK, eval_batch_size=eval_batch
    )
    return load_dataset(cfg, data_dir=data_dir)


def _galore_optimizer(model: nn.Module, entry: dict[str, Any]) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW

    # As the authors' torchrun_main.py: the weights of the Linear layers in attention and MLP
    # blocks are projected; embeddings, norms, biases and the output head are plain AdamW.
    low_rank = [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (".attn." in name or name.split(".")[-1] in ("fc1", "fc2"))
    ]
    ids = {id(p) for p in low_rank}
    regular = [p for p in model.parameters() if id(p) not in ids]
    groups = [
        {"params": regular},
        {
            "params": low_rank,
            "rank": entry["rank"],
            "update_proj_gap": entry["gap"],
            "scale": entry["scale"],
            "proj_type": "std",
        },
    ]
    return GaLoreAdamW(groups, lr=entry["lr"], weight_decay=0.0)


def work_train(spec: dict[str, Any]) -> dict[str, Any]:
    entry, seed, steps = spec["entry"], spec["seed"], spec["steps"]
    if entry["kind"] == "galore":
        import galore_torch  # noqa: F401  (imported before the memory baseline)
    data = _lm_data(spec.get("data_dir"))
    before = _current_rss_mb()
    torch.manual_seed(seed)
    model = build_model(CharTransformerConfig(n_layer=4, n_head=4, d_model=128), data.info)
    if entry["kind"] == "galore":
        method = methods.build({"name": "dense"})
        method.prepare(model)
        optimizer = _galore_optimizer(model, entry)
    else:
        method = methods.build(entry["method"])
        method.prepare(model)
        optimizer = torch.optim.AdamW(method.parameters(model), lr=entry["lr"], weight_decay=0.0)
    _reset_peak()
    out = _train(
        model,
        method,
        optimizer,
        _endless(data, seed),
        _lm_loss,
        steps,
        _schedule(optimizer, steps),
    )
    out["peak_mb"] = _peak_rss_mb() - before
    out["val_loss"] = _evaluate(model, data.eval_batches("test"))["loss"]
    out["eval_params"] = _params(model)
    if spec.get("save"):
        torch.save(model.state_dict(), spec["save"])
    return out


# ------------------------------------------------------------------ 2. factorized layers


def layer_entries(widths: list[int]) -> list[dict[str, Any]]:
    out = []
    for width in widths:
        out += [{"width": width, "kind": "dense"}, {"width": width, "kind": "lorank"}]
        for factorization in ("cp", "tucker", "blocktt"):
            for implementation in ("factorized", "reconstructed"):
                out.append(
                    {
                        "width": width,
                        "kind": "tltorch",
                        "factorization": factorization,
                        "implementation": implementation,
                    }
                )
    return out


def _layer(spec: dict[str, Any]) -> nn.Module:
    width = spec["width"]
    if spec["kind"] == "dense":
        return nn.Linear(width, width)
    if spec["kind"] == "lorank":
        return lorank.LowRankLinear(width, width, rank=LAYER_RANK)
    import tltorch
    from tltorch.utils import get_tensorized_shape

    # The fraction of the dense weight that LowRankLinear holds at rank 64.
    fraction = (
        sum(p.numel() for p in lorank.LowRankLinear(width, width, rank=LAYER_RANK).parameters())
        - width
    ) / width**2
    shape_in, shape_out = get_tensorized_shape(width, width, order=3, min_dim=2, verbose=False)
    return tltorch.FactorizedLinear(
        shape_in,
        shape_out,
        factorization=spec["factorization"],
        rank=fraction,
        implementation=spec["implementation"],
    )


def work_layer(spec: dict[str, Any]) -> dict[str, Any]:
    limit = MEMORY_LIMIT_GB * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.manual_seed(0)
    x = torch.randn(LAYER_BATCH, spec["width"])
    before = _current_rss_mb()
    layer = _layer(spec)
    out: dict[str, Any] = {"params": _params(layer)}
    _reset_peak()
    times = []
    try:
        for _ in range(spec["warmup"] + spec["steps"]):
            start = common.clock()
            layer(x).square().mean().backward()
            times.append(common.clock() - start)
            layer.zero_grad(set_to_none=True)
            if sum(times) > MAX_CASE_S:  # a layer 100× slower than dense: a few steps tell
                break
    except (RuntimeError, MemoryError) as e:
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return out
    out["ms"] = 1e3 * statistics.median(times[spec["warmup"] :] or times)
    out["timed_steps"] = max(1, len(times) - spec["warmup"])
    out["peak_mb"] = _peak_rss_mb() - before
    return out


# ------------------------------------------------------------------------ 3. fine-tuning

HIDDEN = ["layers.0", "layers.2", "layers.4", "layers.6"]
HEAD = "layers.8"


def finetune_entries(quick: bool) -> list[dict[str, Any]]:
    lora = {"kind": "lora", "alpha": 8}
    entries = [
        {"name": "full fine-tune (dense)", "kind": "full"},
        {"name": "head only", "kind": "head"},
        {"name": "LoRA r8 α8 (peft defaults)", **lora, "rank": 8, "recommended": True},
        {
            "name": f"lorank oialr r{FT_RANK} (S only)",
            "kind": "lorank",
            "method": {"name": "oialr", "delay": 0, "frequency": 100, "cutoff": 0.1},
            "rank": FT_RANK,
        },
        {
            "name": f"lorank dlrt fixed r{FT_RANK}",
            "kind": "lorank",
            "method": {
                "name": "dlrt",
                "init": "svd",
                "adaptive": False,
                "init_rank": FT_RANK,
                "r_max": FT_RANK,
            },
        },
    ]
    if quick:
        return entries
    entries += [
        {"name": "LoRA r4 α8", **lora, "rank": 4},
        {"name": "LoRA r16 α8", **lora, "rank": 16},
        {"name": "LoRA r64 α8", **lora, "rank": 64},
        {
            "name": "lorank oialr r128 (S only)",
            "kind": "lorank",
            "method": {"name": "oialr", "delay": 0, "frequency": 100, "cutoff": 0.1},
            "rank": 128,
        },
        {
            "name": "lorank oialr full rank, β 0.1 (authors)",
            "kind": "lorank",
            "method": {"name": "oialr", "delay": 0, "frequency": 100, "cutoff": 0.1},
        },
        {
            "name": f"lorank dlrt adaptive τ 0.1, r0 {FT_RANK}",
            "kind": "lorank",
            "method": {"name": "dlrt", "init": "svd", "init_rank": FT_RANK, "tolerance": 0.1},
        },
    ]
    return entries


def _image_data(name: str, data_dir: str | None) -> Any:
    cfg = DataConfig(name=name, batch_size=FT_BATCH, eval_batch_size=2000)
    return load_dataset(cfg, data_dir=data_dir)


def _cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def work_pretrain(spec: dict[str, Any]) -> dict[str, Any]:
    """Dense MLP on MNIST for ``epochs`` epochs, saved for the fine-tuning entries."""
    data = _image_data("mnist", spec.get("data_dir"))
    torch.manual_seed(spec["seed"])
    model = build_model(MLPConfig(), data.info)
    method = methods.build({"name": "dense"})
    optimizer = torch.optim.Adam(model.parameters(), lr=FT_LR)
    steps = spec["epochs"] * data.num_train_batches
    _train(model, method, optimizer, _endless(data, spec["seed"]), _cross_entropy, steps)
    torch.save(model.state_dict(), spec["save"])
    target = _image_data("fashion-mnist", spec.get("data_dir"))
    return {
        "mnist_acc": _evaluate(model, data.eval_batches("test"))["acc"],
        "fashion_acc_before": _evaluate(model, target.eval_batches("test"))["acc"],
        "steps": steps,
    }


def work_finetune(spec: dict[str, Any]) -> dict[str, Any]:
    entry, seed = spec["entry"], spec["seed"]
    if entry["kind"] == "lora":
        import peft  # noqa: F401  (imported before the memory baseline)
    data = _image_data("fashion-mnist", spec.get("data_dir"))
    before = _current_rss_mb()
    model = build_model(MLPConfig(), data.info)
    model.load_state_dict(torch.load(spec["pretrained"], weights_only=True))
    torch.manual_seed(seed)
    method = methods.build({"name": "dense"})
    if entry["kind"] == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(HEAD))
    elif entry["kind"] == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=entry["rank"],
            lora_alpha=entry["alpha"],
            lora_dropout=0.0,
            target_modules=HIDDEN,
            modules_to_save=[HEAD],
        )
        model = get_peft_model(model, config)
    elif entry["kind"] == "lorank":
        method = methods.build(entry["method"])
        method.prepare(model)
        if "rank" in entry:  # OIALR switched at full rank: truncate to r (S only trained)
            for layer in lorank.low_rank_layers(model).values():
                layer.truncate(min(entry["rank"], layer.rank))
    optimizer = torch.optim.Adam(method.parameters(model), lr=FT_LR)
    steps = spec["epochs"] * data.num_train_batches
    _reset_peak()
    out = _train(model, method, optimizer, _endless(data, seed), _cross_entropy, steps)
    out["peak_mb"] = _peak_rss_mb() - before
    out.update({f"test_{k}": v for k, v in _evaluate(model, data.eval_batches("test")).items()})
    out["eval_params"] = _params(model)
    if entry["kind"] == "lora":
        out["eval_params_unmerged"] = out["eval_params"]
        out["eval_params"] = _params(model.merge_and_unload())
    return out


# ------------------------------------------------------------------------ 4. compression


def _lm_model(data: Any) -> nn.Module:
    return build_model(CharTransformerConfig(n_layer=4, n_head=4, d_model=128), data.info)


def work_compress_peer(spec: dict[str, Any]) -> dict[str, Any]:
    """fasterai's FC_Decomposer (plain SVD; ASVD with calibration) at a per-layer budget."""
    from fasterai.misc.fc_decomposer import FC_Decomposer

    if spec["model"] == "char_transformer":
        data = _lm_data(spec.get("data_dir"), eval_batch=64)
        model = _lm_model(data)
    else:
        data = _image_data("mnist", spec.get("data_dir"))
        model = build_model(MLPConfig(), data.info)
    model.load_state_dict(torch.load(spec["state"], weights_only=True))
    calibration = data.train_subset_batches(spec["samples"], batch_size=32)
    out: dict[str, Any] = {"before": _evaluate(model, data.eval_batches("test"))}
    out["params_before"] = _params(model)
    shapes = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for kind in ("svd", "asvd"):
        compressed = model
        try:
            # One call per weight shape (its layers share one rank fraction), so the ASVD
            # calibration pass runs a few times, not once per layer.
            groups: dict[tuple[int, int], list[str]] = {}
            for name in spec["layers"]:
                groups.setdefault(tuple(shapes[name]), []).append(name)
            for (m, n), names in groups.items():
                # keep B·mn parameters: rank L = B·mn/(m+n), as a fraction of min(m, n)
                keep = spec["budget"] * m * n / (m + n) / min(m, n)
                compressed = FC_Decomposer().decompose(
                    compressed,
                    percent_removed=max(0.0, 1.0 - keep),
                    data=calibration if kind == "asvd" else None,
                    n_batches=len(calibration),
                    layers=names,
                )
            result = _evaluate(compressed, data.eval_batches("test"))
            out[kind] = {**result, "params": _params(compressed)}
        except Exception as e:  # a peer failing on this model is a result, not a crash
            out[kind] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    return out


_COMPRESS_CONFIGS = {
    "char_transformer": (
        '[data]\nname = "tinyshakespeare"\nbatch_size = 32\nblock_size = 128\n'
        "eval_batch_size = 64\n\n"
        '[model]\nname = "char_transformer"\nn_layer = 4\nn_head = 4\nd_model = 128\n'
    ),
    "mlp": (
        '[data]\nname = "mnist"\nbatch_size = 256\neval_batch_size = 2000\n\n'
        '[model]\nname = "mlp"\n'
    ),
}


def _lorank_compress(
    state: Path, model: str, budget: float, svd: str, allocation: str, spec: dict[str, Any]
) -> dict[str, Any]:
    """``lorank compress`` on the command line, exactly as a user runs it."""
    tmp = Path(spec["tmp"])
    config = tmp / f"{model}.toml"
    config.write_text(_COMPRESS_CONFIGS[model])
    out = tmp / f"{model}-{budget}-{svd}-{allocation}"
    cmd = [
        *(sys.executable, "-m", "lorank", "compress", str(state)),
        *("--model-config", str(config), "--budget", str(budget), "--svd", svd),
        *("--allocation", allocation, "--samples", str(spec["samples"])),
        *("--out", str(out), "--overwrite", "--quiet"),
    ]
    if spec.get("data_dir"):
        cmd += ["--data-dir", spec["data_dir"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads") or 1)}
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        return {"error": (run.stderr.strip().splitlines() or ["?"])[-1][:200]}
    summary = json.loads((out / "summary.json").read_text())
    return {
        "loss": summary["test_loss_after"],
        "acc": summary["test_acc_after"],
        "loss_before": summary["test_loss_before"],
        "params": summary["params_eval_after"],
        "params_before": summary["params_eval_before"],
        "layers": [row["name"] for row in summary["layers"]],
        "seconds": seconds,
    }


# ------------------------------------------------------------------------------ driver


def _work(kind: str, spec: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """Run one case in a fresh process; its last stdout line is the JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.peers", kind, json.dumps(spec)]
    if threads:
        cmd.append(str(threads))
    clock = next(name for name, fn in common.CLOCKS.items() if fn is common.clock)
    env = {**os.environ, "LORANK_BENCH_CLOCK": clock}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        tail = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
        return {"error": f"process failed (exit {run.returncode}): {tail[:200]}"}
    return json.loads(lines[-1])


def run(
    quick: bool,
    threads: int | None,
    data_dir: str | None,
    steps: int | None = None,
    seeds: int = 1,
    subsections: list[str] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """The four comparisons; a missing peer skips its comparison with a note."""
    ok = installed()
    dists = ("galore-torch", "tensorly-torch", "peft", "fasterai")
    result: dict[str, Any] = {
        "installed": ok,
        "versions": {d: version(d) for d in dists},
        "skipped": {},
    }
    wanted = subsections or list(SUBSECTIONS)
    for part in wanted:
        peer = NEEDS[part]
        if ok[peer] is not None:
            result["skipped"][part] = f"{peer} not available: {ok[peer]}"
            print(f"  {part}: skipped, {result['skipped'][part]}", flush=True)
    run_ = {part: part in wanted and part not in result["skipped"] for part in SUBSECTIONS}
    with tempfile.TemporaryDirectory(prefix="lorank-peers-") as tmp:
        state, pretrained = Path(tmp) / "char_transformer.pt", Path(tmp) / "mlp.pt"

        def from_scratch() -> None:
            if run_["train"] or run_["compress"]:
                # Compression alone still needs the dense model that 6.1 trains.
                entries = train_entries(quick) if run_["train"] else train_entries(True)[:1]
                lm_steps = steps or (10 if quick else 200)
                rows = _run_train(entries, lm_steps, seeds, state, threads, data_dir, jobs)
                if run_["train"]:
                    result["train"] = _train_summary(rows)

        def the_rest() -> None:
            if run_["finetune"] or run_["compress"]:
                spec = {"seed": 0, "epochs": 1, "save": str(pretrained), "data_dir": data_dir}
                result["pretrain"] = _work("pretrain", spec, threads)
                print(f"  pretrained MLP on MNIST: {result['pretrain']}", flush=True)
            if run_["finetune"]:
                result["finetune"] = _run_finetune(
                    quick, seeds, pretrained, threads, data_dir, jobs
                )
            if run_["layers"]:
                widths = [1024] if quick else [1024, 4096]
                result["layers"] = _run_layers(widths, quick, threads)

        # With jobs > 1 the two run side by side (each case is still its own process).
        with ThreadPoolExecutor(2 if jobs > 1 else 1) as pool:
            for future in [pool.submit(from_scratch), pool.submit(the_rest)]:
                future.result()
        if run_["compress"]:
            states = {"char_transformer": state, "mlp": pretrained}
            result["compress"] = _compress(states, quick, threads, data_dir, tmp)
    return result


def _run_train(
    entries: list[dict[str, Any]],
    steps: int,
    seeds: int,
    state: Path,
    threads: int | None,
    data_dir: str | None,
    jobs: int,
) -> list[dict[str, Any]]:
    def one(seed: int, entry: dict[str, Any]) -> dict[str, Any]:
        dense = entry["kind"] == "lorank" and entry["method"]["name"] == "dense"
        spec = {
            "entry": entry,
            "seed": seed,
            "steps": steps,
            "data_dir": data_dir,
            "save": str(state) if seed == 0 and dense else None,
        }
        row = {"name": entry["name"], "seed": seed, "steps": steps}
        row.update(_work("train", spec, threads))
        row["peer"] = entry["kind"] == "galore"
        row["recommended"] = entry.get("recommended", False)
        print(_train_line(row), flush=True)
        return row

    print(_TRAIN_HEADER, flush=True)
    return _parallel(one, [(seed, e) for seed in range(seeds) for e in entries], jobs)


def _run_layers(widths: list[int], quick: bool, threads: int | None) -> list[dict[str, Any]]:
    rows = []
    print(_LAYER_HEADER, flush=True)
    for entry in layer_entries(widths):
        spec = {**entry, "steps": 2 if quick else 3, "warmup": 1}
        rows.append({**entry, **_work("layer", spec, threads)})
        print(_layer_line(rows[-1]), flush=True)
    _layer_ratios(rows)
    return rows


def _run_finetune(
    quick: bool,
    seeds: int,
    pretrained: Path,
    threads: int | None,
    data_dir: str | None,
    jobs: int,
) -> dict[str, Any]:
    def one(seed: int, entry: dict[str, Any]) -> dict[str, Any]:
        spec = {
            "entry": entry,
            "seed": seed,
            "epochs": 1,
            "pretrained": str(pretrained),
            "data_dir": data_dir,
        }
        row = {"name": entry["name"], "seed": seed}
        row.update(_work("finetune", spec, threads))
        row["peer"] = entry["kind"] == "lora"
        row["recommended"] = entry.get("recommended", False)
        print(_ft_line(row), flush=True)
        return row

    print(_FT_HEADER, flush=True)
    cases = [(seed, e) for seed in range(seeds) for e in finetune_entries(quick)]
    return _finetune_summary(_parallel(one, cases, jobs))


def _parallel(fn: Any, cases: list[tuple[Any, ...]], jobs: int) -> list[dict[str, Any]]:
    """``fn(*case)`` for every case, ``jobs`` processes at a time, results in case order.

    Each case is its own process with its own threads, so running two at once changes no
    figure but the wall clock (use ``--clock cpu`` for step times on a busy machine)."""
    if jobs <= 1:
        return [fn(*case) for case in cases]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda case: fn(*case), cases))


def _compress(
    states: dict[str, Path], quick: bool, threads: int | None, data_dir: str | None, tmp: str
) -> list[dict[str, Any]]:
    rows = []
    budgets = [0.5]
    samples = 256 if quick else 1024
    print(_COMPRESS_HEADER, flush=True)
    for model, state in states.items():
        if not state.exists():
            rows.append({"model": model, "error": "no trained model (its training failed)"})
            continue
        for budget in budgets:
            spec = {"samples": samples, "data_dir": data_dir, "tmp": tmp, "threads": threads}
            layers: list[str] = []
            for svd in ("plain", "activation"):
                for allocation in ("uniform", "greedy"):
                    r = _lorank_compress(state, model, budget, svd, allocation, spec)
                    layers = r.pop("layers", layers)
                    rows.append(
                        {
                            "model": model,
                            "budget": budget,
                            "name": f"lorank compress --svd {svd} --allocation {allocation}",
                            "peer": False,
                            **r,
                        }
                    )
                    print(_compress_line(rows[-1]), flush=True)
            peer = _work(
                "compress-peer",
                {
                    "model": model,
                    "state": str(state),
                    "budget": budget,
                    "layers": layers,
                    "samples": samples,
                    "data_dir": data_dir,
                },
                threads,
            )
            for kind, label in (("svd", "plain SVD"), ("asvd", "ASVD (data=calibration)")):
                row = {
                    "model": model,
                    "budget": budget,
                    "name": f"fasterai FC_Decomposer, {label}",
                    "peer": True,
                    **(peer.get(kind) or {"error": peer.get("error", "?")}),
                }
                if "before" in peer:
                    row["loss_before"] = peer["before"]["loss"]
                    row["params_before"] = peer["params_before"]
                rows.append(row)
                print(_compress_line(row), flush=True)
    return rows


# ---------------------------------------------------------------------- ratios, tables


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _std(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.stdev(values) if len(values) > 1 else None


_NUMERIC = (
    "val_loss",
    "test_loss",
    "test_acc",
    "train_loss",
    "step_ms",
    "trainable",
    "eval_params",
    "eval_params_unmerged",
    "optimizer_mb",
    "grads_mb",
    "peak_mb",
)


def _aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per entry: the mean over seeds (and the std of the quality metric)."""
    out = []
    for name in dict.fromkeys(r["name"] for r in rows):
        sub = [r for r in rows if r["name"] == name]
        agg: dict[str, Any] = {"name": name, "seeds": len(sub), "peer": sub[0]["peer"]}
        agg["recommended"] = sub[0]["recommended"]
        errors = [r["error"] for r in sub if "error" in r]
        if errors:
            agg["error"] = errors[0]
        for key in _NUMERIC:
            if any(key in r for r in sub):
                agg[key] = _mean(sub, key)
                agg[f"{key}_std"] = _std(sub, key)
        out.append(agg)
    return out


def _ratios(rows: list[dict[str, Any]], dense: str, quality: str, higher: bool) -> None:
    """``x_dense`` and ``x_peer`` (the best peer entry by ``quality``) for every axis."""
    ref = next((r for r in rows if r["name"] == dense and quality in r), None)
    peers = [r for r in rows if r["peer"] and r.get(quality) is not None]
    best = (max if higher else min)(peers, key=lambda r: r[quality]) if peers else None
    for r in rows:
        r["best_peer"] = best is r
        for key in (quality, "step_ms", "trainable", "eval_params", "optimizer_mb", "peak_mb"):
            if r.get(key) is None:
                continue
            for tag, base in (("dense", ref), ("peer", best)):
                if base is not None and base.get(key):
                    r[f"{key}_x_{tag}"] = r[key] / base[key]


def _train_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    agg = _aggregate(rows)
    _ratios(agg, "dense AdamW", "val_loss", higher=False)
    return {"runs": rows, "rows": agg}


def _finetune_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    agg = _aggregate(rows)
    _ratios(agg, "full fine-tune (dense)", "test_acc", higher=True)
    return {"runs": rows, "rows": agg}


def _layer_ratios(rows: list[dict[str, Any]]) -> None:
    for width in {r["width"] for r in rows}:
        sub = [r for r in rows if r["width"] == width]
        dense = next(r for r in sub if r["kind"] == "dense")
        ok = [r for r in sub if r["kind"] == "tltorch" and "ms" in r]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        for r in sub:
            r["name"] = (
                f"tltorch {r['factorization']} ({r['implementation']})"
                if r["kind"] == "tltorch"
                else {"dense": "nn.Linear", "lorank": f"LowRankLinear r{LAYER_RANK}"}[r["kind"]]
            )
            r["best_peer"] = best is r
            if "ms" in r and "ms" in dense:
                r["x_dense"] = r["ms"] / dense["ms"]
                r["peak_x_dense"] = r["peak_mb"] / max(dense["peak_mb"], 1e-9)
                if best is not None:
                    r["x_peer"] = r["ms"] / best["ms"]


_TRAIN_HEADER = (
    f"{'entry':<42} {'seed':>4} {'val loss':>9} {'ms/step':>8} {'trainable':>9} "
    f"{'opt MB':>7} {'peak MB':>8}"
)
_FT_HEADER = (
    f"{'entry':<42} {'seed':>4} {'test acc':>9} {'ms/step':>8} {'trainable':>9} "
    f"{'opt MB':>7} {'peak MB':>8}"
)
_LAYER_HEADER = f"{'width':>6} {'layer':<34} {'params':>9} {'ms':>9} {'peak MB':>8}"
_COMPRESS_HEADER = f"{'model':<17} {'B':>5} {'entry':<52} {'loss':>7} {'params':>8}"


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "–"


def _train_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['name']:<42} {r['seed']:>4} {r['error']}"
    return (
        f"{r['name']:<42} {r['seed']:>4} {r['val_loss']:>9.3f} {r['step_ms']:>8.1f} "
        f"{r['trainable']:>9} {r['optimizer_mb']:>7.2f} {r['peak_mb']:>8.1f}"
    )


def _ft_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['name']:<42} {r['seed']:>4} {r['error']}"
    return (
        f"{r['name']:<42} {r['seed']:>4} {r['test_acc']:>9.4f} {r['step_ms']:>8.1f} "
        f"{r['trainable']:>9} {r['optimizer_mb']:>7.2f} {r['peak_mb']:>8.1f}"
    )


def _layer_line(r: dict[str, Any]) -> str:
    name = r["kind"] + (
        f" {r['factorization']} {r['implementation']}" if "factorization" in r else ""
    )
    if "error" in r:
        return f"{r['width']:>6} {name:<34} {r.get('params', 0):>9} {r['error']}"
    return f"{r['width']:>6} {name:<34} {r['params']:>9} {r['ms']:>9.2f} {r['peak_mb']:>8.1f}"


def _compress_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['model']:<17} {r.get('budget', 0):>5} {r.get('name', ''):<52} {r['error']}"
    return f"{r['model']:<17} {r['budget']:>5} {r['name']:<52} {r['loss']:>7.4f} {r['params']:>8}"


def _x(r: dict[str, Any], key: str, tag: str) -> str:
    return _fmt(r.get(f"{key}_x_{tag}"), ".2f")


def _quality(r: dict[str, Any], key: str, spec: str) -> str:
    value = _fmt(r.get(key), spec)
    std = r.get(f"{key}_std")
    return value + (f" ± {std:{spec}}" if std is not None else "")


def _mark(r: dict[str, Any]) -> str:
    tags = [t for t, on in (("authors' setting", r.get("recommended")),) if on]
    if r.get("best_peer"):
        tags.append("best peer")
    return r["name"] + (f" ({', '.join(tags)})" if tags else "")


def markdown(section: dict[str, Any]) -> str:
    out = []
    versions = ", ".join(f"{k} {v}" for k, v in section.get("versions", {}).items() if v)
    out.append(f"Peers: {versions or 'none installed'}.\n")
    for name, why in section.get("skipped", {}).items():
        out.append(f"- **{name}** skipped: {why}")
    if section.get("skipped"):
        out.append("")
    train = section.get("train")
    if train:
        runs = train["runs"]
        out.append(
            f"**6.1 Training from scratch**: char transformer (4 × d 128, 826k parameters), "
            f"tiny Shakespeare, batch {LM_BATCH} × {BLOCK}, {runs[0]['steps']} steps, "
            f"{max(r['seed'] for r in runs) + 1} seed(s) (mean ± std), warm-up + cosine. "
            "× dense and × peer are ratios to dense AdamW and to the best GaLore entry "
            "(lowest validation loss) of this run.\n"
        )
        out.append(
            "| entry | val loss | × dense | × peer | trainable | eval params | optimizer MB "
            "| × dense | × peer | peak MB | × dense | × peer | ms/step | × dense | × peer |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in train["rows"]:
            if "error" in r and r.get("val_loss") is None:
                out.append(f"| {r['name']} | {r['error']} |" + " |" * 13)
                continue
            out.append(
                f"| {_mark(r)} | {_quality(r, 'val_loss', '.3f')} | {_x(r, 'val_loss', 'dense')} "
                f"| {_x(r, 'val_loss', 'peer')} | {r['trainable']:,.0f} | {r['eval_params']:,.0f} "
                f"| {r['optimizer_mb']:.2f} | {_x(r, 'optimizer_mb', 'dense')} "
                f"| {_x(r, 'optimizer_mb', 'peer')} | {r['peak_mb']:.0f} "
                f"| {_x(r, 'peak_mb', 'dense')} | {_x(r, 'peak_mb', 'peer')} "
                f"| {r['step_ms']:.0f} | {_x(r, 'step_ms', 'dense')} | {_x(r, 'step_ms', 'peer')} |"
            )
        out.append("")
    layers = section.get("layers")
    if layers:
        out.append(
            f"**6.2 Factorized layers**: one width × width layer, batch {LAYER_BATCH}, "
            f"forward + backward (no optimizer), tltorch layers at the parameter count of "
            f"LowRankLinear r{LAYER_RANK}; each case in its own process limited to "
            f"{MEMORY_LIMIT_GB} GiB of address space. × peer: to the fastest tltorch layer.\n"
        )
        out.append("| width | layer | params | ms | × dense | × peer | peak MB | × dense |")
        out.append("|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in layers:
            name = r["name"] + (" (best peer)" if r.get("best_peer") else "")
            if "error" in r:
                out.append(
                    f"| {r['width']} | {name} | {r.get('params', 0):,} | failed: "
                    f"{r['error'][:90]} | | | | |"
                )
                continue
            out.append(
                f"| {r['width']} | {name} | {r['params']:,} | {r['ms']:.1f} "
                f"| {_fmt(r.get('x_dense'), '.3f')} | {_fmt(r.get('x_peer'), '.3f')} "
                f"| {r['peak_mb']:.1f} | {_fmt(r.get('peak_x_dense'), '.2f')} |"
            )
        out.append("")
    ft = section.get("finetune")
    if ft:
        pre = section.get("pretrain", {})
        out.append(
            "**6.3 Fine-tuning**: MLP 784-500×4-10 pretrained one epoch on MNIST "
            f"(test accuracy {_fmt(pre.get('mnist_acc'), '.4f')}; on Fashion-MNIST before "
            f"fine-tuning {_fmt(pre.get('fashion_acc_before'), '.4f')}), fine-tuned one "
            f"epoch on Fashion-MNIST, Adam lr {FT_LR}, batch {FT_BATCH}, the head always "
            "trained. Eval params: the model as deployed (LoRA merged into the dense weights). "
            "× peer: to the best LoRA entry (highest accuracy).\n"
        )
        out.append(
            "| entry | test acc | × dense | × peer | trainable | × peer | eval params "
            "| × dense | optimizer MB | peak MB | × dense | × peer | ms/step | × dense | × peer |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in ft["rows"]:
            if "error" in r and r.get("test_acc") is None:
                out.append(f"| {r['name']} | {r['error']} |" + " |" * 13)
                continue
            out.append(
                f"| {_mark(r)} | {_quality(r, 'test_acc', '.4f')} | {_x(r, 'test_acc', 'dense')} "
                f"| {_x(r, 'test_acc', 'peer')} | {r['trainable']:,.0f} "
                f"| {_x(r, 'trainable', 'peer')} | {r['eval_params']:,.0f} "
                f"| {_x(r, 'eval_params', 'dense')} | {r['optimizer_mb']:.2f} "
                f"| {r['peak_mb']:.0f} | {_x(r, 'peak_mb', 'dense')} | {_x(r, 'peak_mb', 'peer')} "
                f"| {r['step_ms']:.1f} | {_x(r, 'step_ms', 'dense')} | {_x(r, 'step_ms', 'peer')} |"
            )
        out.append("")
    comp = section.get("compress")
    if comp:
        out.append(
            "**6.4 Post-training compression** at budget B (the fraction of the compressed "
            "layers' weights kept): `lorank compress --budget B` (its own test evaluation) vs "
            "fasterai's `FC_Decomposer` on the same layers, each at rank B·mn/(m+n) (a uniform "
            "budget), evaluated here. No fine-tuning. Char transformer: the dense model of "
            "6.1 (seed 0), test loss per token; MLP: the MNIST model of 6.3, test accuracy.\n"
        )
        out.append(
            "| model | B | entry | test loss | × uncompressed | × peer | test acc | params "
            "| × uncompressed |"
        )
        out.append("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        best: dict[tuple[str, float], float] = {}
        for r in comp:
            if r.get("peer") and "loss" in r:
                key = (r["model"], r["budget"])
                best[key] = min(best.get(key, math.inf), r["loss"])
        for r in comp:
            if "error" in r:
                out.append(
                    f"| {r['model']} | {r.get('budget', '')} | {r.get('name', '')} "
                    f"| failed: {r['error'][:100]} | | | | | |"
                )
                continue
            ratio = r["params"] / r["params_before"] if r.get("params_before") else None
            before = r["loss"] / r["loss_before"] if r.get("loss_before") else None
            peer = best.get((r["model"], r["budget"]))
            name = r["name"] + (" (best peer)" if r.get("peer") and r["loss"] == peer else "")
            out.append(
                f"| {r['model']} | {r['budget']} | {name} | {r['loss']:.4f} "
                f"| {_fmt(before, '.3f')} | {_fmt(r['loss'] / peer if peer else None, '.3f')} "
                f"| {_fmt(r.get('acc'), '.4f')} | {r['params']:,} | {_fmt(ratio, '.3f')} |"
            )
        out.append("")
    return "\n".join(out)


WORKERS = {
    "train": work_train,
    "layer": work_layer,
    "pretrain": work_pretrain,
    "finetune": work_finetune,
    "compress-peer": work_compress_peer,
}

if __name__ == "__main__":
    kind, spec_json = sys.argv[1], sys.argv[2]
    common.clock = common.CLOCKS[os.environ.get("LORANK_BENCH_CLOCK", "wall")]
    # Every worker imports the same peers first, so the memory baseline is the same for all.
    for module, _ in PEERS.values():
        try:
            importlib.import_module(module)
        except Exception:
            pass
    if len(sys.argv) > 3:
        torch.set_num_threads(int(sys.argv[3]))
    print(json.dumps(WORKERS[kind](json.loads(spec_json))))
