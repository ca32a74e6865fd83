"""Energy of training, read from the hardware's own counters where it exposes them.

* **RAPL** (CPU packages, Linux): ``/sys/class/powercap/intel-rapl:N/energy_uj``, one
  cumulative microjoule counter per package (AMD's are published there too); sub-domains
  (``intel-rapl:N:M``: cores, uncore, DRAM) lie inside their package and are not added again.
  The counter wraps at ``max_energy_range_uj``; it is read at least every
  :data:`POLL_STEPS` steps, far more often than it can wrap.
* **NVML** (NVIDIA GPUs from Volta on): ``nvmlDeviceGetTotalEnergyConsumption`` in
  millijoules, through ``pynvml`` (the ``nvidia-ml-py`` package, ``pip install
  lorank[energy]``) when it is importable, for the run's CUDA device.

Nothing else is guessed: without a readable counter the run's ``energy`` says ``not
measured (...)`` and why. Reading a counter takes microseconds and happens a few times per
epoch, so measuring never slows a run noticeably. What is measured is the energy of the
whole package or GPU while this run trains (evaluation excluded), including anything else
running on it at the time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

POWERCAP = Path("/sys/class/powercap")
POLL_STEPS = 100
NOT_MEASURED = "not measured (no RAPL/NVML)"
SWITCHED_OFF = "not measured (train.measure_energy = false)"


class _Rapl:
    """One CPU package's RAPL energy counter (microjoules, wrapping)."""

    def __init__(self, path: Path) -> None:
        self.path = path / "energy_uj"
        self.range = int((path / "max_energy_range_uj").read_text())
        self.last = self.read()

    def read(self) -> int:
        return int(self.path.read_text())

    def joules_since_last(self) -> float:
        now = self.read()
        delta = now - self.last if now >= self.last else now + self.range - self.last
        self.last = now
        return delta * 1e-6


def rapl_packages(root: Path | None = None) -> tuple[list[_Rapl], str | None]:
    """The readable RAPL package counters, and why there are none when there are none."""
    root = root or POWERCAP
    try:
        # intel-rapl:N are the packages; intel-rapl:N:M their sub-domains.
        dirs = sorted(p for p in root.iterdir() if p.name.count(":") == 1)
    except OSError:
        return [], "no RAPL"
    packages, why = [], "no RAPL" if not dirs else None
    for path in dirs:
        try:
            name = (path / "name").read_text().strip()
        except OSError:
            continue
        if not name.startswith("package"):
            continue  # psys (the whole platform) would count the packages twice
        try:
            packages.append(_Rapl(path))
        except PermissionError:
            why = "RAPL not readable (permission denied; it is root-only on most kernels)"
        except (OSError, ValueError):
            continue
    if not packages and why is None:
        why = "no RAPL"
    return packages, why


class _Nvml:
    """One GPU's total-energy counter (millijoules since the driver loaded)."""

    def __init__(self, pynvml: Any, handle: Any) -> None:
        self.pynvml, self.handle = pynvml, handle
        self.last = self.read()

    def read(self) -> int:
        return int(self.pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def joules_since_last(self) -> float:
        now = self.read()
        delta, self.last = now - self.last, now
        return max(delta, 0) * 1e-3


def nvml_device(device: torch.device) -> tuple[_Nvml | None, str | None]:
    """The NVML energy counter of a CUDA ``device``, and why there is none."""
    if device.type != "cuda":
        return None, "no NVML"
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None, "no NVML (pynvml not installed: pip install lorank[energy])"
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:  # NVML numbers all GPUs; CUDA only the visible ones
            ids = [v.strip() for v in visible.split(",")]
            if index < len(ids) and ids[index].isdigit():
                index = int(ids[index])
        return _Nvml(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)), None
    except Exception as e:  # NVMLError_NotSupported etc.: a GPU without the counter
        return None, f"no NVML energy counter ({type(e).__name__})"


class EnergyMeter:
    """Joules used while training, summed over the run's counters.

    ``start()`` before an epoch's steps, ``poll()`` every few steps, ``stop()`` after them;
    ``joules`` is the running total (None when nothing is measured, see ``reason``)."""

    def __init__(
        self,
        enabled: bool,
        device: torch.device,
        root: Path | None = None,
        joules: float = 0.0,
    ) -> None:
        self.counters: list[Any] = []
        self.sources: list[str] = []
        self.reason = SWITCHED_OFF
        self.joules: float | None = None
        self.running = False
        if not enabled:
            return
        rapl, rapl_why = rapl_packages(root)
        gpu, gpu_why = nvml_device(device)
        if rapl:
            self.counters += rapl
            self.sources.append(f"RAPL ({len(rapl)} package{'s' if len(rapl) > 1 else ''})")
        if gpu is not None:
            self.counters.append(gpu)
            self.sources.append("NVML")
        if self.counters:
            self.joules, self.reason = float(joules), ""
        elif rapl_why == "no RAPL" and gpu_why == "no NVML":
            self.reason = NOT_MEASURED
        else:
            self.reason = f"not measured ({rapl_why}; {gpu_why})"

    def start(self) -> None:
        for counter in self.counters:
            counter.joules_since_last()  # discard what was used outside training
        self.running = True

    def poll(self) -> None:
        if self.running and self.joules is not None:
            self.joules += sum(c.joules_since_last() for c in self.counters)

    def stop(self) -> None:
        self.poll()
        self.running = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave out what runs inside (e.g. counting FLOPs, which is not training)."""
        if not self.running:
            yield
            return
        self.stop()
        try:
            yield
        finally:
            self.start()

    def record(self) -> dict[str, Any]:
        """``energy_j`` (cumulative) for an epoch record, when measured."""
        return {} if self.joules is None else {"energy_j": self.joules}

    def summary(self) -> dict[str, Any]:
        """``energy_j`` and ``energy_source``, or ``energy: not measured (why)``."""
        if self.joules is None:
            return {"energy": self.reason}
        return {"energy_j": self.joules, "energy_source": " + ".join(self.sources)}
