"""tools/gpu_check.sh, the one-shot check for a GPU machine, run in miniature on the CPU so that it cannot rot."""
import json
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = str(ROOT / "tools" / "gpu_check.sh")


def run(out, **env):
    return subprocess.run(["bash", SCRIPT, str(out)], capture_output=True, text=True,
                          env={**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, **env})


def test_every_step_passes_on_the_cpu(tmp_path):
    result = run(tmp_path / "out")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    # what the GPU machine's tool brings back: at most 8 files
    assert sorted(p.name for p in out.iterdir()) == [
        "benchmark.log", "compile.log", "precision.log", "results.json", "setup.log", "summary.txt", "tests.log",
        "torchrun.log"]
    results = json.loads((out / "results.json").read_text())
    steps = {s["step"]: s["status"] for s in results["steps"]}
    assert set(steps.values()) == {"passed"}
    assert {"environment", "device tests (pytest -m cuda)", "every precision, resumed across them",
            "torchrun, 1 process (gloo)", "torchrun, resumed", "--compile training", "sampling_ddim50",
            "sampling_full_chain", "bench_digits", "bench_digits_compiled", "bench_original_run_b4",
            "bench_original_config_b4", "bench_original_config_b4_compiled"} <= set(steps)
    assert [s["dtype"] for s in results["precision"][1:]] == ["bf16", "fp16", "fp32", "fp16"]
    original = results["bench_original_run_b4"]
    assert original["config"]["original"] and original["precision"] == "fp32"
    assert results["bench_digits_compiled"]["config"]["compile"]
    assert set(results["sampling_full_chain"]["sample_s_per_image"]) == {"plain", "guided"}
    summary = (out / "summary.txt").read_text()
    assert "bf16 against the original (batch 4)" in summary and "README rows" in summary


def test_steps_without_time_left_are_skipped_and_the_check_fails(tmp_path):
    result = run(tmp_path / "out", BUDGET_S="0", STEPS="precision")
    assert result.returncode == 1
    steps = json.loads((tmp_path / "out" / "results.json").read_text())["steps"]
    assert {(s["status"], s["note"]) for s in steps} == {("skipped", "no time left")}
    names = [s["step"] for s in steps]  # the setup steps, then only the groups in STEPS
    assert names[-2:] == ["environment", "every precision, resumed across them"]
    usage = subprocess.run(["bash", SCRIPT], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: bash tools/gpu_check.sh OUT_DIR")
