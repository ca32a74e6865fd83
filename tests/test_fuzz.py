"""Fuzzing the command line: "one line, never a traceback", for inputs nobody wrote by hand.

Hypothesis mutates valid configs (as JSON, as TOML text and as ``--set`` values), a run's
``model.json``, a checkpoint's ``state.json``, ``metrics.jsonl``, ``summary.json``,
``sweep.json`` and whole argument lists, and runs each through the real ``lorank`` entry
point in-process (:func:`lorank.cli.main`). Every example must:

* exit 0, 1 or 2 (3 is lorank's own bug: the traceback file it names says where);
* on 2, print exactly one ``lorank: error:`` line; never a ``Traceback``;
* leave every file outside its own output directory unchanged: a finished reference run
  (hashed before and after every example) and the example's own inputs.

Mutated configs that still validate are clamped to a tiny run (at most 2 epochs of 256
synthetic samples, layers of at most 64 units) so that an example takes a fraction of a
second; out-of-range sizes are kept as they are, since they must be refused before anything
is allocated.

Examples per test: ``LORANK_FUZZ_EXAMPLES`` (default 15; the report test runs a quarter as many: a
bounded CI run); e.g. ``LORANK_FUZZ_EXAMPLES=300 pytest tests/test_fuzz.py`` for a long run.
With ``LORANK_FUZZ_LOG=FILE`` each test appends its count of examples and exit codes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorank.cli import main

EXAMPLES = int(os.environ.get("LORANK_FUZZ_EXAMPLES", "15"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
OK = str(Path(__file__).parent / "bad_inputs" / "ok.toml")
TINY = {
    "data": {
        "name": "synthetic",
        "synthetic_train": 128,
        "synthetic_test": 64,
        "batch_size": 64,
    },
    "model": {"name": "mlp", "hidden": [8]},
    "method": {"name": "dense"},
    "optim": {"name": "adam", "lr": 1e-3},
    "train": {"epochs": 1, "threads": 1},
}
# Keys a mutation sets, beside random ones: every section's settings that size or shape a run.
KEYS = [
    "data.name",
    "data.batch_size",
    "data.eval_batch_size",
    "data.train_subset",
    "data.test_subset",
    "data.synthetic_train",
    "data.synthetic_test",
    "data.synthetic_shape",
    "data.synthetic_classes",
    "data.synthetic_seed",
    "data.block_size",
    "data.augment",
    "data.dir",
    "model.name",
    "model.hidden",
    "model.activation",
    "model.dropout",
    "model.width",
    "method.name",
    "method.rank",
    "method.tolerance",
    "method.adaptive",
    "method.target_modules",
    "method.exclude_modules",
    "method.rank_pattern",
    "method.r_min",
    "optim.name",
    "optim.lr",
    "optim.betas",
    "optim.momentum",
    "optim.weight_decay",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.grad_clip",
    "optim.gamma",
    "train.epochs",
    "train.seed",
    "train.threads",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.nonfinite",
    "train.device",
    "sweep.grid",
    "resumes",
]
METHODS = ["dense", "factorized", "svd", "dlrt", "oialr", "hybrid", "nnsvd", "pil", "bipil"]
# For a mutated config that validates: the most an example may train.
CLAMP = {
    "train.epochs": 2,
    "data.synthetic_train": 256,
    "data.synthetic_test": 128,
    "data.train_subset": 256,
    "data.test_subset": 128,
    "method.finetune_epochs": 1,
    "method.search_samples": 64,
}
DEEP = "__DEEP__"

# ---------------------------------------------------------------------- strategies

weird_ints = st.sampled_from([0, -1, 1, 3, 2**31, 2**32, 2**63, 2**64, 10**12, 10**38, -(2**70)])
weird_text = st.sampled_from(
    ["", " ", "..", "/", "/etc/passwd", "é", "\x00", "(", "[a-", "*", "true", "1e400", "nan"]
)
scalar = st.one_of(
    st.integers(-(2**70), 2**70),
    weird_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    weird_text,
)
value = st.one_of(
    scalar,
    st.lists(st.one_of(st.integers(-3, 300), scalar), max_size=4),
    st.dictionaries(st.text(max_size=6), scalar, max_size=3),
    st.just(DEEP),
)


# Values a user might plausibly write for each key: mutations built from these mostly
# validate, so the examples also train (every method, odd but valid settings) rather than
# only fail validation. A quarter of the mutations use the weird values above instead.
floats01 = st.floats(0, 1)
PLAUSIBLE = {
    "data.batch_size": st.integers(1, 128),
    "data.eval_batch_size": st.integers(1, 128),
    "data.train_subset": st.integers(1, 300),
    "data.test_subset": st.integers(1, 200),
    "data.synthetic_train": st.integers(1, 300),
    "data.synthetic_test": st.integers(1, 200),
    "data.synthetic_shape": st.lists(st.integers(1, 6), min_size=1, max_size=3),
    "data.synthetic_classes": st.integers(2, 12),
    "data.synthetic_seed": st.integers(0, 2**32 - 1),
    "data.block_size": st.integers(2, 64),
    "data.augment": st.booleans(),
    "model.name": st.sampled_from(["mlp", "lenet5", "vit", "vgg", "resnet20"]),
    "model.hidden": st.lists(st.integers(1, 32), max_size=3),
    "model.activation": st.sampled_from(["relu", "tanh", "gelu", "swish"]),
    "model.dropout": st.floats(0, 0.99),
    "method.name": st.sampled_from(METHODS),
    "method.rank": st.one_of(st.integers(1, 16), st.floats(0.01, 1)),
    "method.tolerance": floats01,
    "method.adaptive": st.booleans(),
    "method.target_modules": st.one_of(
        st.sampled_from(["layers.0", "layers\\.\\d+", ".*", "(", "[a-", "nothing"]),
        st.lists(st.sampled_from(["layers.0", "layers.2", "head"]), max_size=2),
    ),
    "method.exclude_modules": st.sampled_from(["layers.0", "*", ".*"]),
    "method.rank_pattern": st.dictionaries(st.sampled_from(["layers.0", "x"]), st.integers(1, 8)),
    "method.r_min": st.integers(1, 8),
    "optim.name": st.sampled_from(["sgd", "adam", "adamw"]),
    "optim.lr": st.floats(1e-6, 10),
    "optim.betas": st.lists(st.floats(0, 0.999), min_size=2, max_size=2),
    "optim.momentum": st.floats(0, 0.99),
    "optim.weight_decay": st.floats(0, 1),
    "optim.schedule": st.sampled_from(["constant", "step", "cosine"]),
    "optim.warmup_steps": st.integers(0, 10),
    "optim.grad_clip": st.floats(0.01, 10),
    "optim.gamma": st.floats(0.01, 1),
    "train.epochs": st.integers(0, 2),
    "train.seed": st.integers(0, 2**32 - 1),
    "train.eval_every": st.integers(1, 3),
    "train.checkpoint_every": st.integers(0, 2),
    "train.keep_checkpoints": st.integers(1, 3),
    "train.nonfinite": st.sampled_from(["skip", "stop"]),
    "train.device": st.sampled_from(["cpu", "auto"]),
}


def paths_of(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indices)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            out += paths_of(v, (*prefix, i))
    return out


def set_path(obj: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    node = obj
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = new
    return obj


@st.composite
def mutated_json(draw, original: Any, max_ops: int = 3) -> bytes:
    """``original`` with 1-3 mutations (replace, delete, add a key), serialised, then
    possibly truncated, made non-UTF-8 or given a value nested thousands deep."""
    obj = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, max_ops))):
        paths = paths_of(obj)
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if op == "set":
            obj = set_path(obj, path, draw(value))
        elif op == "delete" and path:
            parent = obj
            for part in path[:-1]:
                parent = parent[part]
            del parent[path[-1]]
        else:
            node = obj
            for part in path:
                node = node[part]
            if isinstance(node, dict):
                node[draw(st.text(max_size=8))] = draw(value)
    text = json.dumps(obj, allow_nan=True)
    depth = draw(st.sampled_from([3, 40, 3000]))
    text = text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)
    data = text.encode()
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "bytes"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif damage == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\xff\xfe\x80" + data[at:]
    return data


# ---------------------------------------------------------------------- harness


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class Harness:
    """Runs examples against a finished reference run and checks the promises."""

    def __init__(self, reference: Path, root: Path) -> None:
        self.reference = reference
        self.hashes = snapshot(reference)
        self.root = root
        self.codes: Counter[int] = Counter()
        self.start = time.perf_counter()

    def workdir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.root))

    def copy_run(self, work: Path) -> Path:
        run = work / "run"
        shutil.copytree(self.reference, run)
        return run

    def run(self, argv: list[Any], protect: list[Path] = ()) -> tuple[int, str]:
        before = {p: snapshot(p) if p.is_dir() else p.read_bytes() for p in protect}
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
        text = err.getvalue()
        self.codes[code] += 1
        assert code in (0, 1, 2), f"exit {code} for {argv!r}:\n{text}"
        assert "Traceback" not in text, f"traceback for {argv!r}:\n{text}"
        errors = [line for line in text.splitlines() if line.startswith("lorank: error:")]
        if code == 2:
            assert len(errors) == 1, f"{len(errors)} error lines for {argv!r}:\n{text}"
            others = [
                line
                for line in text.splitlines()
                if line.strip()
                and not line.startswith(("lorank: error:", "lorank: warning:"))
                and not line.startswith("lorank: resuming")
            ]
            assert not others, f"extra output for {argv!r}:\n{text}"
        if code == 0 and out.getvalue().strip() and argv[0] in ("eval", "train"):
            json.loads(out.getvalue())  # strict JSON: no NaN
        assert snapshot(self.reference) == self.hashes, f"reference run changed by {argv!r}"
        for p, old in before.items():
            now = snapshot(p) if p.is_dir() else p.read_bytes()
            assert now == old, f"input {p} changed by {argv!r}"
        return code, text

    def log(self, name: str) -> None:
        target = os.environ.get("LORANK_FUZZ_LOG")
        if target:
            elapsed = time.perf_counter() - self.start
            with open(target, "a") as f:
                f.write(
                    f"{name}: {sum(self.codes.values())} examples in {elapsed:.1f} s, "
                    f"exit codes {dict(sorted(self.codes.items()))}\n"
                )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished 2-epoch run with checkpoints at epochs 1 and 2."""
    out = tmp_path_factory.mktemp("reference") / "run"
    argv = [
        "train",
        OK,
        "--out",
        str(out),
        "--quiet",
        "--set",
        "train.epochs=2",
        "--set",
        "train.threads=1",
        "--set",
        "data.synthetic_train=128",
        "--set",
        "data.batch_size=64",
    ]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    """Finished 2-epoch runs of methods with their own checkpoint state (counters, ranks,
    bases), besides the dense reference."""
    runs = {}
    for name, sets in {
        "dlrt": ["method.name=dlrt", "method.adaptive=true"],
        "oialr": ["method.name=oialr", "method.delay=2", "method.frequency=1"],
        "svd": ["method.name=svd"],
    }.items():
        out = tmp_path_factory.mktemp(name) / "run"
        argv = [
            "train",
            OK,
            "--out",
            str(out),
            "--quiet",
            "--set",
            "train.epochs=2",
            "--set",
            "train.threads=1",
            "--set",
            "data.synthetic_train=128",
            "--set",
            "data.batch_size=64",
        ]
        for item in sets:
            argv += ["--set", item]
        assert main(argv) == 0, name
        runs[name] = out
    return runs


