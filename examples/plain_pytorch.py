"""A lorank method in your own PyTorch loop: your model, your optimizer, your data.

    python examples/plain_pytorch.py [--method oialr|svd|factorized|dlrt] [--steps 300]

Methods with a one-pass step (factorized, svd, nnsvd, oialr) fit around your own
``backward``/``optimizer.step`` with ``LowRankHook``; methods that own their step (dlrt)
run through ``method.train_step``. Synthetic data, so it runs anywhere in seconds.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lorank.core.metrics import parameter_counts, ranks
from lorank.integrations import LowRankHook, owns_step
from lorank.methods import build

METHODS = {
    "oialr": {"name": "oialr", "delay": 100, "frequency": 50, "cutoff": 0.4},
    "svd": {"name": "svd", "rank": 32, "lambda_orth": 1.0, "lambda_sparsity": 0.01},
    "factorized": {"name": "factorized", "rank": 16},
    "dlrt": {"name": "dlrt", "adaptive": True, "tolerance": 0.1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="oialr", choices=METHODS)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    # Your data and model.
    centers = torch.randn(8, 32) * 2

    def batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 8, (n,))
        return centers[y] + torch.randn(n, 32), y

    model = nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 8)
    )
    criterion = nn.CrossEntropyLoss()

    method = build(METHODS[args.method])
    if owns_step(method):
        # The method runs forward, backward and the step itself.
        method.prepare(model)
        optimizer = torch.optim.Adam(method.parameters(model), lr=1e-3)
        loss_fn = lambda m, b: criterion(m(b[0]), b[1])  # noqa: E731
        for _ in range(args.steps):
            stats = method.train_step(model, optimizer, batch(), loss_fn)
        loss = float(stats["loss"])
    else:
        # Your loop, with three extra calls.
        hook = LowRankHook(method)
        hook.prepare(model)  # 1. convert, before building the optimizer
        optimizer = torch.optim.AdamW(hook.parameters(model), lr=1e-3)
        for _ in range(args.steps):
            x, y = batch()
            optimizer.zero_grad()
            loss_t = hook.loss(model, criterion(model(x), y))  # 2. add the method's terms
            loss_t.backward()
            optimizer.step()
            hook.after_optimizer_step(model, optimizer)  # 3. rank/basis updates, in place
        hook.epoch_end(model, optimizer, epoch=1)
        loss = float(loss_t.detach())

    x, y = batch(1000)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    counts = parameter_counts(model)
    print(f"{args.method}: loss {loss:.3f}  acc {acc:.3f}  ranks {ranks(model)}")
    print(f"params {counts['params_eval']:,} of {counts['params_dense']:,} dense")


if __name__ == "__main__":
    main()
