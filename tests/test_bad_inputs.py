"""The bad-input corpus: every mistake a user can make ends in one clear line, exit status 2
(1 for a run that diverged), no traceback, and no file of an earlier run changed.

Config cases live in ``tests/bad_inputs/configs/*.toml``; the first line of each says what the
message must contain (``# expect: ...``). Data, checkpoint, output and command-line cases are
listed below. Each case runs the ``lorank`` entry point (``lorank.cli.main``) in-process with
the process's stderr captured at the file-descriptor level, so a traceback printed anywhere
would be seen.
"""

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from lorank.cli import main

HERE = Path(__file__).parent / "bad_inputs"
CONFIGS = sorted((HERE / "configs").glob("*.toml"))
SYNTH = ["--set", "data.name=synthetic", "--set", "model.hidden=[16]", "--set", "train.epochs=1"]


def expected_message(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks an '# expect:' line"
    return first.removeprefix("# expect: ")


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A finished run whose files no bad input may touch."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    assert (
        main(["train", str(CONFIGS[0].parent / "../ok.toml"), "--out", str(out), "--quiet"] + SYNTH)
        == 0
    )
    return out


def run_cli(argv, capfd, earlier_run):
    before = snapshot(earlier_run)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capfd.readouterr().err
    assert snapshot(earlier_run) == before, "an earlier run's files changed"
    return code, err


def assert_one_clean_line(code, err, message, expected_code=2):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("lorank: error: "), err
    assert message in lines[0], err


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_bad_config(path, tmp_path, capfd, earlier_run):
    code, err = run_cli(["train", path, "--out", tmp_path / "new", "--quiet"], capfd, earlier_run)
    assert_one_clean_line(code, err, expected_message(path))
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


def _fashion_copy(tmp_path: Path, damage: str) -> Path:
    root = tmp_path / "data"
    (root / "fashion-mnist").mkdir(parents=True)
    src = HERE.parents[2] / "shared" / "datasets" / "fashion-mnist"
    for f in src.glob("*.gz"):
        shutil.copy(f, root / "fashion-mnist" / f.name)
    target = root / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[100] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "delete":
        target.unlink()
        return root
    target.write_bytes(bytes(data))
    return root


def _bad_checkpoint(tmp_path: Path, earlier_run: Path, damage: str) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(earlier_run, ckpt)
    weights, meta = ckpt / "model.safetensors", ckpt / "model.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage-json":
        meta.write_text("{not json")
    elif damage == "foreign-json":
        meta.write_text(json.dumps({"format": "something-else"}))
    elif damage == "other-architecture":
        info = json.loads(meta.read_text())
        info["model"]["hidden"] = [17]
        meta.write_text(json.dumps(info))
    elif damage == "wrong-shape":
        from safetensors.torch import load_file, save_file

        state = load_file(weights)
        key = next(iter(state))
        state[key] = state[key][:1]
        save_file(state, weights)
    elif damage == "no-model":
        weights.unlink()
        meta.unlink()
    return ckpt


def _nan_weights(tmp_path: Path, earlier_run: Path) -> Path:
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(earlier_run, run)
    state = load_file(run / "model.safetensors")
    key = next(iter(state))
    state[key] = state[key] * float("nan")
    save_file(state, run / "model.safetensors")
    return run


def _gzip_not_idx(tmp_path: Path) -> Path:
    root = _fashion_copy(tmp_path, "none")
    target = root / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    target.write_bytes(gzip.compress(b"hello"))
    return root


