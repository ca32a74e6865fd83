"""Data-aware compression of a Hugging Face GPT-2 end to end: calibration through its forward
(Conv1D layers), activation-aware SVD, save, reload, and the CLI on a model directory.

The model is a tiny randomly initialised GPT-2 built locally (no network), with a
character-level tokenizer saved beside it so text calibration goes through the tokenizer.
"""

import json
import math

import pytest
import torch

from lorank.cli import main
from lorank.compress.calibration import activation_svd, collect_second_moments
from lorank.compress.huggingface import forward_fn
from lorank.compress.pipeline import (
    calibration_file_batches,
    compress,
    load_huggingface_compressed,
)
from lorank.core.search import dense_weight_matrix

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
) * 12
CHARS = sorted(set(TEXT))


def _save_tokenizer(path):
    vocab = {ch: i for i, ch in enumerate(CHARS)} | {"<unk>": len(CHARS)}
    model = tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(model), unk_token="<unk>"
    )
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    base = tmp_path_factory.mktemp("hf")
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        vocab_size=len(CHARS) + 1,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(base / "gpt2")
    _save_tokenizer(base / "gpt2")
    (base / "calib.txt").write_text(TEXT)
    ids = torch.tensor([CHARS.index(ch) for ch in TEXT])
    torch.save(ids[: 24 * 32].reshape(24, 32), base / "ids.pt")
    return base


def _load(path):
    return transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def test_conv1d_calibration_weights_the_transposed_weight(gpt2_dir):
    """Hooks on GPT-2's Conv1D see the rows x of x @ weight, i.e. the inputs of W = weightᵀ."""
    model = _load(gpt2_dir / "gpt2")
    content = (gpt2_dir / "calib.txt").read_text()
    batches = calibration_file_batches(model, content, 6, None, gpt2_dir / "gpt2", "calib.txt")
    assert [b[0].shape for b in batches] == [(6, 64)]  # n_positions 64 < 128: 64-token windows
    layer = model.transformer.h[0].mlp.c_fc
    captured = []
    handle = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    moments = collect_second_moments(model, {"fc": layer}, batches, forward_fn(model))
    handle.remove()
    x = captured[0].reshape(-1, 64).double()
    assert moments["fc"].rows == 6 * 64
    # float32 products per chunk, summed in float64
    assert torch.allclose(moments["fc"].xtx, x.T @ x, rtol=1e-5, atol=1e-4)
    # Activation-aware truncation of W = weightᵀ beats plain truncation on these inputs.
    w = dense_weight_matrix(layer).double()
    c = moments["fc"].mean
    u, s, v = activation_svd(w, c, damping=0.0)
    assert torch.allclose(u @ torch.diag(s) @ v.T, w, atol=1e-8)
    r = 8
    act_err = w - (u[:, :r] * s[:r]) @ v[:, :r].T
    pu, ps, pvh = torch.linalg.svd(w, full_matrices=False)
    plain_err = w - (pu[:, :r] * ps[:r]) @ pvh[:r]
    act, plain = (torch.trace(e @ c @ e.T) for e in (act_err, plain_err))
    assert act < plain
    assert act == pytest.approx(float(s[r:].pow(2).sum()), rel=1e-5)


