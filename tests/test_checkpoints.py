"""Checkpoints as users bring them: saved from wrapped models, whole, inside dicts, by other code; and the sampler
that a checkpoint of the original's network gets."""
import json
import re

import pytest
import torch
import torch.nn as nn

import ddpm
import sample
from modules import UNet, UNet_conditional
from files import UserError
from runs import run_main


class Wrapper(nn.Module):
    """Other code's training module: the UNet and its EMA as attributes, and a buffer of its own."""

    def __init__(self, net):
        super().__init__()
        self.model, self.ema_model = net, UNet_conditional(c_in=1, c_out=1, num_classes=3, width=8)
        self.ema_model.load_state_dict(net.state_dict())
        self.register_buffer("betas", torch.linspace(1e-4, 0.02, 10))


def kinds(net: nn.Module) -> dict[str, object]:
    """A conditional tiny UNet saved every way users save one."""
    sd = net.state_dict()
    prefixed = lambda prefix: {prefix + k: v for k, v in sd.items()}
    return {
        "state_dict": sd,
        "DataParallel / DDP (module.)": prefixed("module."),
        "torch.compile (_orig_mod.)": prefixed("_orig_mod."),
        "compiled DDP": prefixed("_orig_mod.module."),
        "whole model, torch.save(model)": net,
        "whole DataParallel": nn.DataParallel(net),
        "whole model of other code": Wrapper(net),
        "dict with the weights under a key": {"model": sd, "epoch": 7, "optimizer": {"lr": 1e-3}},
        "Lightning (state_dict of model.)": {"state_dict": prefixed("model."), "epoch": 3},
        "ema-pytorch (ema_model., online_model.)": {**prefixed("ema_model."), **prefixed("online_model."),
                                                    "initted": torch.tensor(True), "step": torch.tensor(9)},
        "half precision": {k: v.half() for k, v in sd.items()},
    }


def test_every_kind_of_checkpoint_loads_the_same_network(tmp_path, capsys):
    torch.manual_seed(0)
    net = UNet_conditional(c_in=1, c_out=1, num_classes=3, width=8).eval()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 9]), torch.tensor([0, 2])
    expected = net(x, t, y)
    for k, (kind, obj) in enumerate(kinds(net).items()):
        torch.save(obj, tmp_path / f"{k}.pt")
        model, diffusion = sample.load(tmp_path / f"{k}.pt", device="cpu", image_size=16)
        tolerance = dict(atol=5e-3, rtol=5e-3) if kind == "half precision" else {}
        torch.testing.assert_close(model(x, t, y), expected, **tolerance, msg=kind)
        assert diffusion.img_size == 16 and model.num_classes == 3
    out = capsys.readouterr().out
    assert "the network under 'module'" in out and "the network under 'state_dict.model'" in out
    assert "the network under 'ema_model'" in out  # of two, the EMA's


def test_of_two_networks_the_ema_or_the_other_one(tmp_path):
    torch.manual_seed(0)
    nets = [UNet(c_in=1, c_out=1, width=8) for _ in range(2)]
    torch.save({"model": nets[0].state_dict(), "ema": nets[1].state_dict()}, tmp_path / "both.pt")
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([5])
    for ema, net in ((True, nets[1]), (False, nets[0])):
        model, _ = sample.load(tmp_path / "both.pt", ema=ema, device="cpu")
        torch.testing.assert_close(model(x, t), net.eval()(x, t))
    torch.save({"a": nets[0].state_dict(), "b": nets[1].state_dict()}, tmp_path / "two.pt")
    with pytest.raises(UserError, match=r"holds 2 networks \(a, b\) and none is marked ema"):
        sample.load(tmp_path / "two.pt")


