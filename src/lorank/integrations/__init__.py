"""Use a lorank method inside someone else's training loop.

* :mod:`lorank.integrations.torch_hook`: a plain PyTorch loop (no extra dependency);
* :mod:`lorank.integrations.huggingface` (alias ``lorank.integrations.hf``): a
  ``transformers.TrainerCallback`` plus a ``Trainer`` subclass that adds the method's loss terms;
* :mod:`lorank.integrations.lightning`: a Lightning ``Callback``.

The optional frameworks are imported only by their own module, so ``import lorank`` never
needs them.
"""

from lorank.integrations.torch_hook import LowRankHook, owns_step

__all__ = ["LowRankHook", "owns_step"]