@pytest.fixture
def harness(reference, tmp_path, monkeypatch, request):
    monkeypatch.setenv("LORANK_OFFLINE", "1")
    monkeypatch.setenv("LORANK_DATA", str(tmp_path / "no-datasets"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # exit-3 traceback files
    h = Harness(reference, tmp_path)
    yield h
    h.log(request.node.name)


def clamp(raw: Any) -> Any:
    """A config that validates is made tiny (see the module docstring); anything else is
    left as the mutation made it."""
    from lorank.errors import LorankError
    from lorank.training.config import validate_config

    if not isinstance(raw, dict):
        return raw
    try:
        config = validate_config({k: v for k, v in raw.items() if k != "sweep"})
    except (LorankError, RecursionError, TypeError, ValueError):
        return raw
    dumped = config.model_dump()
    for key, cap in CLAMP.items():
        section, name = key.split(".")
        current = dumped.get(section, {}).get(name)
        if isinstance(current, int) and current > cap:
            raw.setdefault(section, {})[name] = cap
    if config.data.name != "synthetic":
        raw["data"]["name"] = "synthetic"  # real datasets: not in this sandbox, or slow
    model = raw.get("model")
    if isinstance(model, dict):
        for k, v in list(model.items()):
            if isinstance(v, int) and not isinstance(v, bool) and v > 64:
                model[k] = 64
            if isinstance(v, list):
                model[k] = [min(x, 64) if isinstance(x, int) else x for x in v[:3]]
    shape = raw["data"].get("synthetic_shape")
    if isinstance(shape, list) and len(shape) > 0:
        raw["data"]["synthetic_shape"] = [min(x, 8) if isinstance(x, int) else x for x in shape]
    return raw


@st.composite
def config_json(draw) -> bytes:
    raw = copy.deepcopy(TINY)
    raw["method"]["name"] = draw(st.sampled_from(METHODS))
    for _ in range(draw(st.integers(1, 3))):
        # Mostly known keys (a random name only tests the unknown-key message).
        random_key = draw(st.integers(0, 4)) == 4
        key = draw(st.text(max_size=10)) if random_key else draw(st.sampled_from(KEYS))
        parts = key.split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            weird = key not in PLAUSIBLE or draw(st.sampled_from([False, False, False, True]))
            node[parts[-1]] = draw(value) if weird else draw(PLAUSIBLE[key])
    raw = clamp(raw)
    text = json.dumps(raw, allow_nan=True)
    depth = draw(st.sampled_from([3, 40, 3000]))
    data = text.replace(json.dumps(DEEP), "[" * depth + "]" * depth).encode()
    if draw(st.sampled_from([False] * 9 + [True])):  # sometimes torn mid-write
        data = data[: draw(st.integers(0, len(data)))]
    return data


# ---------------------------------------------------------------------- the fuzz tests


@SETTINGS
@given(data=config_json())
def test_fuzz_config_json(harness, data):
    work = harness.workdir()
    config = work / "config.json"
    config.write_bytes(data)
    harness.run(["train", config, "--out", work / "out", "--quiet"], protect=[config])


@SETTINGS
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 200), st.sampled_from(["del", "ins", "cut"]), st.text(max_size=4)),
        min_size=1,
        max_size=3,
    ),
    deep=st.sampled_from([0, 0, 50, 5000]),
)
def test_fuzz_config_toml_text(harness, edits, deep):
    text = Path(OK).read_text() + "\n[optim]\nlr = 1e-3\n"
    for at, op, chars in edits:
        at = min(at, len(text))
        if op == "del":
            text = text[:at] + text[at + len(chars) + 1 :]
        elif op == "ins":
            text = text[:at] + chars + text[at:]
        else:
            text = text[:at]
    if deep:
        text += "\n[sweep]\nx = " + "[" * deep + "]" * deep + "\n"
    work = harness.workdir()
    config = work / "c.toml"
    config.write_text(text)
    harness.run(
        [
            "train",
            config,
            "--out",
            work / "out",
            "--quiet",
            "--set",
            "train.epochs=1",
            "--set",
            "train.threads=1",
            "--set",
            "data.name=synthetic",
            "--set",
            "data.synthetic_train=128",
        ],
        protect=[config],
    )


