"""scripts/demo.py (``make demo``): progress is shown, the end says what to do next, and on a GPU the
measured prefill speed-up stands beside the perplexity change."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("sparge_demo_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_next_steps_name_the_files_the_apply_call_and_the_gpu(demo):
    text = demo.next_steps(Path("runs/demo/smollm2.json"), "smollm2", "pydoc", on_gpu=False)
    assert "runs/demo/smollm2.json" in text and "runs/demo/smollm2.png" in text
    assert "apply(model, 'runs/demo/smollm2.json')" in text and "make bench-e2e" in text and "GPU" in text
    assert "make bench-e2e" not in demo.next_steps(Path("c.json"), "smollm2", "pydoc", on_gpu=True).split(
        "calibrate your own")[1]


def test_speed_line(demo):
    assert "need a GPU" in demo.speed_line(None) and "make bench-e2e" in demo.speed_line(None)
    assert "2.00x (faster" in demo.speed_line({"dense": 10.0, "sparge": 5.0})


@pytest.mark.slow
def test_demo_end_to_end_on_cpu(demo, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    assert demo.main(["--model", "tiny-llama", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "perplexity change" in out and "What next:" in out and "not measured on a CPU" in out
    assert re.search(r"layer 0 on cpu: .*sparsity", caplog.text)  # the search reported its progress (no --quiet)
    # tiny-llama has random weights: the summary says that no layer could be made sparse
    assert "no layer could be made sparse within the bound" in out


@pytest.mark.gpu
def test_demo_on_a_gpu_shows_the_prefill_speedup(demo, tmp_path, capsys):
    assert torch.cuda.is_available()
    assert demo.main(["--model", "tiny-llama", "--out", str(tmp_path / "demo"), "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "prefill ms" in out and "prefill: dense" in out and "x (" in out