def test_activation_svd_compress_save_reload(gpt2_dir, tmp_path):
    out = compress(
        gpt2_dir / "gpt2",
        "tolerance=0.1",
        tmp_path / "out",
        svd="activation",
        calibration=16,
        calibration_file=gpt2_dir / "calib.txt",
        budget=0.5,
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["source_kind"] == "huggingface" and s["svd"] == "activation"
    # The tied output head stays dense; every Conv1D is calibrated on 16 windows of 64 tokens.
    assert s["tied_layers_kept"] == ["lm_head"]
    assert len(s["calibration_rows"]) == 8
    assert set(s["calibration_rows"].values()) == {16 * 64}
    weights = [r["shape"][0] * r["shape"][1] for r in s["layers"]]
    kept = sum(
        r["rank"] * sum(r["shape"]) if r["status"] != "kept" else w
        for r, w in zip(s["layers"], weights, strict=True)
    )
    assert kept <= 0.5 * sum(weights)
    assert s["params_eval_after"] < s["params_eval_before"]
    assert {"plain", "activation"} <= s["svd_comparison"].keys()
    assert math.isfinite(s["calibration_loss_after"])

    reloaded = load_huggingface_compressed(out)
    assert type(reloaded).__name__ == "GPT2LMHeadModel"
    assert type(reloaded.transformer.h[0].attn.c_attn).__name__ == "LowRankHFConv1D"
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight  # still tied
    batches = calibration_file_batches(
        reloaded, TEXT, 16, None, gpt2_dir / "gpt2", gpt2_dir / "calib.txt"
    )
    with torch.no_grad():
        logits = reloaded(input_ids=batches[0][0]).logits
        losses = [reloaded(input_ids=b[0], labels=b[0]).loss * len(b[0]) for b in batches]
    assert torch.isfinite(logits).all()
    # The reloaded model is the compressed one: its loss is the one measured before saving.
    assert float(sum(losses)) / 16 == pytest.approx(s["calibration_loss_after"], rel=1e-5)
    assert s["svd_comparison"]["activation"]["calibration_loss"] == pytest.approx(
        s["calibration_loss_after"], rel=1e-6
    )
    # ... and a reload is deterministic (the same logits twice).
    again = load_huggingface_compressed(out)
    with torch.no_grad():
        assert torch.equal(again(input_ids=batches[0][0]).logits, logits)


def test_cli_loss_tolerance_on_token_ids(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "compress",
            str(gpt2_dir / "gpt2"),
            "--svd",
            "activation",
            "--calibration-file",
            str(gpt2_dir / "ids.pt"),
            "--loss-tolerance",
            "0.02",
            "--precision",
            "0.05",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["search"]["kind"] == "budget" and s["search"]["allocation"] == "greedy"
    assert set(s["calibration_rows"].values()) == {24 * 32}
    assert abs(s["calibration_loss_after"] - s["calibration_loss_before"]) < 0.02
    assert s["search"]["budget"] < 1 and s["params_eval_after"] < s["params_eval_before"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--svd", "activation"], "--calibration-file"),
        (["--calibration-file", "missing.txt"], "not found"),
        (["--calibration-file", "bad_ids.pt"], "vocabulary"),
        (["--calibration-file", "float.npy"], "integer token ids"),
        (["--calibration-file", "cube.pt"], "shape"),
        (["--calibration-file", "long.pt"], "context of 64"),
        (["--budget", "0.5", "--loss-tolerance", "0.1"], "--loss-tolerance"),
        (["--finetune-epochs", "1"], "Hugging Face"),
    ],
)
def test_bad_hf_calibration_is_a_one_line_error(gpt2_dir, tmp_path, capsys, extra, message):
    import numpy as np

    torch.save(torch.tensor([[0, 1, 999]]), tmp_path / "bad_ids.pt")
    np.save(tmp_path / "float.npy", np.zeros((2, 8), dtype=np.float32))
    torch.save(torch.zeros(2, 2, 2, dtype=torch.long), tmp_path / "cube.pt")
    torch.save(torch.zeros(2, 65, dtype=torch.long), tmp_path / "long.pt")
    extra = [str(tmp_path / e) if e.endswith((".txt", ".pt", ".npy")) else e for e in extra]
    code = main(["compress", str(gpt2_dir / "gpt2"), *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("lorank: error:") and len(err.strip().splitlines()) == 1
    assert message in err


def test_text_calibration_without_a_tokenizer_is_an_error(gpt2_dir, tmp_path, capsys):
    _load(gpt2_dir / "gpt2").save_pretrained(tmp_path / "bare")  # weights, no tokenizer
    capsys.readouterr()
    code = main(
        [
            "compress",
            str(tmp_path / "bare"),
            "--calibration-file",
            str(gpt2_dir / "calib.txt"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no tokenizer files" in err
