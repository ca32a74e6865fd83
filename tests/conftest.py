import os
from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"

# Tests read the real datasets from ../shared/datasets beside the checkout unless the user
# points LORANK_DATA elsewhere.
if "LORANK_DATA" not in os.environ and SHARED_DATASETS.is_dir():
    os.environ["LORANK_DATA"] = str(SHARED_DATASETS)


def _data_root() -> Path | None:
    root = os.environ.get("LORANK_DATA")
    return Path(root) if root else None


@pytest.fixture
def data_root() -> Path:
    root = _data_root()
    if root is None or not root.is_dir():
        pytest.skip("no dataset folder: set LORANK_DATA or place ../shared/datasets")
    return root
