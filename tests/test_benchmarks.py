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


def test_the_zoo_section_has_a_case_for_every_model_and_renders_its_targets():
    from benchmarks import zoo_latency
    from benchmarks.__main__ import targets

    assert set(zoo_latency.zoo()) == set(zoo_latency.CASES)
    rows = zoo_latency.run(torch.device("cpu"), quick=True, models=["mlp"], repeats=1)
    assert {r["mode"] for r in rows} == {"forward", "train"}
    assert {r["case"] for r in rows} == {"rank 0.25", "budget 0.5"}
    for r in rows:
        assert r["status"] in ("measured", "unchanged", "refused")
        if r["status"] != "refused":
            assert 0 <= r["converted"] <= r["layers"] and r["x_dense"] > 0
    fake = [
        {"model": "lenet5", "mode": "train", "case": "rank 0.25", "batch": 8, "converted": 1,
         "layers": 5, "status": "measured", "dense_ms": 2.0, "ms": 1.5, "x_dense": 0.75},
        {"model": "mlp", "mode": "forward", "case": "budget 0.5", "batch": 8,
         "status": "refused", "note": "too tight"},
    ]  # fmt: skip
    checked = {t["target"].split(",")[0]: t for t in targets({"zoo": fake})}
    never = checked["latency-aware conversion never slower than dense (every zoo model"]
    assert never["status"] == "met" and "1 refused" in never["measured"]
    assert checked["LeNet-5 rank 1/4"]["measured"] == "train 0.750x"
    assert "| lenet5 | train | rank 0.25 | 8 | 1/5 | 2.00 | 1.50 | 0.750 |" in (
        zoo_latency.markdown(fake)
    )
