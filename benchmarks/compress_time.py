"""Wall time of post-training compression (issue 20's target: a ~20M-parameter model with 512
calibration sequences of 128 tokens compresses in ≤ 60 s on a 2-core CPU, before fine-tuning).

    python -m benchmarks.compress_time [--threads 2] [--sequences 512] [--quick]

The model is lorank's character transformer widened to ~20M parameters (6 blocks, d_model 512,
randomly initialised: the time does not depend on the weights), compressed in memory with
``CompressConfig(svd="activation", ranks=BudgetRanks(budget=0.5))`` (today's data-aware
default: calibration statistics, one SVD per layer, greedy allocation, truncation), and again
with ``error_propagation=True, refit=True``. Prints one JSON line per configuration with the
stage timings of :class:`lorank.compress.CompressionReport`, the process's CPU time and the
load average (the machine may be shared: a wall time above the target under load is not the
same miss as one on an idle machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from lorank.compress import BudgetRanks, CompressConfig, compress_model
from lorank.core.metrics import parameter_counts
from lorank.models import CharTransformer, CharTransformerConfig


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compress_time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="a 4-block, d_model 256 model")
    parser.add_argument("--propagation", action="store_true", help="also time +prop +refit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, layers = (256, 4) if args.quick else (512, 6)
    model = CharTransformer(
        CharTransformerConfig(n_layer=layers, n_head=8, d_model=d), 65, args.block
    ).eval()
    ids = torch.randint(0, 65, (args.sequences, args.block))
    batches = [(ids[i : i + 32],) for i in range(0, len(ids), 32)]
    configs = {
        "activation + greedy": CompressConfig(svd="activation", ranks=BudgetRanks(budget=0.5))
    }
    if args.propagation:
        configs["+ propagation + refit"] = CompressConfig(
            svd="activation", ranks=BudgetRanks(budget=0.5), error_propagation=True, refit=True
        )
    for name, config in configs.items():
        m = copy.deepcopy(model)
        load_before = os.getloadavg()[0]
        start, cpu_start = time.perf_counter(), time.process_time()
        report = compress_model(m, config, batches, progress=False)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        print(
            json.dumps(
                {
                    "config": name,
                    "params": parameter_counts(model)["params_eval"],
                    "params_after": report.params_after["params_eval"],
                    "sequences": args.sequences,
                    "block": args.block,
                    "threads": args.threads,
                    "seconds": round(seconds, 2),
                    # CPU time of this process and the machine's 1-minute load average before
                    # and after: on a shared machine the wall time says little without them.
                    "cpu_s": round(cpu, 2),
                    "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                    "timings": {k: round(v, 2) for k, v in report.timings.items()},
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
