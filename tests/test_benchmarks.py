"""The benchmark suite's plumbing (no timing is asserted): ``--device`` is checked before
anything runs, and the zoo section's tables render from a result."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's benchmarks/

from benchmarks.__main__ import main  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--device", "cuda", "--quick", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_unknown_device_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--device", "meta", "--quick", "--out", str(tmp_path)])
    assert "cpu or cuda" in capsys.readouterr().err


def test_inference_section_runs_on_the_given_device_and_records_it(tmp_path, capsys):
    import json

    main(["--device", "cpu", "--quick", "--sections", "inference", "--out", str(tmp_path)])
    (result,) = tmp_path.glob("*-quick.json")
    data = json.loads(result.read_text())
    assert data["device"] == "cpu" and data["section_env"]["inference"]["device"] == "cpu"
