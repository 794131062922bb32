import copy
import json

import pytest
import torch

import benchmark
import ddpm
from modules import UNet
from devices import cpu_has_native, cpu_supports
from files import UserError

TINY = ["--image_size", "8", "--width", "8", "--batch_size", "4", "--repeats", "1", "--sample_n", "2",
        "--matmul_size", "64", "--precision", "fp32"]


@pytest.mark.parametrize("conditional", [True, False])
def test_benchmark_measures_everything_and_writes_json_and_readme(in_tmp, conditional):
    readme = in_tmp / "docs" / "performance.md"  # where the benchmark table lives
    readme.parent.mkdir()
    readme.write_text("# x\n<!-- benchmark:start -->\n<!-- benchmark:end -->\ntail\n")
    argv = [*TINY, "--json", "bench.json", "--readme", str(readme)] + ([] if conditional else ["--unconditional"])
    benchmark.main(argv)
    r = json.loads((in_tmp / "bench.json").read_text())
    assert r["precision"] == "fp32" and r["sampler"] == f"{ddpm.DEFAULT_SAMPLER}-{ddpm.DEFAULT_STEPS}"
    assert r["train_gflop_per_step"] > 0 and 0 < r["utilisation"] == pytest.approx(
        r["train_tflops"] / r["peak_tflops"]["fp32"], rel=1e-6)
    assert 0 < r["attention_flop_share"] < 1 and 0 < r["attention_time_share"] < 1
    assert set(r["sample_s_per_image"]) == ({"plain", "guided"} if conditional else {"plain"})
    benchmark.main(argv)  # the same configuration again replaces its row
    amx = cpu_supports("amx_tile")
    assert r["device"].endswith(f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"
                                + (" + BF16" if cpu_has_native(torch.bfloat16) else "") + (" + AMX" if amx else ""))
    rows = [line for line in readme.read_text().splitlines() if line.startswith(f"| {r['device']} |")]
    assert len(rows) == 1 and "1x8², width 8, batch 4, fp32" in rows[0]
    assert readme.read_text().endswith("<!-- benchmark:end -->\ntail\n")


def test_peak_matmul_grows_only_while_a_product_is_fast():
    """A dtype the CPU emulates (bf16 at ~1 GFLOP/s without AVX512-BF16) must not take an hour to measure."""
    cpu = torch.device("cpu")
    product, flops = benchmark.peak_matmul(torch.float32, cpu, max_n=4096, budget_s=0)
    assert flops == 2 * 256 ** 3 and product().shape == (256, 256)  # every product is over a zero budget
    product, flops = benchmark.peak_matmul(torch.float32, cpu, max_n=1024, budget_s=1e6)
    assert flops == 2 * 1024 ** 3 and product().shape == (1024, 1024)  # grows to max_n within a huge one
    assert benchmark.peak_matmul(torch.float32, cpu, max_n=64)[1] == 2 * 64 ** 3


def test_the_originals_attention_computes_the_same():
    """The --original row times nn.MultiheadAttention returning its weights, on the same parameters."""
    torch.manual_seed(0)
    fast = UNet(c_in=1, c_out=1, width=8)
    original = copy.deepcopy(fast)
    benchmark.use_original_attention(original)
    assert sum(isinstance(m, benchmark.OriginalAttention) for m in original.modules()) == 6
    assert original.state_dict().keys() == fast.state_dict().keys()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 500])
    out_fast, out_original = fast(x, t), original(x, t)
    torch.testing.assert_close(out_original, out_fast, atol=1e-5, rtol=1e-4)
    out_fast.square().mean().backward()
    out_original.square().mean().backward()
    for name in ("sa1.mha.in_proj_weight", "sa6.mha.out_proj.weight", "inc.double_conv.0.weight"):
        torch.testing.assert_close(original.get_parameter(name).grad, fast.get_parameter(name).grad,
                                   atol=1e-6, rtol=1e-4)


def test_the_originals_run_and_full_chain(in_tmp, monkeypatch):
    trainers = []
    build = benchmark.build_trainer
    monkeypatch.setattr(benchmark, "build_trainer",
                        lambda args, device: trainers.append(build(args, device)) or trainers[-1])
    benchmark.main([*TINY, "--original", "--full_chain", "--noise_steps", "10", "--json", "o.json"])
    r = json.loads((in_tmp / "o.json").read_text())
    assert r["precision"] == "fp32" and r["config"]["original"] and r["sampler"] == "ddpm-9"
    model = trainers[0].ema_model
    assert model.inc_skip is None and isinstance(model.sa3, benchmark.OriginalAttention)
    assert isinstance(trainers[0].model.sa3, benchmark.OriginalAttention)
    with pytest.raises(UserError, match="--original trains in fp32"):
        benchmark.main([*TINY, "--original", "--precision", "bf16"])


def test_a_flow_step_with_immiscible_noise_is_benchmarked_and_named(in_tmp):
    benchmark.main([*TINY, "--objective", "flow", "--immiscible", "--json", "f.json"])
    r = json.loads((in_tmp / "f.json").read_text())
    assert r["sampler"] == "heun-15"  # 8 steps: 15 network evaluations
    assert r["config"]["objective"] == "flow" and r["config"]["immiscible"]
    assert "flow matching, immiscible noise" in benchmark.readme_row(r)


def test_a_sampler_of_the_other_objective_is_refused(in_tmp):
    with pytest.raises(UserError, match="--sampler ddim does not apply to --objective flow, a flow-matching run: use "
                                        "euler or heun"):
        benchmark.main([*TINY, "--objective", "flow", "--sampler", "ddim"])
    with pytest.raises(UserError, match="--full_chain times the DDPM chain's every step"):
        benchmark.main([*TINY, "--objective", "flow", "--full_chain"])
    with pytest.raises(UserError, match="--noise_steps 50 is DDPM's: flow matching has no noise steps"):
        benchmark.main([*TINY, "--objective", "flow", "--noise_steps", "50"])