def _bad_model_json(tmp_path: Path, earlier_run: Path, damage: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(earlier_run, run)
    meta = json.loads((run / "model.json").read_text())
    if damage == "layer-missing-keys":
        meta["low_rank_layers"] = {"layers.0": {"type": "linear", "rank": 2}}
    elif damage == "layers-as-list":
        meta["low_rank_layers"] = ["layers.0"]
    elif damage == "in-features-string":
        meta["low_rank_layers"] = {
            "layers.0": {
                "type": "linear",
                "in_features": "twenty",
                "out_features": 16,
                "rank": 2,
                "core": "diag",
                "bias": True,
                "frozen": [],
            }
        }
    elif damage == "frozen-dunder":
        meta["low_rank_layers"] = {
            "layers.0": {
                "type": "linear",
                "in_features": 20,
                "out_features": 16,
                "rank": 2,
                "core": "diag",
                "bias": True,
                "frozen": ["__class__"],
            }
        }
    elif damage == "data-info-extra":
        meta["data_info"]["surprise"] = 1
    elif damage == "negative-classes":
        meta["data_info"]["num_classes"] = -1
    (run / "model.json").write_text(json.dumps(meta))
    return run


def _damaged_run(tmp_path: Path, earlier_run: Path, damage: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(earlier_run, run)
    checkpoint = run / "checkpoints" / "epoch-0001"
    if damage == "state-empty":
        (checkpoint / "state.json").write_text("{}")
    elif damage == "state-epoch-negative":
        state = json.loads((checkpoint / "state.json").read_text())
        for pair in state["__dict__"]:
            if pair[0] == "epoch":
                pair[1] = -3
        (checkpoint / "state.json").write_text(json.dumps(state))
    elif damage == "state-rng-wrong-type":
        state = json.loads((checkpoint / "state.json").read_text())
        for pair in state["__dict__"]:
            if pair[0] == "rng":
                for entry in pair[1]["__dict__"]:
                    if entry[0] == "python":
                        entry[1] = "not a state"
        (checkpoint / "state.json").write_text(json.dumps(state))
    elif damage == "state-missing-tensor":
        text = (checkpoint / "state.json").read_text()
        (checkpoint / "state.json").write_text(
            text.replace('"__tensor__": "t0"', '"__tensor__": "t999"')
        )
    elif damage == "summary-a-list":
        (run / "summary.json").write_text("[]")
    elif damage == "summary-bad-status":
        (run / "summary.json").write_text(json.dumps({"status": "finished?"}))
    elif damage == "config-not-utf8":
        (run / "config.json").write_bytes(b"\xff\xfe{}")
    elif damage == "sweep-json-a-string":
        (tmp_path / "sweep.json").write_text('"hello"')
        return tmp_path
    return run


def _hf_dir(tmp_path: Path, config: str) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    return folder


def _user_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


OK = str(HERE / "ok.toml")

# (id, argv builder(tmp_path, earlier_run) -> argv, expected message, expected exit code)
CASES = [
    ("missing-config-file", lambda t, e: ["train", t / "nope.toml"], "does not exist", 2),
    (
        "set-without-equals",
        lambda t, e: ["train", OK, "--set", "optim.lr"],
        "is not of the form section.key=value",
        2,
    ),
    (
        "set-into-a-value",
        lambda t, e: ["train", OK, "--set", "optim.lr.x=1"],
        "optim.lr: Input should be a valid number",
        2,
    ),
    (
        "misspelled-flag",
        lambda t, e: ["train", OK, "--overwrit"],
        "unrecognized arguments: --overwrit",
        2,
    ),
    ("misspelled-command", lambda t, e: ["trian", OK], "invalid choice: 'trian'", 2),
    ("missing-argument", lambda t, e: ["eval"], "the following arguments are required", 2),
    (
        "existing-run-dir",
        lambda t, e: ["train", OK, "--out", e] + SYNTH,
        "already exists; choose another --out or pass --overwrite",
        2,
    ),
    (
        "unwritable-out-dir",
        lambda t, e: ["train", OK, "--out", e / "summary.json" / "x"] + SYNTH,
        "cannot create run directory",
        2,
    ),
    (
        "dataset-missing",
        lambda t, e: [
            "train",
            OK,
            "--data-dir",
            t / "empty",
            "--set",
            "data.name=fashion-mnist",
            "--out",
            t / "o",
        ],
        "fashion-mnist",
        2,
    ),
    (
        "dataset-file-missing",
        lambda t, e: [
            "train",
            OK,
            "--data-dir",
            _fashion_copy(t, "delete"),
            "--set",
            "data.name=fashion-mnist",
            "--out",
            t / "o",
        ],
        "t10k-labels-idx1-ubyte.gz",
        2,
    ),
    (
        "dataset-corrupt",
        lambda t, e: [
            "train",
            OK,
            "--data-dir",
            _fashion_copy(t, "flip"),
            "--set",
            "data.name=fashion-mnist",
            "--out",
            t / "o",
        ],
        "corrupt",
        2,
    ),
    (
        "dataset-truncated",
        lambda t, e: [
            "train",
            OK,
            "--data-dir",
            _fashion_copy(t, "truncate"),
            "--set",
            "data.name=fashion-mnist",
            "--out",
            t / "o",
        ],
        "corrupt",
        2,
    ),
    (
        "dataset-gzip-not-idx",
        lambda t, e: [
            "train",
            OK,
            "--data-dir",
            _gzip_not_idx(t),
            "--set",
            "data.name=fashion-mnist",
            "--out",
            t / "o",
        ],
        "corrupt",
        2,
    ),
    (
        "cifar-missing",
        lambda t, e: [
            "train",
            OK,
            "--data-dir",
            t / "empty",
            "--set",
            "data.name=cifar10",
            "--out",
            t / "o",
        ],
        "cifar",
        2,
    ),
    (
        "shakespeare-missing",
        lambda t, e: [
            "train",
            OK,
            "--data-dir",
            t / "empty",
            "--set",
            "data.name=tinyshakespeare",
            "--out",
            t / "o",
        ],
        "input.txt",
        2,
    ),
    ("eval-missing-path", lambda t, e: ["eval", t / "nothing"], "not found", 2),
    (
        "eval-dir-without-model",
        lambda t, e: ["eval", _bad_checkpoint(t, e, "no-model")],
        "holds no model.json",
        2,
    ),
    (
        "eval-truncated-weights",
        lambda t, e: ["eval", _bad_checkpoint(t, e, "truncate")],
        "corrupt or truncated",
        2,
    ),
    (
        "eval-garbage-metadata",
        lambda t, e: ["eval", _bad_checkpoint(t, e, "garbage-json")],
        "is corrupt",
        2,
    ),
    (
        "eval-foreign-metadata",
        lambda t, e: ["eval", _bad_checkpoint(t, e, "foreign-json")],
        "is not a lorank checkpoint",
        2,
    ),
    (
        "eval-other-architecture",
        lambda t, e: ["eval", _bad_checkpoint(t, e, "other-architecture")],
        "does not fit this model",
        2,
    ),
    (
        "eval-wrong-shape",
        lambda t, e: ["eval", _bad_checkpoint(t, e, "wrong-shape")],
        "does not fit this model",
        2,
    ),
    # Files lorank reads, validated by their schemas (issue 18).
    *[
        (
            f"model-json-{damage}",
            lambda t, e, d=damage: ["eval", _bad_model_json(t, e, d)],
            message,
            2,
        )
        for damage, message in [
            ("layer-missing-keys", "field low_rank_layers.layers.0.linear.core: Field required"),
            ("layers-as-list", "field low_rank_layers: Input should be a valid dictionary"),
            ("in-features-string", "in_features: Input should be a valid integer"),
            ("frozen-dunder", "frozen.0: Input should be 'U', 'S', 'V' or 'bias'"),
            ("data-info-extra", "field data_info.surprise: Extra inputs are not permitted"),
            ("negative-classes", "data_info.num_classes: Input should be greater than or equal"),
        ]
    ],
    *[
        (
            f"resume-{damage}",
            lambda t, e, d=damage: ["train", "--resume", _damaged_run(t, e, d), "--quiet"],
            message,
            2,
        )
        for damage, message in [
            ("state-empty", "field epoch: Field required"),
            ("state-epoch-negative", "field epoch: Input should be greater than or equal to 1"),
            ("state-rng-wrong-type", "rng.python is not a Python random state"),
            ("state-missing-tensor", "refers to tensor 't999' that state.safetensors lacks"),
        ]
    ],
    (
        "resume-changes-the-data",
        lambda t, e: [
            "train",
            "--resume",
            _damaged_run(t, e, "none"),
            "--quiet",
            "--set",
            "data.synthetic_train=4096",
        ],
        "pass --allow-changes",
        2,
    ),
    (
        "report-summary-a-list",
        lambda t, e: ["report", _damaged_run(t, e, "summary-a-list"), "--out", t / "r"],
        "holds a JSON list, not an object",
        2,
    ),
    (
        "report-summary-bad-status",
        lambda t, e: ["report", _damaged_run(t, e, "summary-bad-status"), "--out", t / "r"],
        "field status: Input should be 'running', 'completed' or 'diverged'",
        2,
    ),
    (
        "report-sweep-json-a-string",
        lambda t, e: ["report", _damaged_run(t, e, "sweep-json-a-string"), "--out", t / "r"],
        "sweep.json holds a JSON str",
        2,
    ),
    (
        "eval-config-not-utf8",
        lambda t, e: ["eval", _damaged_run(t, e, "config-not-utf8")],
        "is corrupt: not UTF-8 text",
        2,
    ),
    (
        "hf-unknown-model-type",
        lambda t, e: ["compress", _hf_dir(t, '{"model_type": "no-such-model"}'), "--out", t / "c"],
        "cannot load",
        2,
    ),
    (
        "hf-malformed-config",
        lambda t, e: [
            "compress",
            _hf_dir(t, '{"model_type": "gpt2", "n_layer": "many"}'),
            "--out",
            t / "c",
        ],
        "cannot load",
        2,
    ),
    # Numbers without bounds.
    (
        "finetune-epochs-10-to-the-20",
        lambda t, e: ["compress", e, "--out", t / "c", "--finetune-epochs", str(10**20)],
        "--finetune-epochs 100000000000000000000 must be in [0, 100000]",
        2,
    ),
    (
        "set-nested-thousands-deep",
        lambda t, e: [
            "train",
            OK,
            "--out",
            t / "o",
            "--set",
            "model.hidden=" + "[" * 3000 + "]" * 3000,
        ],
        "nests too deeply",
        2,
    ),
    (
        "damping-nan",
        lambda t, e: ["compress", e, "--out", t / "c", "--svd", "activation", "--damping", "nan"],
        "--damping nan must be a finite number",
        2,
    ),
    ("config-is-a-directory", lambda t, e: ["train", t], "is a directory", 2),
    # Output paths and --overwrite.
    (
        "overwrite-a-users-folder",
        lambda t, e: ["train", OK, "--out", _user_dir(t), "--overwrite"] + SYNTH,
        "holds 'thesis.tex', which lorank did not write",
        2,
    ),
    (
        "compress-over-its-source",
        lambda t, e: ["compress", e, "--out", e, "--overwrite"],
        "is or contains the input",
        2,
    ),
    (
        "compress-over-the-folder-of-its-source",
        lambda t, e: ["compress", e, "--out", e.parent, "--overwrite"],
        "is or contains the input",
        2,
    ),
    (
        "compress-out-under-a-file",
        lambda t, e: ["compress", e, "--out", _a_file(t) / "c"],
        "is a file, not a directory",
        2,
    ),
    (
        "report-out-is-a-file",
        lambda t, e: ["report", e, "--out", _a_file(t)],
        "is a file, not a directory",
        2,
    ),
    (
        "sweep-out-is-a-file",
        lambda t, e: ["sweep", OK, "--out", _a_file(t), "--quiet"],
        "is a file, not a directory",
        2,
    ),
    (
        "eval-nan-weights",
        lambda t, e: ["eval", _nan_weights(t, e)],
        "holds NaN or inf weights",
        2,
    ),
    (
        "diverged-run",
        lambda t, e: (
            [
                "train",
                OK,
                "--out",
                t / "o",
                "--quiet",
                "--set",
                "optim.name=sgd",
                "--set",
                "optim.lr=1e12",
            ]
            + SYNTH[:4]
            + ["--set", "train.epochs=3"]
        ),
        "diverged",
        1,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, capfd, earlier_run, monkeypatch):
    monkeypatch.setenv("LORANK_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/lorank fallback
    name, build, message, expected_code = case
    if name.startswith("dataset") or name.endswith("-missing") and name != "eval-missing-path":
        monkeypatch.setenv("LORANK_DATA", str(tmp_path / "empty"))
    argv = build(tmp_path, earlier_run)
    code, err = run_cli(argv, capfd, earlier_run)
    assert_one_clean_line(code, err, message, expected_code)


def test_corpus_is_large_enough():
    assert len(CONFIGS) + len(CASES) >= 40
