"""Energy from RAPL/NVML counters (lorank.training.energy): measured where exposed, never
invented where not."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from lorank.training import energy as energy_mod
from lorank.training.config import load_config
from lorank.training.energy import NOT_MEASURED, SWITCHED_OFF, EnergyMeter, rapl_packages
from lorank.training.trainer import train

CPU = torch.device("cpu")
RANGE = 1_000_000_000  # µJ at which the fake counter wraps


def fake_powercap(root, packages=(5_000_000,)):
    """A /sys/class/powercap tree: packages, a core sub-domain and a psys domain."""
    for i, value in enumerate(packages):
        d = root / f"intel-rapl:{i}"
        d.mkdir(parents=True)
        (d / "name").write_text(f"package-{i}\n")
        (d / "energy_uj").write_text(f"{value}\n")
        (d / "max_energy_range_uj").write_text(f"{RANGE}\n")
        sub = root / f"intel-rapl:{i}:0"
        sub.mkdir()
        (sub / "name").write_text("core\n")
        (sub / "energy_uj").write_text("1\n")
        (sub / "max_energy_range_uj").write_text(f"{RANGE}\n")
    psys = root / f"intel-rapl:{len(packages)}"
    psys.mkdir()
    (psys / "name").write_text("psys\n")
    (psys / "energy_uj").write_text("123\n")
    (psys / "max_energy_range_uj").write_text(f"{RANGE}\n")
    return root


def set_counter(root, package, value):
    (root / f"intel-rapl:{package}" / "energy_uj").write_text(f"{value}\n")


@pytest.fixture
def no_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError


def test_without_counters_nothing_is_invented(tmp_path, no_pynvml):
    meter = EnergyMeter(True, CPU, root=tmp_path / "absent")
    meter.start()
    meter.stop()
    assert meter.record() == {}
    assert meter.summary() == {"energy": NOT_MEASURED}
    assert NOT_MEASURED == "not measured (no RAPL/NVML)"
    assert EnergyMeter(False, CPU).summary() == {"energy": SWITCHED_OFF}


def test_rapl_packages_sum_and_wrap_and_sub_domains_are_not_added(tmp_path, no_pynvml):
    root = fake_powercap(tmp_path, packages=(5_000_000, RANGE - 1_000_000))
    meter = EnergyMeter(True, CPU, root=root)
    meter.start()
    set_counter(root, 0, 8_000_000)  # +3 J
    set_counter(root, 1, 2_000_000)  # wrapped: +1 J before the wrap, +2 J after
    meter.poll()
    set_counter(root, 0, 9_000_000)  # +1 J
    meter.stop()
    assert meter.joules == pytest.approx(3 + 3 + 1)
    assert meter.summary() == {"energy_j": pytest.approx(7.0), "energy_source": "RAPL (2 packages)"}
    set_counter(root, 0, 20_000_000)  # between epochs (evaluation): not training
    meter.start()
    with meter.paused():  # counting FLOPs on copies: not training either
        set_counter(root, 0, 30_000_000)
    set_counter(root, 0, 30_500_000)  # +0.5 J of training
    meter.stop()
    assert meter.joules == pytest.approx(7.5)


def test_unreadable_rapl_says_why(tmp_path, no_pynvml, monkeypatch):
    root = fake_powercap(tmp_path)

    def denied(self):
        raise PermissionError

    monkeypatch.setattr(energy_mod._Rapl, "read", denied)
    packages, why = rapl_packages(root)
    assert packages == [] and "permission denied" in why
    summary = EnergyMeter(True, CPU, root=root).summary()
    assert summary["energy"].startswith("not measured (RAPL not readable")


def test_nvml_counter_through_pynvml(monkeypatch, tmp_path):
    readings = iter([1_000, 1_000, 4_500])  # mJ: at set-up, start, stop
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
        nvmlDeviceGetTotalEnergyConsumption=lambda handle: next(readings),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = EnergyMeter(True, torch.device("cuda", 0), root=tmp_path / "absent")
    meter.start()
    meter.stop()
    assert meter.summary() == {"energy_j": pytest.approx(3.5), "energy_source": "NVML"}


def _run(tmp_path, name, measure):
    overrides = [
        "data.name=synthetic",
        "model.hidden=[16]",
        "train.epochs=2",
        "data.batch_size=64",
        "train.threads=1",
        f"train.measure_energy={str(measure).lower()}",
    ]
    run = train(load_config(None, overrides), tmp_path / name, quiet=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((run / "summary.json").read_text())


def test_a_run_without_counters_says_not_measured(tmp_path, monkeypatch, no_pynvml):
    monkeypatch.setattr(energy_mod, "POWERCAP", tmp_path / "no-powercap")
    records, summary = _run(tmp_path, "on", True)
    assert summary["energy"] == "not measured (no RAPL/NVML)"
    assert "energy_j" not in summary and all("energy_j" not in r for r in records)
    _, summary = _run(tmp_path, "off", False)
    assert summary["energy"] == "not measured (train.measure_energy = false)"


def test_a_run_with_rapl_logs_energy_and_reads_the_counter_rarely(tmp_path, monkeypatch):
    root = fake_powercap(tmp_path / "powercap")
    monkeypatch.setattr(energy_mod, "POWERCAP", root)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    reads = []
    original = energy_mod._Rapl.read

    def read(self):
        reads.append(1)
        return original(self) + 250_000 * len(reads)  # 0.25 J more at every read

    monkeypatch.setattr(energy_mod._Rapl, "read", read)
    records, summary = _run(tmp_path, "rapl", True)
    assert summary["energy_source"] == "RAPL (1 package)"
    energies = [r.get("energy_j") for r in records[1:]]
    assert 0 < energies[0] < energies[1] == summary["energy_j"]
    # Set-up, then per epoch a start and a stop (32 steps: no poll; a dense run's FLOPs are
    # counted once, before training). A few file reads per epoch: far below 1% overhead.
    assert len(reads) == 1 + 2 * 2
