"""Metrics: pure functions of labels and probabilities, low enough that training, its sanity gate, fusion and
compression score with the same code as ``medclf evaluate`` (which adds the runner, plots and report above).

- :mod:`~medclf.metrics.classification`: accuracy, AUC, sensitivity/specificity with bootstrap intervals
  (``compute_metrics``), expected calibration error, the weighted AUC the bootstraps use;
- :mod:`~medclf.metrics.calibration`: temperature scaling (fit, apply, per group);
- :mod:`~medclf.metrics.ordinal`: grades (MAE, quadratic-weighted kappa, within one grade);
- :mod:`~medclf.metrics.resample`: bootstrap resamples by sample or by patient, as weights.

A regular package (not a namespace one), so the import graph that ``lint-imports`` checks sees its modules.
"""
