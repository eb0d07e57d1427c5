"""calibrate.cost and calibrate.profile: fits recover known costs, validated files, predictions, the
shipped H100 default, and the profile command (CPU refusal, dry run, bench-CSV conversion)."""

import json
import math
from pathlib import Path

import pytest
import torch

from calibrate.cost import (
    CallShape,
    CostModel,
    CostModelError,
    LinearCost,
    Timing,
    default_cost_model_path,
    fit_linear,
    gpu_slug,
)
from calibrate.profile import FAKE_COSTS, FAKE_GRAPH_FACTOR, FAKE_HOST_MS
from calibrate.profile import main as profile_main

REPO = Path(__file__).resolve().parents[1]
H100 = REPO / "results" / "kernel" / "h100-80gb-hbm3-cost.json"


def _timings(fixed, per_row, per_pair, saved=0.0, noise=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rows in (256, 1024, 4096, 8192):
        for dens in (1.0, 0.5, 0.2, 0.1):
            pairs = dens * rows * 200
            skipped = pairs * (0.3 if saved else 0.0) * (0.5 + dens)
            ms = fixed + 1e-6 * (per_row * rows + per_pair * pairs - saved * skipped)
            ms *= 1 + noise * float(torch.randn((), generator=gen))
            out.append(Timing(ms, rows, pairs, skipped, f"rows={rows} dens={dens}"))
    return out


def test_fit_recovers_known_costs_exactly_without_noise():
    fit = fit_linear(_timings(0.25, 30.0, 9.5))
    assert fit.fixed_ms == pytest.approx(0.25, rel=1e-6)
    assert fit.per_row_ns == pytest.approx(30.0, rel=1e-5)
    assert fit.per_pair_ns == pytest.approx(9.5, rel=1e-6)
    assert fit.fit.points == 16 and fit.fit.rms_rel < 1e-9


def test_fit_with_skips_and_noise_is_close_and_reports_its_error():
    fit = fit_linear(_timings(0.1, 20.0, 12.0, saved=4.0, noise=0.01, seed=3), with_skip=True)
    assert fit.per_pair_ns == pytest.approx(12.0, rel=0.03)
    assert fit.pv_saved_ns == pytest.approx(4.0, rel=0.25)
    assert 0.001 < fit.fit.rms_rel < 0.03 and fit.fit.max_rel >= fit.fit.rms_rel and fit.fit.worst


def test_one_host_bound_outlier_does_not_drag_the_fit():
    points = _timings(0.2, 25.0, 8.0)
    bad = points[0]
    points[0] = Timing(bad.ms * 4, bad.rows, bad.pairs, 0.0, "outlier")  # a small call stuck behind the host
    fit = fit_linear(points)
    assert fit.per_pair_ns == pytest.approx(8.0, rel=0.05)
    assert fit.fit.max_rel > 0.5 and "outlier" in fit.fit.worst  # the error report still shows it


def test_coefficients_are_never_negative():
    pts = [Timing(1.0 + 0.001 * i, 100.0 * i + 1, 10.0 * i + 1, 0, str(i)) for i in range(6)]
    fit = fit_linear(pts)
    assert min(fit.fixed_ms, fit.per_row_ns, fit.per_pair_ns) >= 0


def _model(**changes) -> dict:
    def lin(fixed, row, pair, saved=None, source="measured"):
        d = {"fixed_ms": fixed, "per_row_ns": row, "per_pair_ns": pair, "source": source}
        if saved is not None:
            d["pv_saved_ns"] = saved
        return d

    d = {"format": "sparge-cost-model", "version": 1, "gpu": "Test GPU",
         "kernels": {"dense": {"64": lin(0.0, 10.0, 5.0)}, "none": {"64": lin(0.1, 12.0, 9.0)},
                     "none+pv": {"64": lin(0.1, 12.0, 13.0, 2.0, "assumed: test")}},
         "predictors": {"pooled": {"64": lin(0.3, 1.0, 0.05)}}, "launch_ms": {"none": 0.2}}
    d.update(changes)
    return d


def test_predict_ms_follows_the_formulas():
    m = CostModel.from_dict(_model())
    shape = CallShape(8192, 8192, 9, 64, True)
    allowed = shape.allowed_pairs
    dense = 1e-6 * (10.0 * shape.rows + 5.0 * allowed)
    assert m.predict_ms("dense", 8192, 8192, 9, 64, True, 0.3) == pytest.approx(dense)
    fixed = 0.2 + 0.3 + 1e-6 * (1.0 * shape.rows + 0.05 * shape.score_pairs) + 0.1 + 1e-6 * 12.0 * shape.rows
    assert m.predict_ms("none", 8192, 8192, 9, 64, True, 0.3) == pytest.approx(fixed + 1e-6 * 9.0 * 0.3 * allowed)
    with_pv = m.predict_ms("none+pv", 8192, 8192, 9, 64, True, 0.3, pv_skip=0.5)
    assert with_pv == pytest.approx(fixed + 1e-6 * (13.0 - 2.0 * 0.5) * 0.3 * allowed)
    assert m.predict_ms("none", 8192, 8192, 9, 64, True, 0.2) < m.predict_ms("none", 8192, 8192, 9, 64, True, 0.3)
    assert shape.allowed_pairs < CallShape(8192, 8192, 9, 64, False).allowed_pairs


def test_the_host_floor_bounds_every_prediction_from_below():
    floors = {"dense": 0.02, "none": 5.0, "none+pv": 6.0}
    m, bare = CostModel.from_dict(_model(host_ms=floors)), CostModel.from_dict(_model())
    small = (2048, 2048, 9, 64, True)
    # tiny call: the host floor decides; the GPU formula is below it
    assert bare.predict_ms("none", *small, 0.3) < 5.0 and m.predict_ms("none", *small, 0.3) == 5.0
    assert m.predict_ms("none+pv", *small, 0.3, pv_skip=0.5) == 6.0
    assert m.predict_ms("dense", *small, 1.0) == max(0.02, bare.predict_ms("dense", *small, 1.0))
    shape = CallShape(*small)
    assert m.sparse_lower_bound_ms(shape, "none", False, "pooled") == 5.0
    assert m.sparse_fixed_ms(shape, "none", False, "pooled") == bare.sparse_fixed_ms(shape, "none", False, "pooled")
    # a large call is above every floor: the prediction is the GPU formula
    big = (131072, 131072, 32, 64, False)
    assert m.predict_ms("none", *big, 0.5) == bare.predict_ms("none", *big, 0.5) > 5.0
    assert m.host_floor("int8") == 0.0  # a key without a floor
    assert CostModel.from_dict(m.to_dict()) == m and "host_ms" in m.to_dict() and "host_ms" not in bare.to_dict()


def test_round_trip_and_digest(tmp_path):
    m = CostModel.from_dict(_model())
    m.save(tmp_path / "c.json")
    back = CostModel.load(tmp_path / "c.json")
    assert back == m and back.sha256() == m.sha256() and back.path == str(tmp_path / "c.json")


@pytest.mark.parametrize("change,fragment", [
    ({"format": "x"}, "format must be"),
    ({"kernels": {"none": {"64": {"fixed_ms": 0, "per_row_ns": 0, "per_pair_ns": 1, "source": "measured"}}}},
     "kernels.dense is missing"),
    ({"kernels": {"dense": {"64": {"fixed_ms": 0, "per_row_ns": 0, "per_pair_ns": -1, "source": "measured"}},
                  "none": {"64": {"fixed_ms": 0, "per_row_ns": 0, "per_pair_ns": 1, "source": "measured"}}}},
     "kernels.dense.64.per_pair_ns must be >= 0"),
    ({"kernels": {"dense": {"64": {"fixed_ms": 0, "per_row_ns": 0, "per_pair_ns": 1, "source": "guess"}},
                  "none": {"64": {"fixed_ms": 0, "per_row_ns": 0, "per_pair_ns": 1, "source": "measured"}}}},
     "kernels.dense.64.source"),
    ({"kernels": {"dense": {"sixty": {}}}}, "head dims"),
    ({"kernels": {"dense": {"64": {"fixed_ms": 0, "per_row_ns": 0, "per_pair_ns": 1, "source": "measured"}},
                  "int4": {}}}, "kernels.int4 is not a kernel variant"),
    ({"predictors": {"mean": {}}}, "predictors.mean is not an estimator"),
    ({"launch_ms": {}}, "launch_ms.none is missing"),
    ({"launch_ms": {"none": "fast"}}, "launch_ms.none must be a finite number"),
    ({"host_ms": {"int4": 0.1}}, "host_ms.int4 is not a kernel key"),
    ({"host_ms": {"none": -0.1}}, "host_ms.none must be >= 0"),
])
def test_malformed_files_name_the_field(change, fragment):
    with pytest.raises(CostModelError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        CostModel.from_dict(_model(**change))


def test_missing_variant_or_head_dim_is_a_clear_error(tmp_path):
    m = CostModel.from_dict(_model())
    with pytest.raises(CostModelError, match="no kernel variant 'int8'"):
        m.predict_ms("int8", 1024, 1024, 4, 64, False, 0.5)
    with pytest.raises(CostModelError, match="no head_dim 128 in kernels.none"):
        m.predict_ms("none", 1024, 1024, 4, 128, False, 0.5)
    with pytest.raises(CostModelError, match="does not exist"):
        CostModel.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CostModelError, match="not valid JSON"):
        CostModel.load(tmp_path / "bad.json")


def test_default_file_lookup(tmp_path):
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert default_cost_model_path("NVIDIA H100 80GB HBM3", [REPO]) == H100
    assert default_cost_model_path("NVIDIA H200", [tmp_path]) is None


def test_the_shipped_h100_model_is_labelled_and_sane():
    m = CostModel.load(H100)
    assert m.gpu == "NVIDIA H100 80GB HBM3" and "h100-80gb-hbm3.csv" in m.source
    for d in (64, 128):
        assert m.kernel("none", d).source == "measured" and m.kernel("int8", d).source == "measured"
        assert m.kernel("none+pv", d).source.startswith("assumed") and m.predictor("keys", d).source.startswith("assumed")
        assert m.kernel("none", d).fit.points == 60 and m.kernel("dense", d).fit.rms_rel < 0.1
        # the stage-2-on kernel costs more than stage 2 off, the INT8 kernel less than bf16 per pair
        assert m.kernel("none+pv", d).per_pair_ns > m.kernel("none", d).per_pair_ns > m.kernel("int8", d).per_pair_ns
    assert any("1.35-1.6x" in a for a in m.assumptions)
    assert 1.2 < m.checks["implied_stage2_factor.none"]["factor"] < 1.7  # the pipeline rows agree with the assumption
    # at N=32K the block-sparse kernel at 10% density beats dense SDPA; at SmolLM2's 8K / 9 heads / D=64 its
    # fixed costs alone exceed dense attention (results/speed: 1.31 ms sparse vs 0.22 ms dense per layer)
    assert m.predict_ms("int8", 32768, 32768, 32, 128, True, 0.1) < m.predict_ms("dense", 32768, 32768, 32, 128, True, 1)
    small_dense = m.predict_ms("dense", 8192, 8192, 9, 64, True, 1.0)
    assert m.predict_ms("none", 8192, 8192, 9, 64, True, 0.05, "pooled") > small_dense
    assert 0.1 < small_dense < 0.4


# --------------------------------------------------------------------------------------------
# the profile command
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_profile_refuses_without_a_gpu(tmp_path, capsys):
    assert profile_main(["--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert "CUDA GPU" in err and "--dry-run" in err
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("argv,fragment", [
    (["--estimators", "mean"], "--estimators"), (["--quants", "int4"], "--quants"), (["--densities", "0"], "--densities"),
    (["--from-bench-csv", "/no/such.csv"], "cannot read"),
])
def test_profile_bad_input_exits_2(argv, fragment, capsys, tmp_path):
    assert profile_main([*argv, "--out", str(tmp_path / "c.json")]) == 2
    assert fragment in capsys.readouterr().err


def test_profile_dry_run_fits_the_fake_timer_costs(tmp_path):
    out = tmp_path / "dry.json"
    assert profile_main(["--dry-run", "--quiet", "--out", str(out)]) == 0
    m = CostModel.load(out)
    assert m.gpu.startswith("dry-run") and "FAKE" in m.source
    for key in ("none", "none+pv", "int8", "int8+pv", "dense"):
        _, _, per_pair, saved = FAKE_COSTS["dense" if key == "dense" else f"kernel/{key}"]
        fit = m.kernel(key, 64)
        assert fit.per_pair_ns == pytest.approx(per_pair, rel=0.05), key
        assert fit.fit.rms_rel < 0.02
        if saved:
            assert fit.pv_saved_ns == pytest.approx(saved, rel=0.3), key
    for est in ("pooled", "keys"):
        assert m.predictor(est, 64).per_pair_ns == pytest.approx(FAKE_COSTS[f"predictor/{est}"][2], rel=0.1)
    for quant in ("none", "int8"):
        assert m.launch(quant) == pytest.approx(FAKE_COSTS[f"launch/{quant}"], abs=0.02)
        assert m.checks[f"sparge_attn.{quant}"]["rms_rel"] < 0.03
    replayed = {k: FAKE_HOST_MS[k] * (1.0 if k == "dense" else FAKE_GRAPH_FACTOR)
                for k in ("dense", "none", "none+pv", "int8", "int8+pv")}
    assert m.host_ms == pytest.approx(replayed)


def test_profile_host_floor_only_updates_an_existing_model(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert profile_main(["--host-floor-only", "--dry-run", "--quiet", "--out", str(out)]) == 2
    assert "existing cost model" in capsys.readouterr().err
    CostModel.from_dict(_model(host_ms={"dense": 9.0, "int8+pv": 5.0})).save(out)
    assert profile_main(["--host-floor-only", "--dry-run", "--quiet", "--out", str(out)]) == 0
    m = CostModel.load(out)  # the floors are replaced, larger old ones included; sparse ones are replayed calls
    assert m.host_ms["dense"] == FAKE_HOST_MS["dense"]
    assert m.host_ms["int8+pv"] == pytest.approx(FAKE_HOST_MS["int8+pv"] * FAKE_GRAPH_FACTOR)
    assert m.kernels == CostModel.from_dict(_model()).kernels and "--host-floor-only" in m.source
    assert "CUDA-graph replay" in m.source
    assert profile_main(["--host-floor-only", "--eager-host-floors", "--dry-run", "--quiet", "--out", str(out)]) == 0
    m = CostModel.load(out)
    assert m.host_ms["int8+pv"] == FAKE_HOST_MS["int8+pv"] and "eager" in m.source


def test_profile_from_the_committed_bench_csv_reproduces_the_shipped_file(tmp_path):
    out = tmp_path / "h100.json"
    assert profile_main(["--from-bench-csv", str(REPO / "results/kernel/h100-80gb-hbm3.csv"), "--out", str(out)]) == 0
    fresh, shipped = json.loads(out.read_text()), json.loads(H100.read_text())
    fresh.pop("source"), shipped.pop("source")
    assert fresh == shipped


def test_profile_from_the_h200_csvs_measures_stage2_and_both_estimators(tmp_path):
    out = tmp_path / "h200.json"
    kernel_dir = REPO / "results/kernel"
    args = ["--from-bench-csv", str(kernel_dir / "h200-session1.csv"), "--predictor-csv", str(REPO / "results/predictor/h200.csv"),
            "--tune-csv", str(kernel_dir / "tune-h200.csv"), "--out", str(out)]
    assert profile_main(args) == 0
    fresh, shipped = json.loads(out.read_text()), json.loads((kernel_dir / "h200-bench-cost.json").read_text())
    fresh.pop("source"), shipped.pop("source")
    assert fresh == shipped
    m = CostModel.load(out)
    assert m.predictor("keys", 128).source == "measured" and m.predictor("pooled", 128).source == "measured"
    for d in (64, 128):  # stage 2 costs more than it saves on this card: every +pv kernel is slower
        on, off = m.kernel("none+pv", d), m.kernel("none", d)
        assert on.source.startswith("fitted") and on.per_pair_ns > 1.1 * off.per_pair_ns
    assert m.launch("none") >= 0 and m.launch("int8") >= 0


def test_profile_refuses_a_tune_csv_without_the_shipped_config(tmp_path):
    bad = tmp_path / "tune.csv"
    bad.write_text("gpu,n,d,heads,causal,density,quant,pv,config,ms\nX,8192,128,32,False,1.0,none,off,w1s1-select-pointer,1.0\n")
    args = ["--from-bench-csv", str(REPO / "results/kernel/h200-session1.csv"), "--tune-csv", str(bad),
            "--out", str(tmp_path / "o.json")]
    assert profile_main(args) == 2


def test_profile_merge(tmp_path, capsys):
    a, b = _model(), _model()
    b["kernels"] = {"dense": {"128": a["kernels"]["dense"]["64"]}, "none": {"128": a["kernels"]["none"]["64"]}}
    b["predictors"] = {"keys": {"128": a["predictors"]["pooled"]["64"]}}
    CostModel.from_dict(a).save(tmp_path / "a.json")
    CostModel.from_dict(b).save(tmp_path / "b.json")
    assert profile_main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out",
                         str(tmp_path / "m.json")]) == 0
    m = CostModel.load(tmp_path / "m.json")
    assert sorted(m.kernels["dense"]) == [64, 128] and sorted(m.predictors) == ["keys", "pooled"]
    a["host_ms"], b["host_ms"] = {"none": 0.3, "dense": 0.02}, {"none": 0.5}
    CostModel.from_dict(a).save(tmp_path / "a.json")
    CostModel.from_dict(b).save(tmp_path / "b.json")
    assert profile_main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out",
                         str(tmp_path / "m.json")]) == 0
    assert CostModel.load(tmp_path / "m.json").host_ms == {"none": 0.5, "dense": 0.02}  # the larger floor
    other = dict(a, gpu="Other GPU")
    CostModel.from_dict(other).save(tmp_path / "o.json")
    assert profile_main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "o.json"), "--out",
                         str(tmp_path / "x.json")]) == 2
    assert "different GPUs" in capsys.readouterr().err


