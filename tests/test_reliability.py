"""Reliability (issue 18): the CLI's error boundary, what ``--overwrite`` may replace, resume
from the newest checkpoint that validates, one divergence path for every method, and file
modes. Every run here is a tiny synthetic one (4 steps per epoch, one thread)."""

import errno
import io
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from lorank.cli import main
from lorank.training.checkpoint import complete_checkpoints

OK = str(Path(__file__).parent / "bad_inputs" / "ok.toml")
TINY = [
    "--set",
    "data.synthetic_train=256",
    "--set",
    "data.batch_size=64",
    "--set",
    "train.threads=1",
    "--quiet",
]


def cli(argv, capfd):
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lorank: error: "), err
    assert "Traceback" not in err
    return lines[0]


def train(out, capfd, *extra, epochs=3):
    code, _, err = cli(
        ["train", OK, "--out", out, *TINY, "--set", f"train.epochs={epochs}", *extra], capfd
    )
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-epoch run (checkpoints at epochs 2 and 3) that tests copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    code = main(["train", OK, "--out", str(out), *TINY, "--set", "train.epochs=3"])
    assert code == 0
    return out


# ---------------------------------------------------------------------- the error boundary


def test_an_internal_error_is_one_line_exit_3_with_the_traceback_in_a_file(
    tmp_path, capfd, monkeypatch
):
    import lorank.training.trainer as trainer

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(trainer, "build_optimizer", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, _, err = cli(["train", OK, "--out", tmp_path / "run", *TINY], capfd)
    assert code == 3
    line = one_error_line(err)
    assert "internal error ZeroDivisionError: a bug" in line and "bug in lorank" in line
    written = list(tmp_path.glob("lorank-traceback-*.txt"))
    assert len(written) == 1 and str(written[0]) in line
    text = written[0].read_text()
    assert "Traceback" in text and "ZeroDivisionError: a bug" in text


class _Failing(io.StringIO):
    def __init__(self, error: OSError) -> None:
        super().__init__()
        self.error = error

    def write(self, text: str) -> int:
        raise self.error

    def flush(self) -> None:
        raise self.error


def test_a_closed_pipe_is_silent(finished, capfd, monkeypatch):
    capfd.readouterr()
    monkeypatch.setattr(sys, "stdout", _Failing(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    code = main(["eval", str(finished)])
    monkeypatch.undo()
    assert code == 141
    assert capfd.readouterr().err == ""


def test_a_full_stdout_is_one_line(finished, capfd, monkeypatch):
    capfd.readouterr()
    monkeypatch.setattr(sys, "stdout", _Failing(OSError(errno.ENOSPC, "No space left on device")))
    code = main(["eval", str(finished)])
    monkeypatch.undo()
    assert code == 2
    assert "cannot write (standard output): No space left" in one_error_line(capfd.readouterr().err)


def test_help_and_version_return_zero(capfd):
    assert main(["--version"]) == 0
    assert main(["train", "--help"]) == 0
    assert main(["trian"]) == 2


# ---------------------------------------------------------------------- --overwrite


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, capfd):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, _, err = cli(["train", OK, "--out", mine, "--overwrite", *TINY], capfd)
    assert code == 2
    assert "holds 'thesis.tex', which lorank did not write" in one_error_line(err)
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_a_run_with_a_foreign_file_and_replaces_a_clean_run(
    finished, tmp_path, capfd
):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "notes.txt").write_text("mine")
    code, _, err = cli(["train", OK, "--out", run, "--overwrite", *TINY], capfd)
    assert code == 2 and "notes.txt" in one_error_line(err)
    (run / "notes.txt").unlink()
    (run / ".summary.json.abc.tmp").write_text("a killed write")  # lorank's own leftovers
    train(run, capfd, "--overwrite", epochs=1)
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1


def test_compress_never_replaces_its_source_or_a_folder_holding_it(finished, tmp_path, capfd):
    base = tmp_path / "base"
    source = base / "dense"
    shutil.copytree(finished, source)
    before = sorted(p.name for p in source.iterdir())
    for out in (source, base, source / "sub"):
        code, _, err = cli(
            ["compress", source, "--rule", "rank=4", "--out", out, "--overwrite"], capfd
        )
        assert code == 2, err
        line = one_error_line(err)
        assert "input" in line and str(source) in line
    checkpoint = source / "model.safetensors"
    code, _, err = cli(
        ["compress", checkpoint, "--rule", "rank=4", "--out", source, "--overwrite"], capfd
    )
    assert code == 2 and "is or contains the input" in one_error_line(err)
    assert sorted(p.name for p in source.iterdir()) == before


def test_compress_out_under_a_missing_parent_and_under_a_file(finished, tmp_path, capfd):
    out = tmp_path / "new" / "deeper" / "c"
    code, _, err = cli(["compress", finished, "--rule", "rank=4", "--out", out], capfd)
    assert code == 0, err
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli(["compress", finished, "--rule", "rank=4", "--out", blocker / "c"], capfd)
    assert code == 2 and "is a file, not a directory" in one_error_line(err)


def test_unwritable_outputs_are_one_line(finished, tmp_path, capfd, monkeypatch):
    # Tests run as root, where a 0555 folder is still writable: simulate the refusal.
    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode)
    )
    for argv in (
        ["train", OK, "--out", locked / "run", *TINY],
        ["compress", finished, "--rule", "rank=4", "--out", locked / "c"],
        ["report", finished, "--out", locked],
    ):
        code, _, err = cli(argv, capfd)
        assert code == 2, err
        assert "not writable" in one_error_line(err) or "read-only" in err


