"""Hugging Face architectures end to end, from small random configs (no downloads).

For each of GPT-2, BERT (``BertModel`` and ``BertForMaskedLM``), DistilBERT, Llama, Qwen2
(grouped-query attention), T5 and ViT: ``convert`` at full rank keeps the outputs, ``merge``
gives back the original class whose ``state_dict`` loads into a fresh instance with identical
outputs (ties included), one training step of every gradient method runs, and
``lorank compress FOLDER --svd activation --calibration-file F --budget 0.5`` writes the
same class to a folder that reloads with the in-memory compressed model's outputs.
"""

from __future__ import annotations

import json

import pytest
import torch

import lorank
from lorank import LowRankConfig
from lorank.cli import main
from lorank.compress import huggingface, pipeline
from lorank.compress.huggingface import load_huggingface_compressed
from lorank.methods import METHODS, build

transformers = pytest.importorskip("transformers")

VOCAB = 50
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
ARCHS = {
    "gpt2": ("GPT2LMHeadModel", lambda t: t.GPT2Config(n_layer=2, n_head=2, n_embd=32,
                                                       n_positions=32, vocab_size=VOCAB)),
    "bert": ("BertModel", lambda t: t.BertConfig(**SMALL, vocab_size=VOCAB,
                                                 max_position_embeddings=32)),
    "bert-mlm": ("BertForMaskedLM", lambda t: t.BertConfig(**SMALL, vocab_size=VOCAB,
                                                           max_position_embeddings=32)),
    "distilbert": ("DistilBertModel", lambda t: t.DistilBertConfig(
        dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=VOCAB,
        max_position_embeddings=32)),
    "llama": ("LlamaForCausalLM", lambda t: t.LlamaConfig(
        **(SMALL | {"num_attention_heads": 4}), num_key_value_heads=4, vocab_size=VOCAB,
        max_position_embeddings=32)),
    "qwen2-gqa": ("Qwen2ForCausalLM", lambda t: t.Qwen2Config(
        **(SMALL | {"num_attention_heads": 4}), num_key_value_heads=2, vocab_size=VOCAB,
        max_position_embeddings=32)),
    "t5": ("T5ForConditionalGeneration", lambda t: t.T5Config(
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=VOCAB,
        decoder_start_token_id=0, pad_token_id=0)),
    "vit": ("ViTModel", lambda t: t.ViTConfig(**SMALL, image_size=16, patch_size=4)),
}  # fmt: skip


def build_model(arch: str, seed: int = 0):
    name, config = ARCHS[arch]
    torch.manual_seed(seed)
    return getattr(transformers, name)(config(transformers)).eval()