set_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["1", "true", "[1,2]", "{a=1}", "nan", "inf", "-1", "1e400", "'x'", "[[[["]),
    st.integers(0, 5000).map(lambda n: "[" * n + "]" * n),
    st.integers().map(str),
)


@st.composite
def set_item(draw) -> tuple[str, str]:
    """``(key, value text)`` of one ``--set``: mostly a known key with a plausible value
    written as TOML, else anything."""
    if draw(st.sampled_from([False, False, True])):
        return draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=12))), draw(set_text)
    key = draw(st.sampled_from(sorted(PLAUSIBLE)))
    return key, json.dumps(draw(PLAUSIBLE[key]))  # JSON scalars and lists are TOML too


@SETTINGS
@given(sets=st.lists(set_item(), min_size=1, max_size=3))
def test_fuzz_set_overrides(harness, sets):
    work = harness.workdir()
    argv: list[Any] = ["train", OK, "--out", work / "out", "--quiet"]
    for key, text in sets:
        argv += ["--set", f"{key}={text}"]
    # Sizes a valid override may give are capped by later overrides (the last one wins).
    argv += ["--set", "train.threads=1"]
    raw: dict[str, Any] = {}
    from lorank.errors import LorankError
    from lorank.training.config import apply_override, validate_config

    try:
        for key, text in sets:
            apply_override(raw, f"{key}={text}")
        config = validate_config(raw)
        if config.train.epochs > 2 or config.data.name != "synthetic":
            argv += ["--set", "train.epochs=1", "--set", "data.name=synthetic"]
        argv += ["--set", "data.synthetic_train=128", "--set", "data.synthetic_test=64"]
        if config.model.name == "mlp" and any(h > 64 for h in config.model.hidden):
            argv += ["--set", "model.hidden=[8]"]
    except (LorankError, RecursionError, TypeError, ValueError):
        pass
    harness.run(argv)


