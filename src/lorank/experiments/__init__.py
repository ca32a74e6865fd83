"""Experiments on top of training and compression: sweeps, ``lorank compare`` and reports."""
