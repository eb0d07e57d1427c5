"""The calibration CLI refuses bad input with exit 2 and one line (before the model loads wherever the
check does not need it), never reuses a capture of other inputs, records the model's identity,
survives faults (disk full, damaged files, a killed batch) and writes files with normal permissions."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import calibrate.models
from calibrate.__main__ import NO_SPARSE_LAYER, build_parser, main, summary
from calibrate.data import load_corpus
from sparge_core.params import LayerConfig, ModelConfig, ModelInfo, weights_fingerprint

REPO = Path(__file__).resolve().parents[1]
# one layer, one 256-token window, a one-point grid: a whole run takes seconds
CHEAP = ["--model", "tiny-llama", "--samples", "1", "--holdout", "0", "--seq-len", "256", "--device", "cpu",
         "--l1", "0.3", "--pv-l1", "0.35", "--thetas", "-1", "--bisect-steps", "2", "--no-pv", "--layers", "0",
         "--quiet"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI loads a model (the check under test must come first)."""
    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(calibrate.models, "load_model", refuse)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------------------------------
# bad input: exit 2 before the model loads
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,fragment", [
    (["--pv-l1", "inf"], "--pv-l1 must be a finite number"),
    (["--l1", "nan"], "--l1 must be a finite number"),
    (["--thetas", "nan"], "--thetas must be numbers in [-1, 1]"),
    (["--thetas", "2"], "--thetas must be numbers in [-1, 1]"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--storage", "foo://bar"], "is not a database URL"),
    (["--layers", "1-0"], "--layers range '1-0' is empty"),
    (["--data", "/no/such/corpus.txt"], "does not exist"),
    (["--local-blocks", "-1"], "--local-blocks must be an integer >= 0"),
    (["--local-blocks", "1", "--non-causal"], "with --non-causal nothing is forced: drop --local-blocks"),
])
def test_bad_input_exits_2_before_the_model_loads(tmp_path, capsys, no_model_load, extra, fragment):
    assert main([*CHEAP, "--out", str(tmp_path / "c.json"), *extra]) == 2
    assert fragment in _err(capsys)


def test_sqlite_storage_in_a_missing_folder_exits_2(tmp_path, capsys, no_model_load):
    url = f"sqlite:///{tmp_path}/missing/study.db"
    assert main([*CHEAP, "--out", str(tmp_path / "c.json"), "--storage", url]) == 2
    assert "does not exist" in _err(capsys)


def test_output_where_no_file_can_be_made_exits_2(tmp_path, capsys, no_model_load):
    # /proc accepts os.access(W_OK) for root but no file can be created there
    assert main([*CHEAP, "--out", "/proc/sparge-config.json"]) == 2
    assert "cannot write into /proc" in _err(capsys)


def test_corrupt_storage_exits_2(tmp_path, capsys, no_model_load):
    out = tmp_path / "c.json"
    out.with_name("c.optuna.db").write_bytes(b"this is not a database" * 100)
    assert main([*CHEAP, "--out", str(out)]) == 2
    assert "not a readable SQLite database" in _err(capsys)


def test_locked_storage_exits_2(tmp_path, capsys, monkeypatch, no_model_load):
    import calibrate.__main__ as cli

    monkeypatch.setattr(cli, "SQLITE_LOCK_WAIT_S", 0.2)
    out = tmp_path / "c.json"
    db = out.with_name("c.optuna.db")
    holder = sqlite3.connect(str(db))
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert main([*CHEAP, "--out", str(out)]) == 2
        assert "locked by another process" in _err(capsys)
    finally:
        holder.rollback()
        holder.close()