def inputs(model, n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if huggingface.takes_tokens(model):
        return torch.randint(1, VOCAB, (n, 12), generator=g)
    return torch.randn(n, 3, 16, 16, generator=g)


def output(model, x):
    with torch.no_grad():
        out = model(**huggingface.model_kwargs(model, x))
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def tied(model) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_convert_then_merge_gives_the_original_class_back(arch):
    model = build_model(arch)
    x = inputs(model)
    before = output(model, x)
    types = {n: type(m) for n, m in model.named_modules()}
    was_tied = tied(model)
    report = lorank.convert(model, LowRankConfig(rank=1.0, skip_if_no_savings=False))
    assert report.converted
    torch.testing.assert_close(output(model, x), before, atol=1e-5, rtol=0)
    assert tied(model) == was_tied  # a tied head is kept dense and listed
    if was_tied:
        head = [e for e in report.layers if "tied" in e.reason]
        assert head and all(e.status != "converted" for e in head)
    lorank.merge(model)
    assert {n: type(m) for n, m in model.named_modules()} == types
    fresh = build_model(arch, seed=123)
    fresh.load_state_dict(model.state_dict())
    assert tied(fresh) == was_tied
    torch.testing.assert_close(output(fresh, x), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_layers_expose_weight_for_model_code(arch):
    """Model code that reads ``module.weight`` (T5's dtype check, resize utilities) works."""
    model = build_model(arch)
    lorank.convert(model, LowRankConfig(rank=4))
    for layer in lorank.low_rank_layers(model).values():
        assert layer.weight.dtype == layer.U.dtype
    output(model, inputs(model))
    if hasattr(model, "resize_token_embeddings") and huggingface.takes_tokens(model):
        model.resize_token_embeddings(VOCAB + 4)
        assert output(model, inputs(model)).shape[0] == 2


GRADIENT_METHODS = [n for n, cls in METHODS.items() if not cls.gradient_free and n != "dense"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_one_training_step_of_every_method(arch):
    for name in GRADIENT_METHODS:
        model = build_model(arch)
        x = inputs(model)
        target = output(model, inputs(model, seed=7)).detach()

        def loss_fn(m, batch, target=target):
            out = m(**huggingface.model_kwargs(m, batch[0]))
            y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
            return (y - target).pow(2).mean()

        method = build({"name": name})
        method.attach(loss_fn=loss_fn, calibration=lambda n, x=x: [(x,)], epochs=2)
        method.prepare(model)
        if name == "oialr":  # train the switched (U S Vᵀ, frozen bases) form
            method.switch(model, None)
        opt = torch.optim.SGD(method.parameters(model), lr=1e-2)
        before = [p.detach().clone() for p in method.parameters(model)]
        stats = method.train_step(model, opt, (x,), loss_fn)
        assert torch.isfinite(stats["loss"]), (arch, name)
        after = method.parameters(model)
        changed = len(after) != len(before) or any(
            not torch.equal(a, b) for a, b in zip(after, before, strict=True)
        )
        assert changed, (arch, name)
        method.on_epoch_end(model, opt, 0, {"loss_task": float(stats["loss_task"])})


def _save(arch, folder):
    model = build_model(arch)
    model.save_pretrained(folder)
    calibration = inputs(model, n=8, seed=3)
    torch.save(calibration, folder.parent / f"{arch}-calib.pt")
    return model, folder.parent / f"{arch}-calib.pt"


def _compress_capturing(monkeypatch, argv):
    """Run the CLI and keep the in-memory compressed model (what it writes)."""
    captured = {}
    write = pipeline._write_untrained

    def spy(model, *args, **kwargs):
        captured["model"] = model
        return write(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_write_untrained", spy)
    return main(argv), captured


def _compress_and_reload(arch, tmp_path, monkeypatch, capsys, extra=("--budget", "0.5")):
    folder = tmp_path / arch
    original, calib = _save(arch, folder)
    out = tmp_path / f"{arch}-out"
    argv = ["compress", str(folder), "--svd", "activation", "--calibration-file", str(calib)]
    code, captured = _compress_capturing(monkeypatch, [*argv, *extra, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(original).__name__]
    assert (out / "lorank.safetensors").is_file() and (out / "lorank.json").is_file()
    # transformers cannot read factors: it must refuse, not load random "missing" weights
    with pytest.raises(OSError):
        type(original).from_pretrained(out)
    reloaded = load_huggingface_compressed(out)
    assert type(reloaded) is type(original)
    assert lorank.low_rank_layers(reloaded)
    x = inputs(original, seed=11)
    torch.testing.assert_close(
        output(reloaded, x), output(captured["model"].eval(), x), atol=1e-5, rtol=0
    )
    assert tied(reloaded) == tied(original)
    return summary, original, reloaded


@pytest.mark.parametrize("arch", ["bert", "t5", "vit"])
def test_compress_keeps_the_class_and_reloads(arch, tmp_path, monkeypatch, capsys):
    summary, original, _ = _compress_and_reload(arch, tmp_path, monkeypatch, capsys)
    assert summary["calibration_loss_kind"].startswith("relative_output_mse")
    assert summary["calibration_loss_before"] == 0.0  # the uncompressed model against itself
    assert summary["params_eval_after"] < summary["params_eval_before"]
    if arch == "t5":  # calibration ran through both stacks
        rows = summary["calibration_rows"]
        assert any(n.startswith("encoder.") for n in rows)
        assert any(n.startswith("decoder.") and "EncDecAttention" in n for n in rows)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "bert-mlm", "distilbert", "llama", "qwen2-gqa"])
def test_compress_keeps_the_class_and_reloads_slow(arch, tmp_path, monkeypatch, capsys):
    summary, _, _ = _compress_and_reload(arch, tmp_path, monkeypatch, capsys)
    causal = arch in ("gpt2", "llama", "qwen2-gqa")
    assert (summary["calibration_loss_kind"] == "lm") == causal


def test_loss_tolerance_on_an_encoder_bounds_the_output_error(tmp_path, monkeypatch, capsys):
    summary, _, _ = _compress_and_reload(
        "bert", tmp_path, monkeypatch, capsys, extra=("--loss-tolerance", "0.05")
    )
    assert summary["calibration_loss_kind"] == "relative_output_mse:last_hidden_state"
    assert summary["calibration_loss_after"] <= 0.05


def test_a_compressed_folder_compresses_again(tmp_path, monkeypatch, capsys):
    _compress_and_reload("bert", tmp_path, monkeypatch, capsys)
    again = tmp_path / "again"
    code = main(["compress", str(tmp_path / "bert-out"), "--rule", "rank=2", "--out", str(again)])
    assert code == 0, capsys.readouterr().err
    model = load_huggingface_compressed(again)
    assert type(model).__name__ == "BertModel"
    assert max(layer.rank for layer in lorank.low_rank_layers(model).values()) <= 2


def test_hf_forward_failure_is_one_line_naming_the_class(tmp_path, capsys):
    folder = tmp_path / "vit"
    build_model("vit").save_pretrained(folder)
    torch.save(torch.randn(4, 3, 8, 8), tmp_path / "small.pt")  # 8×8 images, model wants 16×16
    capsys.readouterr()
    code = main(
        ["compress", str(folder), "--svd", "activation", "--calibration-file",
         str(tmp_path / "small.pt"), "--budget", "0.5", "--out", str(tmp_path / "o")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("lorank: error: ViTModel's forward failed")


def test_unknown_architecture_is_one_line(tmp_path, capsys):
    folder = tmp_path / "bert"
    build_model("bert").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertForTimeTravel"]
    (folder / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    code = main(["compress", str(folder), "--rule", "rank=2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "'BertForTimeTravel'" in err and len(err.strip().splitlines()) == 1
