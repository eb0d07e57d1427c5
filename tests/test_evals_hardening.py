"""`python -m evals` refuses bad input with exit 2 and one line before the model loads where it can,
matches the config to the loaded model (shape and identity) and the lengths to its context before
the first result file is written, and writes to runs/ unless told otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import calibrate.models
from calibrate.__main__ import main as calibrate_main
from evals.__main__ import build_parser
from evals.__main__ import main as evals_main
from sparge_core.params import ConfigError, ModelConfig

CAL = ["--model", "tiny-llama", "--samples", "1", "--holdout", "0", "--seq-len", "256", "--device", "cpu",
       "--l1", "0.3", "--pv-l1", "0.35", "--thetas", "-1", "--bisect-steps", "2", "--no-pv", "--quiet"]
PPL = ["ppl", "--model", "tiny-llama", "--device", "cpu", "--lengths", "256", "--windows", "1", "--quiet",
       "--methods", "dense", "sparge"]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cal") / "tiny.json"
    assert calibrate_main([*CAL, "--out", str(out)]) == 0
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(calibrate.models, "load_model", refuse)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _written(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.parametrize("extra,fragment", [
    (["--config", "/no/such/config.json"], "does not exist"),
    (["--windows", "0"], "--windows must be >= 1"),
    (["--lengths", "0"], "--lengths must be token counts >= 2"),
    (["--data", "/no/such/corpus.txt"], "does not exist"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
])
def test_bad_input_exits_2_before_the_model_loads(tmp_path, capsys, no_model_load, extra, fragment):
    assert evals_main([*PPL, "--out", str(tmp_path), *extra]) == 2
    assert fragment in _err(capsys)
    assert _written(tmp_path) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_without_a_gpu_exits_2(tmp_path, capsys, no_model_load):
    assert evals_main([*PPL, "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in _err(capsys)


def test_a_folder_as_config_exits_2(tmp_path, capsys, no_model_load):
    assert evals_main([*PPL, "--out", str(tmp_path / "res"), "--config", str(tmp_path)]) == 2
    assert "is a folder" in _err(capsys)


def test_unwritable_out_exits_2_before_computing(capsys, no_model_load):
    assert evals_main([*PPL, "--out", "/proc/sparge-results"]) == 2
    assert "cannot write into /proc" in _err(capsys)


def test_an_unknown_backend_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        evals_main([*PPL, "--out", str(tmp_path), "--backend", "cuda"])
    assert exc.value.code == 2
    assert "invalid choice: 'cuda'" in capsys.readouterr().err


def test_a_config_for_another_layer_count_writes_nothing(config, tmp_path, capsys):
    doc = json.loads(config.read_text())
    doc["model"]["num_layers"] = 3
    other = tmp_path / "three.json"
    other.write_text(json.dumps(doc))
    out = tmp_path / "res"
    assert evals_main([*PPL, "--out", str(out), "--config", str(other)]) == 2
    assert "num_layers is 3 in the config but the model has 2" in _err(capsys)
    assert _written(out) == []


def test_a_config_of_another_model_is_refused_unless_allowed(config, tmp_path, capsys):
    out = tmp_path / "res"
    args = ["ppl", "--model", "tiny-qwen2", "--device", "cpu", "--lengths", "256", "--windows", "1", "--quiet",
            "--methods", "dense", "sparge", "--config", str(config), "--out", str(out)]
    assert evals_main(args) == 2
    err = _err(capsys)
    assert "calibrated for 'tiny-llama', a 'llama' model" in err and "--allow-other-model" in err
    assert _written(out) == []
    assert evals_main([*args, "--allow-other-model"]) == 0
    assert (out / "ppl" / "tiny-qwen2" / "sparge.json").is_file()


def test_lengths_beyond_the_context_are_refused(tmp_path, capsys):
    args = ["ppl", "--model", "tiny-llama", "--device", "cpu", "--lengths", "8192", "--windows", "1", "--quiet",
            "--methods", "dense", "--out", str(tmp_path)]
    assert evals_main(args) == 2
    assert "beyond tiny-llama's context of 4096 tokens" in _err(capsys)
    assert _written(tmp_path) == []


def test_results_go_to_runs_by_default():
    assert build_parser().parse_args(["ppl"]).out == "runs"


def test_apply_with_a_folder_is_a_config_error(tmp_path):
    from sparge_core.integrations.transformers import apply

    model = calibrate.models.build_tiny_model("llama")
    with pytest.raises(ConfigError, match="is a folder"):
        apply(model, tmp_path)
    folder_json = tmp_path / "looks-like.json"
    folder_json.mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        apply(model, folder_json)


def test_apply_checks_the_model_identity(config):
    from sparge_core.integrations.transformers import apply, remove

    cfg = ModelConfig.load(config)
    qwen = calibrate.models.build_tiny_model("qwen2")
    with pytest.raises(ConfigError, match="allow_other_model=True"):
        apply(qwen, cfg)
    other_weights = calibrate.models.build_tiny_model("llama", seed=7)
    with pytest.raises(ConfigError, match="weights differ"):
        apply(other_weights, cfg)
    apply(other_weights, cfg, allow_other_model=True)
    remove(other_weights)
    same = calibrate.models.build_tiny_model("llama")
    apply(same, cfg)
    remove(same)


def test_a_version_1_config_still_loads_and_applies(config, tmp_path):
    from sparge_core.integrations.transformers import apply, remove

    doc = json.loads(config.read_text())
    doc["version"] = 1
    del doc["model"]["architecture"], doc["model"]["fingerprint"]
    for layer in doc["layers"]:  # per-layer keys of version 2
        for key in ("variant", "predicted", "local_blocks", "min_tokens"):
            layer.pop(key, None)
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps(doc))
    cfg = ModelConfig.load(v1)
    assert cfg.model.architecture is None and cfg.model.fingerprint is None
    qwen = calibrate.models.build_tiny_model("qwen2")  # no identity recorded: only the shape is checked
    apply(qwen, v1)
    remove(qwen)
    doc["model"]["architecture"] = "llama"  # the identity keys belong to version 2
    v1.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="unknown key"):
        ModelConfig.load(v1)


def test_weights_fingerprint_is_dtype_independent_and_handles_large_tensors():
    import torch

    from sparge_core.params import weights_fingerprint

    big = torch.nn.Linear(4100, 4100, bias=False)  # 16.8 M values: float32 index arithmetic would overflow
    fp = weights_fingerprint(big)
    assert fp.startswith("sha256-bf16-sample:")
    assert weights_fingerprint(big.to(torch.bfloat16)) == fp
    with torch.no_grad():
        big.weight[-1, -1] += 1.0  # the last value is sampled
    assert weights_fingerprint(big) != fp