# --------------------------------------------------------------------------------------------
# the inputs a run uses
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cheap_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cheap") / "tiny.json"
    assert main([*CHEAP, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("extra,fragment", [
    (["--seed", "1"], "--seed: 0 there, 1 asked"),
    (["--samples", "2"], "windows (--samples + --holdout): 1 there, 2 asked"),
    (["--holdout", "1"], "windows (--samples + --holdout): 1 there, 2 asked"),
    (["--data", "OTHER"], "--data (corpus sha256)"),
])
def test_other_inputs_for_the_same_out_are_refused_with_a_way_out(cheap_run, tmp_path, capsys, extra, fragment):
    if extra[-1] == "OTHER":
        text = tmp_path / "other.txt"
        text.write_text("Another text entirely, long enough to cut one window from. " * 200)
        extra = ["--data", str(text)]
    before = cheap_run.read_text()
    assert main([*CHEAP, "--out", str(cheap_run), *extra]) == 2
    err = _err(capsys)
    assert fragment in err and "holds a capture of other inputs" in err and "rm -r" in err
    assert cheap_run.read_text() == before  # nothing was relabelled


def test_the_config_describes_the_inputs_and_the_model_it_was_made_from(cheap_run):
    cfg = ModelConfig.load(cheap_run)
    cal = cfg.calibration
    assert cal["seed"] == 0 and cal["data"] == "pydoc" and cal["data_sha256"] == load_corpus("pydoc").sha256
    meta = json.loads((cheap_run.with_name("tiny.capture") / "meta.json").read_text())
    assert cal["window_starts"] == meta["data"]["window_starts"] and meta["data"]["seed"] == 0
    assert cfg.model.architecture == "llama"
    model = calibrate.models.build_tiny_model("llama")
    assert cfg.model.fingerprint == weights_fingerprint(model)
    assert json.loads(cheap_run.read_text())["version"] == 2


def test_local_blocks_are_searched_with_and_written_into_every_layer(tmp_path):
    """``--local-blocks 1`` (the causal default): every layer of the config carries it, the calibration
    section records it, and the recorded sparsity is the one of the predictor *with* the forced blocks
    (the search evaluated it so: without them the same hyperparameters keep fewer blocks).
    ``--local-blocks 0`` is the paper's rule, and writes nothing."""
    from calibrate.capture import load_layer
    from calibrate.search import LayerEvaluator

    args = [*CHEAP, "--seq-len", "512", "--bisect-steps", "4"]  # 4 query blocks: room beyond the forced set
    out = tmp_path / "local.json"
    assert main([*args, "--local-blocks", "1", "--out", str(out)]) == 0
    cfg = ModelConfig.load(out)
    assert [lc.local_blocks for lc in cfg.layers] == [1] * len(cfg.layers) and len(cfg.layers) == 2
    assert cfg.calibration["local_blocks"] == 1
    assert all(layer["local_blocks"] == 1 for layer in json.loads(out.read_text())["layers"])
    lc = cfg.layer(0)
    assert not lc.is_dense and lc.sparsity > 0
    samples = load_layer(out.with_name("local.capture"), 0, "cpu", range(1))
    theta, budget = torch.tensor(lc.simthreshd1), torch.tensor(lc.cdfthreshd)
    spars = {local: LayerEvaluator(samples, is_causal=True, estimator=lc.estimator, local_blocks=local)
             .evaluate(theta, budget, None, "cdf").sparsity.mean().item() for local in (0, 1)}
    assert abs(spars[1] - lc.sparsity) < 1e-5 and spars[0] > spars[1] + 1e-3
    default = tmp_path / "default.json"  # without the flag: 1 for causal attention
    assert main([*args, "--out", str(default)]) == 0
    assert ModelConfig.load(default).calibration["local_blocks"] == 1
    plain = tmp_path / "plain.json"  # 0: the paper's forced set, nothing written, as before
    assert main([*args, "--local-blocks", "0", "--out", str(plain)]) == 0
    assert "local_blocks" not in ModelConfig.load(plain).calibration
    assert all("local_blocks" not in layer for layer in json.loads(plain.read_text())["layers"])


def test_files_get_normal_permissions(tmp_path, umask_022):
    out = tmp_path / "perm.json"
    assert main([*CHEAP, "--out", str(out)]) == 0
    capture = out.with_name("perm.capture")
    for path in (out, out.with_suffix(".png"), capture / "meta.json", capture / "timing.json",
                 capture / "L000" / "S000.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_a_truncated_timing_file_does_not_break_resume(tmp_path, caplog):
    out = tmp_path / "t.json"
    assert main([*CHEAP, "--out", str(out)]) == 0
    timing = out.with_name("t.capture") / "timing.json"
    timing.write_text('{"model_load_s": 1.')
    assert main([*CHEAP, "--out", str(out)]) == 0
    assert "ignoring" in caplog.text and "timing.json" in caplog.text
    assert ModelConfig.load(out).calibration["model_load_seconds"] is None


# --------------------------------------------------------------------------------------------
# faults
# --------------------------------------------------------------------------------------------
def test_disk_full_during_capture_exits_2_and_leaves_no_partial_files(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(tensors, filename, *a, **kw):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "d.json"
    assert main([*CHEAP, "--out", str(out)]) == 2
    err = _err(capsys)
    assert "No space left on device" in err and "free disk space" in err
    capture = out.with_name("d.capture")
    assert not list(capture.rglob("*.tmp")) and not list(capture.rglob("*.safetensors"))
    monkeypatch.undo()
    assert main([*CHEAP, "--out", str(out)]) == 0  # rerun after freeing space: it works


def test_stale_temporaries_of_a_killed_capture_are_cleaned(tmp_path):
    out = tmp_path / "s.json"
    layer = out.with_name("s.capture") / "L000"
    layer.mkdir(parents=True)
    stale = layer / ".S000.safetensors.x1y2z3.tmp"
    stale.write_bytes(b"half a tensor")
    assert main([*CHEAP, "--out", str(out)]) == 0
    assert not stale.exists() and (layer / "S000.safetensors").is_file()


def test_a_killed_batch_is_not_recorded_twice(tmp_path, monkeypatch):
    """A worker killed in the middle of recording a batch leaves none of it (one transaction); the
    resumed search records the batch again, and a batch recorded twice is stored once."""
    from calibrate import trial_store
    from calibrate.search import Evaluation
    from calibrate.study import CalibrationStore, open_storage

    store = CalibrationStore(open_storage(f"sqlite:///{tmp_path}/s.db"), "sparge/x")
    batch = [Evaluation((0.5, 0.5), (0.9 + i / 100, 0.95), None, (0.01, 0.02), (0.3, 0.4), "stage1", i)
             for i in range(5)]
    study = store.layer_study(0)
    real = trial_store.distribution_to_json
    calls = {"n": 0}

    def dies_in_the_third_trial(dist):
        calls["n"] += 1
        if calls["n"] == 2 * 7 + 3:  # 7 params a trial: the kill lands inside the third trial
            raise KeyboardInterrupt
        return real(dist)

    monkeypatch.setattr(trial_store, "distribution_to_json", dies_in_the_third_trial)
    with pytest.raises(KeyboardInterrupt):
        store.record_evaluations(0, batch, 0.08)
    monkeypatch.setattr(trial_store, "distribution_to_json", real)
    assert study.get_trials(deepcopy=False) == []  # nothing of the batch was committed
    resumed = CalibrationStore(open_storage(f"sqlite:///{tmp_path}/s.db"), "sparge/x")  # a new process
    resumed.record_evaluations(0, batch, 0.08)
    resumed.record_evaluations(0, batch[2:], 0.08)  # the same points again
    again = CalibrationStore(open_storage(f"sqlite:///{tmp_path}/s.db"), "sparge/x")
    again.record_evaluations(0, batch, 0.08)  # and from a third process, which reads what is stored
    trials = again.layer_study(0).get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert sorted(t.params["step"] for t in trials) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_python_dash_m_calibrate_runs_two_workers(tmp_path):
    out = tmp_path / "w.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cheap = [a for a in CHEAP if a != "--quiet"]
    cheap = cheap[: cheap.index("--layers")]  # both layers
    run = subprocess.run([sys.executable, "-m", "calibrate", *cheap, "--workers", "2", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Can't get attribute" not in run.stderr, run.stderr[-3000:]
    assert "started 1 extra worker process" in run.stderr
    assert len(ModelConfig.load(out).layers) == 2


# --------------------------------------------------------------------------------------------
# what a new user reads
# --------------------------------------------------------------------------------------------
def test_help_shows_defaults_every_bundled_model_and_quiet():
    text = build_parser().format_help()
    for name in calibrate.models.available_models():
        assert name in text
    assert "(default: 0.08)" in text and "(default: 0)" in text and "--quiet" in text and "progress bars" in text


def test_summary_says_when_no_layer_could_be_made_sparse():
    heads = 4
    cfg = ModelConfig(ModelInfo("tiny-llama", 2, heads, 2, 64), (LayerConfig.dense(0, heads), LayerConfig.dense(1, heads)),
                      l1=0.08, pv_l1=0.09, calibration={"seconds": 1.0, "evaluations": 10, "device": "cpu"})
    text = summary(cfg, {})
    assert "no layer could be made sparse within the bound" in text
    assert NO_SPARSE_LAYER.format(l1=0.08, pv_l1=0.09) in text and "tiny-llama" in text
    sparse = LayerConfig(0, (-1.0,) * heads, (50.0,) * heads, cdfthreshd=(0.9,) * heads, sparsity=0.3, l1=0.05)
    cfg2 = ModelConfig(cfg.model, (sparse, LayerConfig.dense(1, heads)), l1=0.08, pv_l1=0.09,
                       calibration=cfg.calibration)
    assert "no layer could be made sparse" not in summary(cfg2, {})
    # the time objective that ruled every sparse candidate out says that dense was faster, not "could not"
    timed = ModelConfig(cfg.model, cfg.layers, l1=0.08, pv_l1=0.09, calibration={
        **cfg.calibration, "objective": "time", "pruned_candidates": 4, "seq_len": 8192,
        "cost_model": {"gpu": "NVIDIA H200"}})
    text = summary(timed, {})
    assert "the time objective kept every layer dense: on NVIDIA H200" in text and "4 executor candidates" in text
    assert "no layer could be made sparse" not in text


def test_a_capture_made_elsewhere_is_calibrated_without_data_checks(tmp_path):
    """A DiT capture (evals.dit.capture: source "dit") has no corpus or window seed: --data and --seed do
    not apply to it, and the calibration of its layers runs as before (scripts/gpu_dit_session.sh)."""
    from calibrate.capture import CaptureMeta, sample_path, save_tensors_atomic
    from sparge_core.atomic import write_json_atomic
    from sparge_core.synthetic import structured_qkv

    cap = tmp_path / "cap-t2i"
    for s in range(2):
        q, k, v = structured_qkv(1, 2, 2, 256, 64, dtype=torch.float16, seed=s)
        save_tensors_atomic(sample_path(cap, 0, s), {"q": q, "k": k, "v": v})
    meta = CaptureMeta("t2i", 1, 2, 2, 64, 256, 2, "dit-prompts", "0" * 64, "float16", (0,), source="dit")
    write_json_atomic(cap / "meta.json", {**meta.to_dict(), "is_causal": False})
    out = tmp_path / "t2i-config.json"
    args = ["--model", "t2i", "--samples", "1", "--holdout", "1", "--seq-len", "256", "--capture-dir", str(cap),
            "--non-causal", "--l1", "0.05", "--pv-l1", "0.06", "--thetas", "-1", "--bisect-steps", "2", "--no-pv",
            "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(args) == 0
    cfg = ModelConfig.load(out)
    assert cfg.model.name == "t2i" and cfg.calibration["data"] == "dit-prompts" and len(cfg.layers) == 1


def test_a_late_error_keeps_the_config(tmp_path, capsys, monkeypatch):
    """The search's result is written before the hold-out check and the plot: a fault there (here: a
    full disk) leaves a valid config."""
    import calibrate.__main__ as cli

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli, "validate_holdout", full)
    out = tmp_path / "late.json"
    assert main([*CHEAP[: CHEAP.index("--holdout")], *CHEAP[CHEAP.index("--holdout") + 2:], "--holdout", "1",
                 "--out", str(out)]) == 2
    assert "No space left on device" in _err(capsys)
    assert ModelConfig.load(out).layers[0].layer == 0