@pytest.mark.gpu
def test_profile_on_the_gpu_writes_a_usable_model(tmp_path):
    out = tmp_path / "gpu.json"
    assert profile_main(["--n", "1024", "2048", "4096", "--head-dims", "64", "--heads", "4", "--densities", "1", "0.5",
                         "0.25", "--quiet", "--out", str(out)]) == 0
    m = CostModel.load(out)
    assert m.gpu == torch.cuda.get_device_name()
    assert m.kernel("none", 64).source == "measured" and m.kernel("none+pv", 64).fit is not None
    assert math.isfinite(m.predict_ms("int8", 4096, 4096, 4, 64, True, 0.5, "keys"))


@pytest.mark.gpu
def test_a_replayed_profile_call_equals_the_eager_call():
    from calibrate.profile import Case, _call, _inputs, _random_mask, _replayed_call
    from sparge_core.graphs import GraphCache

    graphs, cache = GraphCache(), {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for case in (Case("kernel", 2048, 64, 9, True, 0.5, "int8", None),
                 Case("pipeline", 2048, 64, 9, True, 0.5, "none", 50.0, estimator="pooled")):
        qkv = _inputs(case, torch.device("cuda"), cache)[0]
        mask = _random_mask(case, torch.device("cuda"), gen) if case.kind == "kernel" else None
        eager = _call(case, qkv, mask)()
        replayed = _replayed_call(graphs, case, qkv, mask)
        outs = [replayed().clone() for _ in range(4)]  # the first calls run eagerly, later ones replay
        assert graphs.replays >= 1
        for out in outs:
            torch.testing.assert_close(out, eager)


def test_the_replay_flag_is_recorded_in_the_profile_source(tmp_path):
    out = tmp_path / "replay.json"
    assert profile_main(["--dry-run", "--replay", "--quiet", "--n", "256", "--head-dims", "64", "--densities", "1",
                         "0.5", "--out", str(out)]) == 0
    assert "--replay" in CostModel.load(out).source


def test_linear_cost_ms():
    c = LinearCost(0.5, 10.0, 2.0, 1.0)
    assert c.ms(100, 1000, 200) == pytest.approx(0.5 + 1e-6 * (1000 + 2000 - 200))


def test_the_shipped_h200_cost_model_is_the_measured_sweep():
    m = CostModel.load(REPO / "results/kernel/h200-cost.json")
    assert "python -m calibrate.profile on NVIDIA H200" in m.source
    for d in (64, 128):
        for key in ("none", "none+pv", "int8", "dense"):
            assert m.kernel(key, d).source == "measured"
        assert m.predictor("keys", d).source == "measured" and m.predictor("pooled", d).source == "measured"
        # measured on this card: stage 2 costs more per pair than it saves
        assert m.kernel("none+pv", d).per_pair_ns > m.kernel("none", d).per_pair_ns
