"""The sentence-transformers module of a transformer compressed by ``lorank compress``.

``lorank compress`` writes a sentence-transformers folder with its transformer module's type
set to :class:`LowRankTransformer` (``modules.json``), so that::

    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer("out", trust_remote_code=True)   # low-rank layers inside

loads the factors (sentence-transformers ≥ 6 asks for ``trust_remote_code`` for any module
class outside its own package; the class is this file of the installed lorank). This module
imports sentence-transformers, so it is only imported when such a folder is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

try:  # sentence-transformers ≥ 5.2 (older versions: sentence_transformers.models)
    from sentence_transformers.sentence_transformer.modules import Transformer
except ImportError:  # pragma: no cover
    from sentence_transformers.models import Transformer

from lorank.compress.huggingface import load_huggingface_compressed

__all__ = ["LowRankTransformer"]


class LowRankTransformer(Transformer):
    """sentence-transformers' ``Transformer`` whose model is rebuilt by
    :func:`lorank.compress.huggingface.load_huggingface_compressed` (config, tokenizer and
    the rest of the module exactly as sentence-transformers loads them)."""

    def _load_model(self, model_name_or_path: str, *args: Any, **model_kwargs: Any) -> nn.Module:
        subfolder = model_kwargs.get("subfolder") or ""
        return load_huggingface_compressed(Path(model_name_or_path) / subfolder)