@SETTINGS
@given(data=st.data())
def test_fuzz_model_json_eval_and_compress(harness, reference, data):
    meta = json.loads((reference / "model.json").read_text())
    work = harness.workdir()
    run = harness.copy_run(work)
    (run / "model.json").write_bytes(data.draw(mutated_json(meta)))
    command = data.draw(st.sampled_from(["eval", "compress"]))
    if command == "eval":
        harness.run(["eval", run], protect=[run])
    else:
        harness.run(
            ["compress", run, "--rule", "rank=2", "--out", work / "c", "--samples", "64"],
            protect=[run],
        )


@SETTINGS
@given(data=st.data())
def test_fuzz_checkpoint_state_json_resume(harness, reference, method_runs, data):
    work = harness.workdir()
    method = data.draw(st.sampled_from(["dense", *method_runs]))
    if method == "dense":
        run = harness.copy_run(work)
    else:
        run = work / "run"
        shutil.copytree(method_runs[method], run)
    newest = run / "checkpoints" / "epoch-0002"
    state = json.loads((newest / "state.json").read_text())
    which = data.draw(st.sampled_from(["state.json", "model.json", "metrics", "summary"]))
    if which == "state.json":
        (newest / "state.json").write_bytes(data.draw(mutated_json(state)))
    elif which == "model.json":
        meta = json.loads((newest / "model.json").read_text())
        (newest / "model.json").write_bytes(data.draw(mutated_json(meta)))
    elif which == "metrics":
        text = (run / "metrics.jsonl").read_bytes()
        cut = data.draw(st.integers(0, len(text)))
        junk = data.draw(st.sampled_from([b"", b"garbage\n", b'{"epoch": "x"}\n', b"[1]\n"]))
        (run / "metrics.jsonl").write_bytes(text[:cut] + junk)
    else:
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_bytes(data.draw(mutated_json(summary)))
    # The run "was killed" in epoch 2: resume it (a later epoch count trains one more).
    extra = data.draw(st.sampled_from([[], ["--set", "train.epochs=3"]]))
    harness.run(["train", "--resume", run, "--quiet", *extra])


