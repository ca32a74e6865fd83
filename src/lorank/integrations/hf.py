"""Short alias of :mod:`lorank.integrations.huggingface`."""

from lorank.integrations.huggingface import LowRankTrainer, LowRankTrainerCallback

__all__ = ["LowRankTrainer", "LowRankTrainerCallback"]
