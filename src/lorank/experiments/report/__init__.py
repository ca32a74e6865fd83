"""``lorank report``: aggregate run directories into tables, PNG figures and one HTML page.

Input: run directories, sweep directories (``sweep.json``) or any folder holding them. Runs
are grouped by their *settings* (the resolved config without seed, threads, device and data
folder; a ``lorank compress`` run adds its rank rule); each group is summarised as mean ± std
over its seeds (sample standard deviation, n − 1; 0 for one seed).

**Divergence.** A run is *diverged* at the first epoch whose training loss is NaN/inf or
exceeds ``EXPLOSION_FACTOR`` × ln(classes) (a model far worse than a uniform
guess has blown up; it typically collapses to predicting one class, the "9.8%" of seed 000),
or when its ``summary.json`` says ``diverged``. Diverged runs are listed with that epoch and
left out of every accuracy mean, curve band and scatter; heat maps mark them as hatched
"div" cells rather than colouring them by accuracy.

Outputs in ``OUT/``: ``summary.md`` (the tables), ``report.html`` (self-contained: tables and
every figure embedded as base64 PNG), ``report.json`` (the aggregated numbers) and
``figures/*.png``:

* ``loss_epoch.png``/``loss_time.png``: train and test loss vs epoch / training wall time,
  one line per method (its best setting; for a single-method sweep the best settings), seed
  band ±1 std;
* ``accuracy_params.png``: test accuracy vs params_eval and vs params_train, every run, the
  Pareto front (fewest parameters for the accuracy) highlighted;
* ``accuracy_train_flops.png``: test accuracy vs cumulative training FLOPs per method (a
  post-training compression as a point at its source's cost), with 99% of the dense accuracy
  marked; ``accuracy_inference_flops.png``: test accuracy vs forward FLOPs per inference
  sample, every run, the Pareto front highlighted. The runs table has the matching columns
  (train FLOPs, inference FLOPs/sample, train FLOPs to reach 99% of the best dense group's
  accuracy, and training energy when a run measured it);
* ``ranks.png``: rank per layer vs epoch for methods whose ranks change during training;
* ``spectra.png``: singular values σ_i/σ_1 per layer of the final checkpoint;
* ``orth_error.png``: max(‖UᵀU − I‖_F, ‖VᵀV − I‖_F) per layer vs epoch;
* ``heatmap_<method>.png``: mean test accuracy over two grid keys (e.g. lr × λ_orth);
* ``ablation.png``: runs that differ only by switching off a loss term (a ``lambda_*`` or
  ``alpha`` weight set to 0), side by side: accuracy bars and training-loss curves.
"""

from lorank.experiments.report.collect import Group, RunData, collect, group_runs, load_run
from lorank.experiments.report.render import report

__all__ = ["Group", "RunData", "collect", "group_runs", "load_run", "report"]