def test_report_and_sweep_out_pointing_at_a_file(finished, tmp_path, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli(["report", finished, "--out", blocker], capfd)
    assert code == 2 and "is a file, not a directory" in one_error_line(err)
    code, _, err = cli(["sweep", OK, "--out", blocker, "--workers", "1", "--quiet"], capfd)
    assert code == 2 and "is a file, not a directory" in one_error_line(err)
    assert blocker.read_text() == "x"


# ---------------------------------------------------------------------- resume


def _crashed_copy(finished: Path, tmp_path: Path) -> Path:
    """The finished run as if killed during epoch 3: summary running, epoch 3 missing."""
    run = tmp_path / "crashed"
    shutil.copytree(finished, run)
    (run / "summary.json").write_text(json.dumps({"status": "running"}))
    shutil.rmtree(run / "checkpoints" / "epoch-0003")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    return run


def _reference(finished: Path):
    metrics = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    strip = [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in metrics]
    return strip


def _metrics(run: Path):
    return [
        {k: v for k, v in json.loads(x).items() if not k.endswith("time_s")}
        for x in (run / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize(
    "damage", ["no-model-weights", "no-model-json", "no-state-tensors", "truncated-weights"]
)
def test_resume_falls_back_to_the_older_complete_checkpoint(finished, tmp_path, capfd, damage):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "summary.json").write_text(json.dumps({"status": "running"}))
    newest = run / "checkpoints" / "epoch-0003"
    if damage == "no-model-weights":
        (newest / "model.safetensors").unlink()
    elif damage == "no-model-json":
        (newest / "model.json").unlink()
    elif damage == "no-state-tensors":
        (newest / "state.safetensors").unlink()
    else:
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    code, _, err = cli(["train", "--resume", run, "--quiet"], capfd)
    assert code == 0, err
    assert "skipped checkpoint epoch-0003" in err and "resuming from epoch-0002" in err
    assert "lorank: error" not in err
    assert _metrics(run) == _reference(finished)  # epoch 3 retrained to the same result


def test_resume_cuts_a_torn_metrics_file_and_removes_temp_files(finished, tmp_path, capfd):
    run = _crashed_copy(finished, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # torn mid-write by the kill
    (run / ".model.safetensors.x8f2.tmp").write_bytes(b"half")
    (run / "checkpoints" / ".tmp-epoch-0003").mkdir()
    code, _, err = cli(["train", "--resume", run, "--quiet"], capfd)
    assert code == 0, err
    assert _metrics(run) == _reference(finished)
    assert not list(run.glob(".*.tmp")) and not list((run / "checkpoints").glob(".tmp*"))


def test_resume_with_garbage_before_the_checkpoint_epoch_falls_back(finished, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[3] = "garbage"  # epoch 3's record: checkpoint 3 cannot be trusted
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = cli(["train", "--resume", run, "--quiet"], capfd)
    assert code == 0, err
    assert (
        "skipped checkpoint epoch-0003 (metrics.jsonl has complete records only up to epoch 2)"
        in err
    )
    assert _metrics(run) == _reference(finished)


def test_no_usable_checkpoint_is_one_line_naming_why(finished, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for ckpt in complete_checkpoints(run):
        (ckpt / "state.json").write_text("{}")
    code, _, err = cli(["train", "--resume", run, "--quiet"], capfd)
    assert code == 2
    line = one_error_line(err)
    assert "no complete checkpoint" in line and "epoch-0002" in line and "state.json" in line


def test_resume_records_overrides_and_refuses_data_model_seed_changes(finished, tmp_path, capfd):
    run = _crashed_copy(finished, tmp_path)
    for change in ("data.synthetic_train=512", "model.hidden=[8]", "train.seed=7"):
        code, _, err = cli(["train", "--resume", run, "--quiet", "--set", change], capfd)
        assert code == 2
        assert "--allow-changes" in one_error_line(err)
    config = json.loads((run / "config.json").read_text())
    assert "resumes" not in config  # a refused resume changes nothing
    code, _, err = cli(["train", "--resume", run, "--quiet", "--set", "train.epochs=4"], capfd)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["epochs"] == 4
    (entry,) = config["resumes"]
    assert entry["checkpoint"] == "epoch-0002"
    assert entry["changes"] == {"train.epochs": [3, 4]}
    code, _, err = cli(
        [
            "train",
            "--resume",
            run,
            "--quiet",
            "--set",
            "train.seed=7",
            "--set",
            "train.epochs=5",
            "--allow-changes",
        ],
        capfd,
    )
    assert code == 0, err
    resumes = json.loads((run / "config.json").read_text())["resumes"]
    assert resumes[1]["changes"]["train.seed"] == [0, 7]


def test_tampered_checkpoint_state_is_one_line(finished, tmp_path, capfd):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for ckpt in complete_checkpoints(run):
        state = json.loads((ckpt / "state.json").read_text())
        for pair in state["__dict__"]:
            if pair[0] == "epoch":
                pair[1] = -3
        (ckpt / "state.json").write_text(json.dumps(state))
    code, _, err = cli(["train", "--resume", run, "--quiet"], capfd)
    assert code == 2
    assert "field epoch" in one_error_line(err)


# ---------------------------------------------------------------------- divergence


def test_dlrt_divergence_exits_1_marks_the_run_and_keeps_the_last_checkpoint(
    tmp_path, capfd, monkeypatch
):
    import lorank.methods.dlrt as dlrt

    real, real_epoch_end = dlrt._svd, dlrt.DLRT.on_epoch_end
    after_epoch_1 = {"yes": False}

    def epoch_end(self, model, optimizer, epoch, metrics):
        real_epoch_end(self, model, optimizer, epoch, metrics)
        after_epoch_1["yes"] = True

    def failing_after_epoch_1(core):
        # The SVD of the first step of epoch 2 fails (the FLOP meter's counted copies of a
        # step call the SVD too, so counting calls would not say which step fails).
        if after_epoch_1["yes"]:
            raise FloatingPointError("a DLRT core holds NaN or inf")
        return real(core)

    monkeypatch.setattr(dlrt, "_svd", failing_after_epoch_1)
    monkeypatch.setattr(dlrt.DLRT, "on_epoch_end", epoch_end)
    run = tmp_path / "run"
    dlrt_args = [
        "--set",
        "method.name=dlrt",
        "--set",
        "method.adaptive=true",
        "--set",
        "model.hidden=[16]",
    ]
    code, _, err = cli(
        ["train", OK, "--out", run, *TINY, *dlrt_args, "--set", "train.epochs=3"], capfd
    )
    assert code == 1
    line = one_error_line(err)
    assert "diverged at epoch 2, step 1" in line and "DLRT core" in line
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert (summary["diverged_epoch"], summary["diverged_step"]) == (2, 1)
    assert [c.name for c in complete_checkpoints(run)] == ["epoch-0001"]
    assert (
        main(
            ["eval", str(run / "checkpoints" / "epoch-0001" / "model.safetensors"), "--config", OK]
        )
        == 0
    )


def test_dlrt_real_divergence_and_skip(tmp_path, capfd):
    args = [
        *TINY,
        "--set",
        "method.name=dlrt",
        "--set",
        "method.adaptive=true",
        "--set",
        "optim.name=sgd",
        "--set",
        "optim.lr=1e12",
        "--set",
        "train.epochs=2",
    ]
    code, _, err = cli(["train", OK, "--out", tmp_path / "stop", *args], capfd)
    assert code == 1 and "diverged" in one_error_line(err)
    assert json.loads((tmp_path / "stop" / "summary.json").read_text())["status"] == "diverged"
    code, out, err = cli(
        ["train", OK, "--out", tmp_path / "skip", *args, "--set", "train.nonfinite=skip"], capfd
    )
    assert code == 0, err
    json.loads(out)  # strict JSON, even if a loss is not finite


def test_eval_of_nan_weights_is_one_line_not_invalid_json(finished, tmp_path, capfd):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    state = load_file(run / "model.safetensors")
    key = next(iter(state))
    state[key] = state[key] * float("nan")
    save_file(state, run / "model.safetensors")
    code, out, err = cli(["eval", run], capfd)
    assert code == 2 and out == ""
    assert "NaN or inf weights" in one_error_line(err)


# ---------------------------------------------------------------------- sweeps


def test_a_sweep_refuses_to_reuse_runs_of_another_config(tmp_path, capfd):
    out = tmp_path / "sweep"
    base = [
        "sweep",
        OK,
        "--out",
        out,
        "--workers",
        "1",
        "--quiet",
        "--set",
        "train.threads=1",
        "--set",
        "data.synthetic_train=256",
    ]
    code, _, err = cli(base, capfd)
    assert code == 0, err
    code, _, err = cli([*base, "--set", "optim.lr=0.5"], capfd)
    assert code == 2
    assert "was made with optim.lr = 0.001" in one_error_line(err)


# ---------------------------------------------------------------------- file modes


def test_every_file_of_a_run_has_the_same_mode(finished):
    umask = os.umask(0)
    os.umask(umask)
    modes = {}
    for path in [finished, *finished.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        modes[str(path.relative_to(finished))] = (oct(mode), oct(expected))
    assert all(a == b for a, b in modes.values()), modes
    assert (finished / "checkpoints" / "epoch-0003" / "state.safetensors").exists()


def test_a_diverged_fine_tune_inside_compress_is_kept_at_out(finished, tmp_path, capfd):
    out = tmp_path / "c"
    argv = ["compress", finished, "--rule", "rank=4", "--out", out, "--finetune-epochs", 2]
    argv += ["--set", "optim.name=sgd", "--set", "optim.lr=1e12", "--quiet"]
    code, _, err = cli(argv, capfd)
    assert code == 1
    line = one_error_line(err)
    assert "diverged" in line and str(out) in line and ".tmp" not in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_epoch"] == 1
    assert (out / "compress.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