@pytest.mark.parametrize("content, message", [
    (lambda: torch.optim.AdamW(UNet(1, 1, width=4).parameters()).state_dict(),
     "holds no UNet weights of this project or of the original .* it holds: state, param_groups"),
    (lambda: {"conv.weight": torch.zeros(1)}, "holds no UNet weights"),
    (lambda: b"\x89PNG not a checkpoint", "is not a checkpoint in torch.save's format"),
])
def test_files_that_hold_no_network_say_so_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "file.pt"
    value = content()
    path.write_bytes(value) if isinstance(value, bytes) else torch.save(value, path)
    with pytest.raises(SystemExit):
        run_main(lambda: sample.main(["--run", str(path), "--out", str(tmp_path / "x.png")]))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights_only" not in err and "trust" not in err, err
    assert re.search(message, err), err


def test_loading_a_whole_model_runs_none_of_its_code(tmp_path):
    """A pickled model's classes become inert stand-ins: a class that would act on unpickling does not."""
    torch.save(Loud(UNet(1, 1, width=4)), tmp_path / "loud.pt")
    Loud.woke = False
    model, _ = sample.load(tmp_path / "loud.pt", device="cpu")
    assert not Loud.woke and isinstance(model, UNet)


class Loud(nn.Module):
    woke = False

    def __init__(self, net):
        super().__init__()
        self.net = net

    def __setstate__(self, state):
        Loud.woke = True
        super().__setstate__(state)


def original_checkpoint(folder, conditional=True):
    """A bare ckpt.pt of the original's network (no input skip, no run.json), as its training wrote it."""
    folder.mkdir()
    torch.manual_seed(0)
    net = UNet_conditional(c_in=1, c_out=1, num_classes=3, width=8) if conditional else UNet(1, 1, width=8)
    torch.save(net.state_dict(), folder / "ckpt.pt")
    return folder / "ckpt.pt"


def test_the_originals_network_gets_the_sampler_that_works_for_it(tmp_path, capsys, monkeypatch):
    """Its deterministic samplers drift (16.5% of the asked digit with DDIM-50): the ancestral chain is its default
    in sample.py, evaluate.py and the notebook's `recommended`; asking for another one warns."""
    path = original_checkpoint(tmp_path / "original")
    model, _ = sample.load(path, device="cpu", image_size=16)
    assert model.inc_skip is None
    assert sample.recommended(path, model) == dict(sampler="ddpm", steps=50, cfg_scale=3.0, guidance_interval=None)
    used = []
    real_sample = ddpm.Diffusion.sample
    monkeypatch.setattr(ddpm.Diffusion, "sample", lambda self, *a, **kw: used.append(kw) or real_sample(self, *a, **kw))
    sample.main(["--run", str(path), "--image_size", "16", "--labels", "1", "--n", "1",
                 "--out", str(tmp_path / "a.png")])
    assert used[-1]["sampler"] == "ddpm" and used[-1]["steps"] == 50
    assert "warning" not in capsys.readouterr().err
    sample.main(["--run", str(path), "--image_size", "16", "--labels", "1", "--n", "1", "--sampler", "ddim",
                 "--steps", "3", "--out", str(tmp_path / "b.png")])
    assert "the original's network (no input skip), on which deterministic samplers drift" in capsys.readouterr().err
    # a network with the input skip keeps the project's default
    skip = UNet(1, 1, width=8, input_skip=True)
    assert sample.recommended(tmp_path, skip) == dict(sampler=ddpm.DEFAULT_SAMPLER, steps=ddpm.DEFAULT_STEPS)


def test_a_run_json_without_sampling_settings_follows_its_network(tmp_path):
    path = original_checkpoint(tmp_path / "run", conditional=False)
    config = {"model_args": dict(c_in=1, c_out=1, time_dim=256, width=8, input_skip=False),
              "diffusion_args": dict(noise_steps=20, img_size=16, c_in=1)}
    (path.parent / "run.json").write_text(json.dumps(config))
    model, _ = sample.load(path.parent, device="cpu")
    assert sample.recommended(path.parent, model) == dict(sampler="ddpm", steps=50)
