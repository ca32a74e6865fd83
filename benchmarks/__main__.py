"""The benchmark suite: what low-rank training buys in time and memory, measured in one run.

    python -m benchmarks                      # every section (about 30 min on a 2-core CPU)
    python -m benchmarks --quick              # small sizes, few steps: a smoke run
    python -m benchmarks --sections layer step --threads 2
    python -m benchmarks --sections peers --threads 1   # versus GaLore, tltorch, LoRA, ASVD
    python -m benchmarks --device cuda        # the same sections on a GPU (CUDA synchronised
                                              # around every timing; results-cuda files)

Sections: ``layer`` (one layer's training step per method vs dense, beside the FLOP ratio),
``step`` (whole-model steps: MNIST MLP, LeNet-5, VGG on CIFAR-10 shapes, MLP width 4096),
``tta`` (time to 97%/98% MNIST test accuracy, data loading alone), ``memory`` (training state
and measured peak at width 4096), ``inference`` (latency/throughput, dense vs low-rank vs
merged), ``zoo`` (latency-aware conversion vs dense, forward and training step, for every
model of ``lorank.models`` at the ranks and budgets it accepts), and, only when asked for,
``peers`` (lorank beside GaLore, tensorly-torch, LoRA via peft and fasterai's ASVD; each needs
the ``peers`` extra and is skipped with a note when missing). Every figure is a ratio measured
in the same run, never a timed test assertion.

Results go to ``benchmarks/results/<UTC date>.json``; a full (non ``--quick``) run also
rewrites ``benchmarks/results/latest.md``, the committed summary with the targets checked
(``benchmarks/results/peers.md`` for the peers section). With ``--device cuda`` the files are
``<UTC date>-cuda.json`` and ``latest-cuda.md``, beside the CPU ones. The peers section runs
on the CPU whatever ``--device`` says.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks import (
    common,
    inference,
    layer_cost,
    memory,
    peers,
    step_cost,
    time_to_accuracy,
    zoo_latency,
)
from benchmarks.common import environment

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SECTIONS = ("layer", "step", "tta", "memory", "inference", "zoo")
SECTIONS = (*DEFAULT_SECTIONS, "peers")  # peers: only on request (optional dependencies)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS))
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device the sections run on: cpu (default), cuda, cuda:1, ...",
    )
    parser.add_argument("--data-dir", help="dataset root (else $LORANK_DATA, ~/.cache/lorank)")
    parser.add_argument("--steps", type=int, help="timed steps per case (median)")
    parser.add_argument(
        "--clock",
        choices=tuple(common.CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--peers-steps", type=int, help="peers: training steps from scratch (default 200)"
    )
    parser.add_argument(
        "--peers-seeds", type=int, default=1, help="peers: seeds per entry (mean ± std)"
    )
    parser.add_argument(
        "--peers-jobs", type=int, default=1, help="peers: training processes at a time"
    )
    parser.add_argument(
        "--peers-only",
        nargs="+",
        choices=peers.SUBSECTIONS,
        help="peers: run only these comparisons",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = check_device(parser, args.device, args.clock)
    common.clock = common.CLOCKS[args.clock]
    steps = args.steps or (3 if args.quick else 10)
    warmup = 1 if args.quick else 2
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "clock": args.clock,
        "device": str(device),
        "environment": environment(),
        "sections": {},
        "section_env": {},
    }
    print(f"environment: {results['environment']}")
    started = time.perf_counter()
    for section in args.sections:
        print(f"\n== {section} ==", flush=True)
        t0 = time.perf_counter()
        results["sections"][section] = run_section(section, args, device, steps, warmup)
        results["section_env"][section] = {
            "device": "cpu" if section == "peers" else str(device),
            "threads": torch.get_num_threads(),
            "clock": args.clock,
            "wall_s": time.perf_counter() - t0,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        print(f"({section}: {time.perf_counter() - t0:.0f} s)", flush=True)
    results["wall_s"] = time.perf_counter() - started
    results["targets"] = targets(results["sections"])
    print("\n== targets ==")
    for line in results["targets"]:
        print(f"{line['status']:>7}  {line['target']}: {line['measured']}")
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    stamp = results["date"][:10] + suffix + ("-quick" if args.quick else "")
    path = args.out / f"{stamp}.json"
    if path.exists():
        # Sections run separately on the same day add up to one result (each keeps its own
        # environment: threads, clock).
        earlier = json.loads(path.read_text())
        for name, section in earlier.get("sections", {}).items():
            results["sections"].setdefault(name, section)
            results["section_env"].setdefault(name, earlier["section_env"].get(name, {}))
        results["targets"] = targets(results["sections"])
    path.write_text(json.dumps(results, indent=1))
    if not args.quick and "peers" in args.sections:
        # The peers have their own summary, so a peers-only run leaves latest.md alone.
        (args.out / "peers.md").write_text(render_peers(results))
        print(f"\nwrote {args.out / 'peers.md'}")
    if not args.quick and set(args.sections) & set(DEFAULT_SECTIONS):
        latest = args.out / f"latest{suffix}.md"
        latest.write_text(render_markdown(results))
        print(f"\nwrote {latest}")


def check_device(parser: argparse.ArgumentParser, name: str, clock: str) -> torch.device:
    """The ``--device``, refused with a one-line error when it is not usable here."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        parser.error(f"--device {name!r}: {e}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {name}: CUDA is not available in this torch build/machine")
        if clock == "cpu":
            parser.error("--clock cpu counts host CPU time only; use --clock wall on CUDA")
    elif device.type != "cpu":
        parser.error(f"--device {name}: the suite runs on cpu or cuda")
    return device


