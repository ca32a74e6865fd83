"""A sentence-transformers folder (a small random BERT, transformer at the root or in a
subfolder) compresses through ``lorank compress`` and loads back with ``SentenceTransformer``,
embeddings within 1e-5 of the in-memory compressed model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import lorank
from lorank.cli import main
from lorank.compress import pipeline
from lorank.compress.huggingface import ST_TRANSFORMER

st = pytest.importorskip("sentence_transformers")
modules_of = pytest.importorskip("sentence_transformers.sentence_transformer.modules")
transformers = pytest.importorskip("transformers")

SENTENCES = ["a cat sat on the mat", "the quick brown fox", "lorank makes layers low rank"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]


def _st_folder(tmp_path, subfolder: bool):
    torch.manual_seed(0)
    bert = tmp_path / "bert"
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=len(VOCAB), max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(bert)
    (bert / "vocab.txt").write_text("\n".join(VOCAB))
    transformers.BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    word = modules_of.Transformer(str(bert))
    model = st.SentenceTransformer(
        modules=[word, modules_of.Pooling(word.get_embedding_dimension())]
    )
    folder = tmp_path / "st"
    model.save(str(folder))
    modules = json.loads((folder / "modules.json").read_text())
    if subfolder and modules[0]["path"] == "":  # the older layout: transformer in 0_Transformer
        (folder / "0_Transformer").mkdir()
        for name in ("config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "sentence_bert_config.json"):  # fmt: skip
            if (folder / name).exists():
                shutil.move(folder / name, folder / "0_Transformer" / name)
        modules[0]["path"] = "0_Transformer"
        (folder / "modules.json").write_text(json.dumps(modules))
    return folder


@pytest.mark.parametrize("subfolder", [False, True])
def test_sentence_transformers_folder_round_trip(tmp_path, monkeypatch, capsys, subfolder):
    folder = _st_folder(tmp_path, subfolder)
    ids = torch.randint(5, len(VOCAB), (8, 16))
    torch.save(ids, tmp_path / "ids.pt")
    captured = {}
    write = pipeline._write_untrained

    def spy(model, *args, **kwargs):
        captured["model"] = model
        return write(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_write_untrained", spy)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(
        ["compress", str(folder), "--svd", "activation", "--calibration-file",
         str(tmp_path / "ids.pt"), "--budget", "0.5", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration_loss_kind"] == "relative_output_mse:last_hidden_state"
    modules = json.loads((out / "modules.json").read_text())
    assert modules[0]["type"] == ST_TRANSFORMER
    assert (out / modules[1]["path"] / "config.json").is_file()  # pooling kept as it was

    reference = st.SentenceTransformer(str(folder))  # dense, then the in-memory compressed model
    reference[0].model = captured["model"]
    loaded = st.SentenceTransformer(str(out), trust_remote_code=True)
    assert lorank.low_rank_layers(loaded[0].model)
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    got = loaded.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
