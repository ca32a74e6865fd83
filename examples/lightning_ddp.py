"""A lorank method in a Lightning ``Trainer``, optionally on 2 CPU processes with DDP.

    python examples/lightning_ddp.py [--devices 2] [--method oialr|factorized|svd]

Needs ``pip install lightning``. Each process prints its final ranks and a parameter
checksum, so you can see that all processes ended with the same factors.
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lorank.core.metrics import parameter_counts, ranks
from lorank.integrations.lightning import LowRankCallback

METHODS = {
    "oialr": {"name": "oialr", "delay": 8, "frequency": 4, "cutoff": 0.3},
    "factorized": {"name": "factorized", "rank": 16},
    "svd": {"name": "svd", "rank": 32, "lambda_orth": 1.0, "lambda_sparsity": 0.01},
}


class Net(pl.LightningModule):
    def __init__(self, method: dict) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)
        )
        self.lowrank = LowRankCallback(method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, i: int) -> torch.Tensor:
        x, y = batch
        loss = self.lowrank.loss(self, F.cross_entropy(self(x), y))
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.lowrank.parameters(self), lr=3e-3)

    def on_train_end(self) -> None:
        total = sum(float(p.detach().double().sum()) for p in self.parameters())
        print(
            f"process {self.global_rank}: ranks {ranks(self)} checksum {total:.10f} "
            f"params {parameter_counts(self)['params_eval']}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--method", default="oialr", choices=METHODS)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 32, generator=g) * 2
    y = torch.randint(0, 8, (512,), generator=g)
    x = centers[y] + torch.randn(512, 32, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    pl.seed_everything(0, verbose=False)
    net = Net(METHODS[args.method])
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp_spawn" if args.devices > 1 else "auto",
        callbacks=[net.lowrank],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(net, loader)


if __name__ == "__main__":
    main()