def run_section(
    section: str, args: argparse.Namespace, device: torch.device, steps: int, warmup: int
) -> Any:
    quick = args.quick
    if section == "layer":
        print(layer_cost.HEADER)
        widths = [512] if quick else [512, 2048, 4096]
        ranks = [16, 64] if quick else [16, 64, 128, 256]
        return layer_cost.run(widths, ranks, steps, warmup, device)
    if section == "step":
        print(step_cost.HEADER)
        models = ["mlp-500x4", "lenet5"] if quick else list(step_cost.MODELS)
        return step_cost.run(models, steps, warmup, device, args.data_dir)
    if section == "tta":
        print(time_to_accuracy.HEADER)
        methods = ["dense", "dlrt"] if quick else list(time_to_accuracy.METHODS)
        rows, data_s = time_to_accuracy.run(
            methods, 1 if quick else None, args.threads, args.data_dir, device
        )
        return {"rows": rows, "data_epoch_s": data_s}
    if section == "memory":
        print(memory.HEADER)
        return memory.run(512 if quick else 4096, 64, args.threads, device)
    if section == "inference":
        print(inference.HEADER)
        return inference.run(steps * 10, device, quick)
    if section == "zoo":
        print(zoo_latency.HEADER)
        return zoo_latency.run(device, quick, repeats=args.steps)
    if section == "peers":
        return peers.run(
            quick,
            args.threads,
            args.data_dir,
            args.peers_steps,
            args.peers_seeds,
            args.peers_only,
            args.peers_jobs,
        )
    raise ValueError(section)


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def targets(sections: dict[str, Any]) -> list[dict[str, str]]:
    """The issue's targets, checked against this run's numbers (skipped if not measured)."""
    out: list[dict[str, str]] = []

    def check(target: str, ok: bool | None, measured: str) -> None:
        status = "n/a" if ok is None else ("met" if ok else "MISSED")
        out.append({"target": target, "status": status, "measured": measured})

    step = sections.get("step", [])

    def speedup_target(model: str, target: str, limit: float) -> None:
        dense = _find(step, model=model, variant="dense")
        fact = _find(step, model=model, variant="factorized")
        if dense and fact:
            speedup = dense["ms"] / fact["ms"]
            check(target, speedup >= limit, f"{speedup:.2f}x")

    speedup_target(
        "mlp-4096x4", "MLP width 4096 rank 64: factorized step >= 15x faster than dense", 15
    )
    layer = sections.get("layer", [])
    # The targets: at width >= 2048 and rank <= 64, parallel (one pass) <= 1.3x and
    # bug (two passes) <= 2.2x a factorized step, kls (three passes) <= 3.5x.
    for variant, limit in (("dlrt-parallel", 1.3), ("dlrt-bug", 2.2), ("dlrt-kls", 3.5)):
        for mode in ("fixed", "adaptive"):
            ratios = []
            for r in layer:
                if r["variant"] == f"{variant}-{mode}":
                    f = _find(layer, width=r["width"], rank=r["rank"], variant="factorized")
                    ratios.append((r["ms"] / f["ms"], r["width"], r["rank"]))
            scope = [x for x in ratios if x[1] >= 2048 and x[2] <= 64]
            if scope:
                worst = max(scope)
                check(
                    f"{variant}-{mode} step <= {limit}x factorized (width >= 2048, rank <= 64)",
                    worst[0] <= limit,
                    f"worst {worst[0]:.2f}x (width {worst[1]}, rank {worst[2]}); "
                    f"worst at any size: {max(ratios)[0]:.2f}x",
                )
    dense = _find(step, model="lenet5-paper", variant="dense")
    par = _find(step, model="lenet5-paper", variant="dlrt-parallel-adaptive")
    if dense and par:
        ratio = par["ms"] / dense["ms"]
        check(
            "paper LeNet-5, batch 128: dlrt-parallel step <= 1.5x dense",
            ratio <= 1.5,
            f"{ratio:.2f}x",
        )
    small = [
        r
        for r in layer
        if r["width"] >= 2048 and r["rank"] <= 0.1 * r["width"] and r["variant"] != "dense"
    ]
    if small:
        slowest = max(small, key=lambda r: r["x_dense"])
        check(
            "every method faster than dense at r/n <= 10%, width >= 2048",
            slowest["x_dense"] < 1.0,
            f"slowest {slowest['variant']} at width {slowest['width']} rank "
            f"{slowest['rank']}: {slowest['x_dense']:.3f}x dense",
        )
    speedup_target("vgg", "VGG CIFAR-10, convs at 1/4 rank: step >= 1.8x faster than dense", 1.8)
    speedup_target(
        "vgg-cl",
        "VGG CIFAR-10 in channels_last (dense too), convs at 1/4 rank: step >= 1.8x faster",
        1.8,
    )
    zoo = sections.get("zoo", [])
    if zoo:
        w = zoo_latency.worst(zoo)
        measured = [r for r in zoo if r.get("status") == "measured"]
        above = sum(r["x_dense"] > 1.0 for r in measured)
        noisy = sum(r["x_dense"] > 1.05 for r in measured)
        refused = sum(r.get("status") == "refused" for r in zoo)
        check(
            "latency-aware conversion never slower than dense (every zoo model, every rank and "
            "budget it accepts, forward and training step)",
            None if w is None else w["x_dense"] <= 1.0,
            "no case measured"
            if w is None
            else f"worst {w['x_dense']:.3f}x ({w['model']}, {w['mode']}, {w['case']}); "
            f"{above} of {len(measured)} measured cases above 1.0x, {noisy} above 1.05x; "
            f"{len(zoo) - len(measured) - refused} unchanged, {refused} refused",
        )
        lenet = [
            r
            for r in zoo
            if r["model"] == "lenet5" and r["case"] == "rank 0.25" and r.get("x_dense")
        ]
        if lenet:
            slow = max(lenet, key=lambda r: r["x_dense"])
            check(
                "LeNet-5 rank 1/4, latency-aware conversion: <= 1.0x dense (forward and step)",
                slow["x_dense"] <= 1.0,
                ", ".join(f"{r['mode']} {r['x_dense']:.3f}x" for r in lenet),
            )
    tta = sections.get("tta")
    if tta:
        d = _find(tta["rows"], method="dense")
        if d:
            check(
                "MNIST MLP dense epoch <= 4 s at batch 256",
                d["epoch_s"] <= 4,
                f"{d['epoch_s']:.2f} s",
            )
            share = tta["data_epoch_s"] / d["epoch_s"]
            check("data loading <= 5% of the epoch", share <= 0.05, f"{100 * share:.1f}%")
    return out


