import json

import pytest

import benchmark

TINY = ["--image_size", "8", "--width", "8", "--batch_size", "4", "--repeats", "1", "--sample_n", "2",
        "--matmul_size", "64", "--precision", "fp32"]


@pytest.mark.parametrize("conditional", [True, False])
def test_benchmark_measures_everything_and_writes_json_and_readme(in_tmp, conditional):
    readme = in_tmp / "README.md"
    readme.write_text("# x\n<!-- benchmark:start -->\n<!-- benchmark:end -->\ntail\n")
    argv = [*TINY, "--json", "bench.json", "--readme", str(readme)] + ([] if conditional else ["--unconditional"])
    benchmark.main(argv)
    r = json.loads((in_tmp / "bench.json").read_text())
    assert r["precision"] == "fp32" and r["sampler"] == "ddim-50"
    assert r["train_gflop_per_step"] > 0 and 0 < r["utilisation"] == pytest.approx(
        r["train_tflops"] / r["peak_tflops"]["fp32"], rel=1e-6)
    assert 0 < r["attention_flop_share"] < 1 and 0 < r["attention_time_share"] < 1
    assert set(r["sample_s_per_image"]) == ({"plain", "guided"} if conditional else {"plain"})
    benchmark.main(argv)  # the same configuration again replaces its row
    rows = [line for line in readme.read_text().splitlines() if line.startswith("| cpu")]
    assert len(rows) == 1 and "1x8², width 8, batch 4, fp32" in rows[0]
    assert readme.read_text().endswith("<!-- benchmark:end -->\ntail\n")
