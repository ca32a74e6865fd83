"""The benchmark suite's peers section: skipped with a note without its optional peers, and
its tables render from a result (no peer needed, nothing trained)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's benchmarks/

from benchmarks import peers  # noqa: E402


def test_missing_peers_skip_every_comparison_without_training(monkeypatch):
    missing = {p: "ModuleNotFoundError: no module; pip install ..." for p in peers.PEERS}
    monkeypatch.setattr(peers, "installed", lambda: missing)

    def no_work(*args, **kwargs):
        raise AssertionError("nothing may run when every peer is missing")

    monkeypatch.setattr(peers, "_work", no_work)
    result = peers.run(quick=True, threads=1, data_dir=None)
    assert set(result["skipped"]) == set(peers.SUBSECTIONS)
    text = peers.markdown(result)
    for part in peers.SUBSECTIONS:
        assert f"**{part}** skipped" in text


def test_tables_render_with_ratios_to_dense_and_best_peer():
    def train_row(name, loss, peer, seed=0):
        return {
            "name": name,
            "seed": seed,
            "steps": 5,
            "peer": peer,
            "recommended": False,
            "val_loss": loss,
            "step_ms": 10.0,
            "trainable": 100,
            "eval_params": 100,
            "optimizer_mb": 1.0,
            "peak_mb": 50.0,
        }

    train = peers._train_summary(
        [
            train_row("dense AdamW", 2.0, False),
            train_row("lorank factorized r32", 2.2, False),
            train_row("GaLore a", 2.4, True),
            train_row("GaLore b", 2.1, True),
            train_row("GaLore b", 2.3, True, seed=1),
        ]
    )
    rows = {r["name"]: r for r in train["rows"]}
    assert rows["GaLore b"]["val_loss"] == 2.2 and rows["GaLore b"]["best_peer"]
    assert abs(rows["lorank factorized r32"]["val_loss_x_peer"] - 1.0) < 1e-12
    assert abs(rows["lorank factorized r32"]["val_loss_x_dense"] - 1.1) < 1e-12
    layers = [
        {"width": 8, "kind": "dense", "params": 72, "ms": 2.0, "peak_mb": 1.0},
        {"width": 8, "kind": "lorank", "params": 40, "ms": 1.0, "peak_mb": 1.0},
        {
            "width": 8,
            "kind": "tltorch",
            "factorization": "cp",
            "implementation": "factorized",
            "params": 40,
            "error": "RuntimeError: can't allocate memory",
        },
    ]
    peers._layer_ratios(layers)
    text = peers.markdown({"versions": {}, "skipped": {}, "train": train, "layers": layers})
    assert "GaLore b (best peer)" in text
    assert "2.200 ± 0.141" in text
    assert "failed: RuntimeError: can't allocate memory" in text
