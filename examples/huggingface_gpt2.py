"""A lorank method inside the Hugging Face ``Trainer``: a tiny GPT-2 trained with OIALR.

    pip install transformers accelerate
    python examples/huggingface_gpt2.py [--steps 40]

The model is converted before the Trainer is built (so the Trainer's optimizer holds the
low-rank factors); the callback then changes ranks in place in the Trainer's optimizer. With
methods that add loss terms (svd, nnsvd) use ``LowRankTrainer`` instead of ``Trainer``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from lorank.core.metrics import parameter_counts, ranks
from lorank.integrations.hf import LowRankTrainer, LowRankTrainerCallback


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        # a learnable sequence: each token is the previous one plus one
        start = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=64, n_positions=32)
    )
    before = parameter_counts(model)["params_train"]
    callback = LowRankTrainerCallback(
        {"name": "oialr", "delay": args.steps // 4, "frequency": args.steps // 8, "cutoff": 0.3},
        model,  # converted here, before the Trainer builds its optimizer
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = LowRankTrainer(
            lowrank=callback,
            model=model,
            args=TrainingArguments(
                output_dir=out,
                max_steps=args.steps,
                per_device_train_batch_size=16,
                learning_rate=3e-3,
                logging_steps=10,
                report_to=[],
                use_cpu=True,
                save_strategy="no",
            ),
            train_dataset=RandomTokens(512, 32, 64),
        )
        trainer.train()
    after = parameter_counts(model)["params_train"]
    print(f"trainable parameters {before:,} -> {after:,}; ranks {ranks(model)}")


if __name__ == "__main__":
    main()