@settings(SETTINGS, max_examples=max(EXAMPLES // 4, 5))  # a report draws figures: slow
@given(data=st.data())
def test_fuzz_report_inputs(harness, reference, data):
    work = harness.workdir()
    run = harness.copy_run(work)
    which = data.draw(st.sampled_from(["summary.json", "config.json", "metrics", "sweep.json"]))
    if which == "sweep.json":
        index = {
            "format": "lorank-sweep/1",
            "base": {},
            "grid": {"optim.lr": [0.001]},
            "seeds": [0],
            "published": {"rows": [{"optim.lr": 0.001, "test_acc": 0.9}]},
            "runs": [{"name": "run", "dir": "run", "status": "completed", "settings": {}}],
        }
        (work / "sweep.json").write_bytes(data.draw(mutated_json(index)))
    elif which == "metrics":
        text = (run / "metrics.jsonl").read_bytes()
        at = data.draw(st.integers(0, len(text)))
        (run / "metrics.jsonl").write_bytes(text[:at] + b'\n{"epoch": [1]}\n' + text[at:])
    else:
        original = json.loads((run / which).read_text())
        (run / which).write_bytes(data.draw(mutated_json(original)))
    harness.run(["report", work, "--out", work / "report"], protect=[run])


tokens = st.sampled_from(
    [
        "train",
        "eval",
        "compress",
        "sweep",
        "report",
        "compare",
        "--set",
        "--out",
        "--overwrite",
        "--resume",
        "--quiet",
        "--rule",
        "--budget",
        "--finetune-epochs",
        "--samples",
        "--precision",
        "--damping",
        "--seeds",
        "--grid",
        "--workers",
        "--nproc",
        "--epochs",
        "--dataset",
        "--allow-changes",
        "--svd",
        "--calibration",
        "--title",
        "rank=2",
        "energy=2",
        "loss-tolerance=0",
        "nan",
        "-1",
        "0",
        "1e20",
        "10",
        "0-99999999999",
        "optim.lr=1,2",
        "train.epochs=1",
    ]
)
number = st.one_of(
    st.sampled_from(["0", "1", "2", "0.5", "0.01", "64", "-1", "nan", "inf", "1e20", "x", ""]),
    st.integers(-5, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
)
rule = st.one_of(
    st.sampled_from(
        [
            "rank=2",
            "rank=0",
            "rank=999",
            "fraction=0.5",
            "tolerance=0.1",
            "energy=0.01",
            "stable-rank",
            "delta=0.1",
            "cutoff=0.5",
            "abs-tolerance=1e-3",
            "loss-tolerance=0.05",
            "loss-tolerance=nan",
            "energy=2",
            "rank=",
            "=",
            "rank=two",
        ]
    ),
    st.text(max_size=12),
)
COMPRESS_OPTIONS = {
    "--rule": rule,
    "--budget": number,
    "--loss-tolerance": number,
    "--samples": number,
    "--precision": number,
    "--calibration": number,
    "--damping": number,
    "--finetune-epochs": st.sampled_from(["0", "1", "-1", "1e20", str(10**20), "x"]),
    "--svd": st.sampled_from(["plain", "activation", "svd", ""]),
    "--allocation": st.sampled_from(["uniform", "greedy", "random"]),
}


@st.composite
def command_line(draw, places: dict[str, Any]) -> list[Any]:
    """A plausible command: a real command and real paths, with fuzzed option values."""
    place = st.sampled_from(list(places))
    command = draw(st.sampled_from(["eval", "compress", "train", "resume", "report"]))
    if command == "eval":
        argv = ["eval", places[draw(place)]]
        if draw(st.booleans()):
            argv += ["--config", places[draw(place)]]
    elif command == "compress":
        argv = ["compress", places[draw(place)], "--out", places[draw(place)], "--quiet"]
        for option in draw(st.lists(st.sampled_from(list(COMPRESS_OPTIONS)), max_size=4)):
            argv += [option, draw(COMPRESS_OPTIONS[option])]
        if draw(st.booleans()):
            argv.append("--overwrite")
    elif command == "train":
        argv = ["train", places[draw(place)], "--out", places[draw(place)], "--quiet"]
        if draw(st.booleans()):
            argv.append("--overwrite")
        for key in draw(st.lists(st.sampled_from(KEYS), max_size=2)):
            argv += ["--set", f"{key}={draw(number)}"]
    elif command == "resume":
        argv = ["train", "--resume", places[draw(place)], "--quiet"]
        for key in draw(st.lists(st.sampled_from(KEYS), max_size=2)):
            argv += ["--set", f"{key}={draw(number)}"]
        if draw(st.booleans()):
            argv.append("--allow-changes")
    else:
        argv = ["report", places[draw(place)], "--out", places[draw(place)]]
    return argv


@SETTINGS
@given(data=st.data())
def test_fuzz_argument_lists(harness, reference, data):
    work = harness.workdir()
    run = harness.copy_run(work)
    places = {
        "RUN": run,
        "NEW": work / "new",
        "FILE": work / "f.txt",
        "OK": OK,
        "REF": reference,
        "RUN-CONFIG": run / "config.json",
        "SUB": run / "sub",
        "PARENT": work,
    }
    (work / "f.txt").write_text("not a config")
    if data.draw(st.sampled_from([False, False, True])):  # sometimes a soup of tokens
        words = data.draw(
            st.lists(
                st.one_of(tokens, st.sampled_from(list(places)), st.text(max_size=6)),
                min_size=1,
                max_size=8,
            )
        )
        argv = [places.get(w, w) for w in words]
    else:
        argv = data.draw(command_line(places))
    # The reference run is an input only: nothing may resume it or write into it.
    writes = {"--out", "--resume"}
    for i, w in enumerate(argv[:-1]):
        if w in writes and argv[i + 1] == reference:
            argv[i + 1] = run
    if argv and argv[0] in ("compare", "sweep"):
        return  # many runs each; their options are fuzzed by the config tests above
    if argv and argv[0] in ("train", "compress") and "--out" not in argv and "--resume" not in argv:
        argv += ["--out", work / "out"]
    # Anything that would train for long is capped by the last --set (or refused first).
    if argv and argv[0] == "train":
        argv += ["--set", "train.epochs=1", "--set", "train.threads=1"]
        if "--resume" not in argv:
            argv += ["--set", "data.name=synthetic", "--set", "data.synthetic_train=64"]
    if argv and argv[0] == "compress":
        argv = [
            "1" if i and argv[i - 1] == "--finetune-epochs" and a in ("0", "1") else a
            for i, a in enumerate(argv)
        ]
    harness.run(argv, protect=[reference, Path(OK)])
