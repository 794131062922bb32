"""The UNet's shape options (channel multipliers, where it attends, heads): the original's by default, recorded in
run.json, rebuilt by load from run.json or from the weights alone, kept by resume, counted by benchmark.py."""
import json

import pytest
import torch

import benchmark
import ddpm_conditional
import sample
from modules import UNet, UNet_conditional
from runs import run_main

SHAPES = {
    "the emoji recipe's (attention at 1/4 and 1/8 only)": ["--attention", "4", "8"],
    "the DDPM paper's CIFAR-10 (attention at 1/2 only)": ["--attention", "2", "--channel_mult", "2", "2", "2"],
    "no attention, 2 heads": ["--attention", "--heads", "2", "--channel_mult", "1", "2", "3"],
}


def test_the_default_shape_is_the_originals():
    """UNet() is the original's network (tests/test_modules.py checks every name and shape), and so is the shape
    the training scripts' flags give by default."""
    net = UNet()
    assert (net.channel_mult, net.attention, net.heads) == ((2, 4, 4), (1, 2, 4, 8), 4)
    spelt_out = UNet(channel_mult=(2, 4, 4), attention=(8, 4, 2, 1), heads=4)
    assert {k: v.shape for k, v in spelt_out.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    args = ddpm_conditional.parse_args(["--dataset_path", "any"])
    assert (args.channel_mult, args.attention, args.heads) == ([2, 4, 4], [1, 2, 4, 8], 4)


@pytest.mark.parametrize("flags", SHAPES.values(), ids=SHAPES.keys())
def test_a_tiny_run_of_each_shape_trains_saves_resumes_and_samples(in_tmp, capsys, flags):
    run = ["--width", "8", "--image_size", "16", "--noise_steps", "20", "--limit", "32", "--batch_size", "16",
           "--sample_every", "0", "--device", "cpu", "--precision", "fp32", "--run_name", "s", *flags]
    ddpm_conditional.main([*run, "--epochs", "1"])
    config = json.loads((in_tmp / "models" / "s" / "run.json").read_text())
    args = ddpm_conditional.parse_args(run)
    shape = dict(channel_mult=args.channel_mult, attention=sorted(args.attention), heads=args.heads)
    assert {k: config["model_args"][k] for k in shape} == shape
    ddpm_conditional.main([*run, "--epochs", "2", "--resume"])
    assert torch.load(in_tmp / "models" / "s" / "resume.pt", weights_only=True)["epoch"] == 2
    for source in ("models/s", "models/s/ema_ckpt.pt"):  # from run.json, and from the bare weights
        model, diffusion = sample.load(in_tmp / source, device="cpu", image_size=16,
                                       **({} if source == "models/s" else {"heads": shape["heads"]}))
        assert [list(model.channel_mult), list(model.attention), model.heads] == list(shape.values())
        assert diffusion.sample(model, 2, [0, 0], sampler="ddim", steps=2, progress=False).shape == (2, 1, 16, 16)
    # resume refuses another shape
    with pytest.raises(SystemExit):
        run_main(lambda: ddpm_conditional.main([*run, "--epochs", "3", "--resume", "--attention", "1", "2", "4", "8"]))
    assert "a resumed run keeps its model and data: --attention [1, 2, 4, 8] (the run has" in capsys.readouterr().err


def test_a_level_without_attention_has_no_parameters_and_the_rest_keep_their_names():
    full, light = UNet(1, 1, width=8), UNet(1, 1, width=8, attention=(4, 8))
    assert set(light.state_dict()) < set(full.state_dict())
    assert {k.split(".")[0] for k in set(full.state_dict()) - set(light.state_dict())} == {"sa1", "sa5", "sa6"}
    with pytest.raises(ValueError, match=r"heads 3 does not divide the channels of every attention layer \(8, 16, 32"):
        UNet(1, 1, width=8, heads=3)
    with pytest.raises(ValueError, match="channel_mult must be 3 positive multipliers"):
        UNet_conditional(1, 1, num_classes=2, width=8, channel_mult=(2, 4))


def test_the_benchmark_counts_the_flops_of_the_shape(in_tmp):
    tiny = ["--image_size", "16", "--width", "8", "--batch_size", "4", "--repeats", "1", "--sample_n", "2",
            "--matmul_size", "64", "--precision", "fp32", "--json", "b.json"]
    results = {}
    for name, flags in {"original": [], "light": ["--attention", "4", "8"]}.items():
        benchmark.main([*tiny, *flags])
        results[name] = json.loads((in_tmp / "b.json").read_text())
    assert results["light"]["train_gflop_per_step"] < results["original"]["train_gflop_per_step"]
    assert results["light"]["attention_flop_share"] < results["original"]["attention_flop_share"]
    assert benchmark.shape_name(results["light"]["config"]) == ", attention at 4 8"
    assert benchmark.shape_name(results["original"]["config"]) == ""
