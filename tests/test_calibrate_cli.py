"""The calibration CLI end to end on tiny-llama: config output, bad input (exit 2), kill -9 and
resume, and two workers sharing a PostgreSQL storage."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calibrate.__main__ import main
from sparge_core.params import ModelConfig

# small and quick: 2 layers, 2 x 512 tokens, a short grid; l1 loose enough that the random model's
# attention admits some sparsity (so equality checks compare real choices)
FAST = ["--model", "tiny-llama", "--samples", "2", "--seq-len", "512", "--device", "cpu", "--l1", "0.3",
        "--pv-l1", "0.35", "--thetas", "-1", "0.5", "--bisect-steps", "4", "--quiet"]

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _layers(cfg: ModelConfig):
    return [lc.to_dict() for lc in cfg.layers]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "tiny.json"
    assert main([*FAST, "--out", str(out)]) == 0
    return ModelConfig.load(out)


def test_cli_writes_a_valid_config_plot_and_summary(reference_run, tmp_path, capsys):
    cfg = reference_run
    assert cfg.model.name == "tiny-llama" and len(cfg.layers) == 2 and cfg.l1 == 0.3
    assert cfg.calibration["samples"] == 2 and cfg.calibration["evaluations"] > 0
    assert "holdout_l1" in cfg.calibration
    for lc in cfg.layers:
        assert lc.num_heads == 4
        assert lc.l1 <= 0.35 + 1e-9
    assert any((lc.sparsity or 0) > 0 for lc in cfg.layers), "the loose bound should admit some sparsity"


def test_margin_tightens_the_search_and_is_recorded(reference_run, tmp_path):
    out = tmp_path / "m.json"
    assert main([*FAST, "--margin", "0.5", "--out", str(out)]) == 0
    cfg = ModelConfig.load(out)
    assert cfg.l1 == 0.3 and cfg.calibration["margin"] == 0.5 and cfg.calibration["estimator"] == "keys"
    for tight, loose in zip(cfg.layers, reference_run.layers):
        assert tight.estimator == "keys"
        assert tight.l1 <= 0.5 * 0.35 + 1e-9
        assert (tight.sparsity or 0) <= (loose.sparsity or 0) + 1e-9


def test_resume_reuses_finished_layers(reference_run, tmp_path):
    out = tmp_path / "tiny.json"
    assert main([*FAST, "--out", str(out)]) == 0
    first = out.read_text()
    db_trials = _trial_counts(out)
    assert main([*FAST, "--out", str(out)]) == 0  # everything finished: nothing is evaluated again
    assert _trial_counts(out) == db_trials
    assert json.loads(out.read_text())["layers"] == json.loads(first)["layers"]
    assert _layers(ModelConfig.load(out)) == _layers(reference_run)


def _trial_counts(out: Path) -> dict:
    import optuna

    from calibrate.study import default_storage_url

    url = default_storage_url(out)
    return {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(url) if "/L" in s.study_name}


def _layer_done(out: Path, layer: int) -> bool:
    import optuna

    from calibrate.study import default_storage_url

    url = default_storage_url(out)
    try:
        study = optuna.load_study(study_name=f"sparge/tiny-llama/L{layer:03d}", storage=url)
    except Exception:
        return False
    return "result" in study.user_attrs


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_matches_a_clean_run(reference_run, tmp_path):
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, "-m", "calibrate", *FAST, "--bisect-steps", "10", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not _layer_done(out, 0):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "killed before the end: no config yet"
    counts = _trial_counts(out)
    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = _trial_counts(out)
    assert after["sparge/tiny-llama/L000"] == counts["sparge/tiny-llama/L000"], "layer 0 was redone"
    clean = tmp_path / "clean.json"
    assert main([*FAST, "--bisect-steps", "10", "--out", str(clean)]) == 0
    assert _layers(ModelConfig.load(out)) == _layers(ModelConfig.load(clean))


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--model", "no-such-model"], "no model named 'no-such-model'"),
        (["--l1", "0"], "--l1 must be a finite number > 0"),
        (["--pv-l1", "0.1"], "--pv-l1 (0.1) must be >= --l1 (0.3)"),
        (["--seq-len", "100000"], "beyond tiny-llama's context"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["--layers", "0-9"], "out of range"),
        (["--layers", "x"], "--layers must look like"),
        (["--margin", "0"], "--margin must be in (0, 1]"),
        (["--margin", "1.5"], "--margin must be in (0, 1]"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, extra, fragment):
    assert main([*FAST, "--out", str(tmp_path / "c.json"), *extra]) == 2
    assert fragment in capsys.readouterr().err


def test_too_short_data_exits_2(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("only a few words of text here")
    assert main([*FAST, "--data", str(text), "--out", str(tmp_path / "c.json")]) == 2
    assert "--data" in capsys.readouterr().err


def test_unwritable_output_exits_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert main([*FAST, "--out", str(ro / "c.json")]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_storage_of_another_setting_exits_2(reference_run, tmp_path, capsys):
    out = tmp_path / "a.json"
    assert main([*FAST, "--out", str(out)]) == 0
    from calibrate.study import default_storage_url

    other = [*FAST, "--l1", "0.2", "--out", str(tmp_path / "b.json"), "--storage", default_storage_url(out),
             "--capture-dir", str(out.with_name("a.capture"))]
    assert main(other) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.postgres
def test_two_workers_on_postgres_equal_one_worker(reference_run, tmp_path):
    url = os.environ.get("SPARGE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("SPARGE_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)")
    import optuna

    from calibrate.study import CalibrationStore, open_storage

    for s in optuna.get_all_study_summaries(url):  # a clean run every time
        optuna.delete_study(study_name=s.study_name, storage=url)
    CalibrationStore(open_storage(url), "sparge/tiny-llama").delete_bookkeeping()
    out = tmp_path / "pg.json"
    assert main([*FAST, "--workers", "2", "--storage", url, "--out", str(out)]) == 0
    assert _layers(ModelConfig.load(out)) == _layers(reference_run)
    # both layers were worked on exactly once (one completed claim each)
    claims = CalibrationStore(open_storage(url), "sparge/tiny-llama").claims()
    assert sorted(c["layer"] for c in claims if c["state"] == "done") == [0, 1]
    # a worker joining a finished run has nothing to do and exits 0
    join = subprocess.run([sys.executable, "-m", "calibrate", *FAST, "--join", "--storage", url,
                           "--out", str(tmp_path / "join.json"), "--capture-dir", str(out.with_name("pg.capture"))],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert join.returncode == 0, join.stderr[-2000:]
