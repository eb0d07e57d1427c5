"""Workers on several devices (CPU here): device assignment, two workers give the one-worker config,
a worker killed mid-layer is replaced, and the Optuna record of a time-objective run tells the truth
(only layer studies; the best trial of each is the config's point)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from calibrate.__main__ import main
from calibrate.study import CalibrationStore, default_storage_url, open_storage
from calibrate.workers import DeviceError, assign_devices, parse_devices
from sparge_core.params import ModelConfig

FAST = ["--model", "tiny-llama", "--samples", "2", "--seq-len", "512", "--device", "cpu", "--l1", "0.3",
        "--pv-l1", "0.35", "--thetas", "-1", "0.5", "--bisect-steps", "4", "--quiet"]
REPO = Path(__file__).resolve().parents[1]
RUN = "sparge/tiny-llama"


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _layers(path):
    return [lc.to_dict() for lc in ModelConfig.load(path).layers]


def test_device_lists():
    assert parse_devices("cpu,cpu", "cpu") == ["cpu", "cpu"]
    assert parse_devices(None, "cpu") == ["cpu"] and parse_devices(None, "cuda") == ["cuda:0"]
    assert assign_devices(1, ["cpu"]) == ["cpu"]
    assert assign_devices(4, ["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    with pytest.raises(DeviceError, match="fewer than"):
        assign_devices(1, ["cpu", "cpu"])
    with pytest.raises(DeviceError, match="not a device"):
        parse_devices("gpu0", "cpu")
    if torch.cuda.is_available():
        with pytest.raises(DeviceError, match="mixes"):
            parse_devices("cpu,cuda:0", "cpu")
    else:
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            parse_devices("all", "cpu")
        with pytest.raises(DeviceError, match="does not exist"):
            parse_devices("cuda:3", "cpu")


def test_bad_devices_exit_2(tmp_path, capsys):
    assert main([*FAST, "--devices", "tpu", "--out", str(tmp_path / "c.json")]) == 2
    assert "--devices" in capsys.readouterr().err


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "tiny.json"
    assert main([*FAST, "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_two_cpu_workers_equal_one_worker(one_worker, tmp_path):
    out = tmp_path / "two.json"
    assert main([*FAST, "--devices", "cpu,cpu", "--out", str(out)]) == 0
    assert _layers(out) == _layers(one_worker)
    cfg = ModelConfig.load(out)
    assert cfg.calibration["workers"] == 2 and cfg.calibration["worker_exit_codes"] == [0]
    claims = CalibrationStore(open_storage(default_storage_url(out)), RUN).claims()
    assert sorted(c["layer"] for c in claims if c["state"] == "done") == [0, 1]


def _running_claim_of_a_child(out: Path, parent: int):
    url = default_storage_url(out)
    if not Path(url.removeprefix("sqlite:///")).exists():
        return None
    try:
        claims = CalibrationStore(open_storage(url), RUN).claims()
    except Exception:  # noqa: BLE001 - the tables are being created
        return None
    for c in claims:
        pid = int(c["worker"].split(":")[1])
        if c["state"] == "running" and pid != parent:
            return c, pid
    return None


@pytest.mark.slow
def test_a_worker_killed_mid_layer_is_replaced(tmp_path):
    # slow enough per layer (about 50 evaluations) that the spawned worker claims a layer before the
    # first worker has finished both
    args = [*FAST, "--seq-len", "1024", "--thetas", "-1", "0.2", "0.5", "0.8", "--bisect-steps", "10"]
    out = tmp_path / "killed.json"
    proc = subprocess.Popen([sys.executable, "-m", "calibrate", *args, "--devices", "cpu,cpu", "--out", str(out)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    found = None
    while found is None:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the second worker never claimed a layer"
        time.sleep(0.2)
        found = _running_claim_of_a_child(out, proc.pid)
    claim, child = found
    time.sleep(1.0)  # mid-layer: it has evaluated some points
    os.kill(child, signal.SIGKILL)
    output = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0, output[-3000:]
    clean = tmp_path / "clean.json"
    assert main([*args, "--out", str(clean)]) == 0
    assert _layers(out) == _layers(clean)
    claims = CalibrationStore(open_storage(default_storage_url(out)), RUN).claims()
    mine = [c for c in claims if c["layer"] == claim["layer"]]
    assert any(c["id"] == claim["id"] and c["state"] == "failed" for c in mine)
    assert any(c["state"] == "done" and int(c["worker"].split(":")[1]) == proc.pid for c in mine)
    assert ModelConfig.load(out).calibration["worker_exit_codes"] == [-signal.SIGKILL]


def _cost_model_file(path: Path) -> Path:
    """A synthetic cost model at head dim 64 under which sparse attention pays on tiny-llama at 512 tokens."""
    from calibrate.cost import CostModel

    def lin(fixed, pair, saved=0.0):
        d = {"fixed_ms": fixed, "per_row_ns": 0.0, "per_pair_ns": pair, "source": "assumed: test"}
        if saved:
            d["pv_saved_ns"] = saved
        return {"64": d}

    CostModel.from_dict({
        "format": "sparge-cost-model", "version": 1, "gpu": "Synthetic GPU",
        "kernels": {"dense": lin(0.0, 1e4), "none": lin(0.001, 1e4), "none+pv": lin(0.001, 1.6e4),
                    "int8": lin(0.001, 0.8e4)},
        "predictors": {"keys": {"64": {"fixed_ms": 0.001, "per_row_ns": 0.0, "per_pair_ns": 0.0,
                                       "source": "assumed: test"}}},
        "launch_ms": {"none": 0.0, "int8": 0.0}}).save(path)
    return path


@pytest.mark.slow
def test_time_objective_record_and_config(tmp_path, capsys):
    cost = _cost_model_file(tmp_path / "cost.json")
    out = tmp_path / "time.json"
    assert main([*FAST, "--cost-model", str(cost), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "predicted attention speed-up" in printed and "speed-up" in printed.splitlines()[0]
    cfg = ModelConfig.load(out)
    assert cfg.calibration["objective"] == "time" and cfg.calibration["cost_model"]["gpu"] == "Synthetic GPU"
    assert cfg.calibration["predicted_attention"]["speedup"] >= 1.0
    url = default_storage_url(out)
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(url))
    assert names == [f"{RUN}/L000", f"{RUN}/L001"]  # no bookkeeping studies
    for lc in cfg.layers:
        assert lc.variant is not None and lc.predicted is not None
        assert lc.predicted.ms <= lc.predicted.dense_ms + 1e-12  # never slower than dense, by prediction
        assert not (lc.variant.dense is False and lc.variant.stage2)  # stage 2 costs 1.6x here: never pays
        study = optuna.load_study(study_name=f"{RUN}/L{lc.layer:03d}", storage=url)
        assert study.direction == optuna.study.StudyDirection.MINIMIZE
        best = study.best_trial
        assert best.value == pytest.approx(lc.predicted.ms)
        assert all(c <= 0 for c in best.constraints.values()) and len(best.constraints) == lc.num_heads
        if lc.is_dense:
            assert best.params["variant"] == "dense"
            continue
        assert best.params["variant"] == lc.variant.quant and best.params["estimator"] == lc.estimator
        key = "topk" if lc.topk is not None else "cdfthreshd"
        for h in range(lc.num_heads):
            assert best.params[f"h{h:02d}.{key}"] == pytest.approx((lc.topk or lc.cdfthreshd)[h])
            if f"h{h:02d}.simthreshd1" in best.params:
                assert best.params[f"h{h:02d}.simthreshd1"] == pytest.approx(lc.simthreshd1[h])
        stages = {t.params["stage"] for t in study.trials}
        assert {"dense", "stage1"} <= stages


@pytest.mark.slow
def test_sparsity_objective_best_trial_is_the_config(one_worker):
    cfg = ModelConfig.load(one_worker)
    assert cfg.calibration["objective"] == "sparsity"
    url = default_storage_url(one_worker)
    for lc in cfg.layers:
        study = optuna.load_study(study_name=f"{RUN}/L{lc.layer:03d}", storage=url)
        best = study.best_trial
        assert best.params["stage"] == "chosen" or best.value == pytest.approx(lc.sparsity, abs=1e-6)
        assert best.value == pytest.approx(lc.sparsity, abs=1e-6)
        assert best.user_attrs["sparsity"] == pytest.approx([study.user_attrs["result"]["heads"][h]["sparsity"]
                                                             for h in range(lc.num_heads)])


@pytest.mark.gpu
def test_two_gpus_equal_one(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    gpu = ["--model", "tiny-llama", "--samples", "2", "--seq-len", "1024", "--device", "cuda", "--l1", "0.3",
           "--pv-l1", "0.35", "--thetas", "-1", "0.5", "--bisect-steps", "4", "--quiet"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main([*gpu, "--out", str(one)]) == 0
    assert main([*gpu, "--devices", "cuda:0,cuda:1", "--out", str(two)]) == 0
    assert _layers(one) == _layers(two)
    assert ModelConfig.load(two).calibration["devices"] == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("extra,fragment", [
    (["--objective", "time"], "needs a cost model"),
    (["--cost-model", "/no/such.json"], "does not exist"),
    (["--estimator", "keys,pooled", "--objective", "sparsity"], "one estimator"),
])
def test_objective_input_errors_exit_2_before_any_work(tmp_path, capsys, extra, fragment):
    out = tmp_path / "c.json"
    assert main([*FAST, *extra, "--out", str(out)]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.with_name("c.capture").exists(), "refused after capturing"


def test_an_unknown_estimator_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main([*FAST, "--estimator", "mean", "--out", str(tmp_path / "c.json")])
    assert err.value.code == 2 and "expected estimators" in capsys.readouterr().err
