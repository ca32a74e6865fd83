"""The low-rank core: what every method, the trainer and compression build on.

- :mod:`~lorank.core.layers`: ``LowRankLinear`` / ``LowRankConv2d`` (``W = U S Vᵀ``) and their specs
- :mod:`~lorank.core.attention`: ``LowRankMultiheadAttention``
- :mod:`~lorank.core.convert`: ``LowRankConfig``, the conversion plan, ``convert`` / ``merge``
- :mod:`~lorank.core.rank`: rank rules (fixed, fraction, tolerance, energy, cutoff, ...)
- :mod:`~lorank.core.search`: layer spectra and seed 003's loss-bounded rank search
- :mod:`~lorank.core.regularizers`: orthogonality and sparsity penalties
- :mod:`~lorank.core.optim`: optimizers and ``swap_parameters`` (the one way optimizer state moves)
- :mod:`~lorank.core.io`: ``save`` / ``load`` (safetensors + JSON) and atomic file writes
- :mod:`~lorank.core.metrics`: parameter counts, ranks, orthogonality errors

The core imports nothing from the rest of lorank but :mod:`lorank.errors`.
"""