def render_markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    s = results["sections"]
    lines = [
        "# Benchmark results (latest full run)",
        "",
        f"`python -m benchmarks --device {results.get('device', 'cpu')}`, torch "
        f"{env['torch']}, {env['processor']}, {env['cpu_count']} CPUs"
        + (f", {env['cuda']}" if env.get("cuda") else "")
        + ", float32. Each section says its device, threads, clock and date; "
        "every ratio is measured within one section's run, never across runs.",
        "",
        "## Targets",
        "",
        "| target | status | measured |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['status']} | {t['measured']} |" for t in results["targets"]]
    titles = {
        "layer": "1. Layer cost (one Linear layer, batch 256, Adam)",
        "step": "2. Training-step cost",
        "tta": "3. Time to accuracy (MNIST, 784-500×4-10)",
        "memory": "4. Training memory (MLP 784-4096×4-10, rank 64, batch 256)",
        "inference": "5. Inference",
        "zoo": "6. Never slower: latency-aware conversion vs dense, every zoo model",
    }
    for name, title in titles.items():
        if name not in s:
            continue
        e = results["section_env"].get(name, {})
        env_line = (
            f"_{e.get('device', 'cpu')}, {e.get('threads', '?')} torch thread(s), "
            f"{e.get('clock', '?')} clock, "
            f"{e.get('wall_s', 0) / 60:.1f} min, {e.get('date', '')}_\n"
        )
        if name == "tta":
            body = time_to_accuracy.markdown(s["tta"]["rows"], s["tta"]["data_epoch_s"])
        else:
            body = {
                "layer": layer_cost,
                "step": step_cost,
                "memory": memory,
                "inference": inference,
                "zoo": zoo_latency,
            }[name].markdown(s[name])
        lines += ["", f"## {title}", "", env_line, body]
    analysis = Path(__file__).resolve().parent / "analysis.md"
    if analysis.exists():
        lines += ["", analysis.read_text()]
    return "\n".join(lines) + "\n"


def render_peers(results: dict[str, Any]) -> str:
    """``results/peers.md``: section 6 with its environment, then ``peers_analysis.md``."""
    env, e = results["environment"], results["section_env"].get("peers", {})
    lines = [
        "# Versus peers: GaLore, tensorly-torch, LoRA (peft), ASVD (fasterai)",
        "",
        f"`python -m benchmarks --sections peers`, torch {env['torch']}, {env['processor']}, "
        f"{env['cpu_count']} CPUs, float32; {e.get('threads', '?')} torch thread(s), "
        f"{e.get('clock', '?')} clock, {e.get('wall_s', 0) / 60:.1f} min, "
        f"{e.get('date', '')}. Every ratio is measured within this run.",
        "",
        peers.markdown(results["sections"]["peers"]),
    ]
    analysis = Path(__file__).resolve().parent / "peers_analysis.md"
    if analysis.exists():
        lines += ["", analysis.read_text()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
