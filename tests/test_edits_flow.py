"""edit.py on flow-matching runs (flow.Flow): inversion by the ODE run forwards, SDEdit from a time on the path,
inpainting by replacement (RePaint's resampling included), interpolation decoded by the ODE; on models whose
velocity is exact and on tiny ones; and the command line, which keeps each objective's samplers to its runs."""
import itertools
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import ddpm_conditional
import edit
import flow
from edit import img2img, inpaint, interpolate, invert
from modules import UNet
from runs import run_main
from test_edits import exact_digits, make_run, right_half, write


@pytest.fixture(scope="module")
def digits():
    return exact_digits(ddpm_conditional.Flow)


class BlurredImages(nn.Module):
    """The exact velocity E[eps - x_0 | x_t] when the data is the images each blurred by N(0, sd^2 I): given image
    i, x_t ~ N((1 - t) x_i, ((1 - t)^2 sd^2 + t^2) I). Unlike ExactDenoiser's (sd = 0) it is finite at t = 0,
    where the inversion starts. A label keeps to the images of its class, as ExactDenoiser's does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sd: float = 0.1):
        super().__init__()
        self.x0 = nn.Parameter(images.flatten(1).double() / 127.5 - 1, requires_grad=False)
        self.register_buffer("labels", labels)
        self.sd, self.num_classes = sd, 10

    def forward(self, x: torch.Tensor, time: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = (time.double() / 1000)[:, None, None]
        var = (1 - t) ** 2 * self.sd ** 2 + t ** 2
        centred = x.flatten(1).double()[:, None] - (1 - t) * self.x0  # (n, images, pixels)
        logits = -centred.square().sum(-1) / (2 * var[..., 0])
        if y is not None:
            logits = logits.masked_fill((y[:, None] >= 0) & (self.labels[None] != y[:, None]), -math.inf)
        v = (t - (1 - t) * self.sd ** 2) / var * centred - self.x0  # given image i: E[eps] - E[x_0]
        return (torch.softmax(logits, 1)[..., None] * v).sum(1).to(x.dtype).view_as(x)


def test_the_flow_inversion_decodes_back_into_the_images(digits):
    """Measured (8 digits, their labels, sd 0.1): Euler both ways is off by at most 5 grey levels at 10 steps, 1 at
    50; Heun, decoding the same x_1, by less than half as much on average (0.08 of a level at 10 steps, 0.21)."""
    images, labels, f, _ = digits
    model = BlurredImages(images, labels)
    errors = {}
    for steps in (10, 50):
        x_1 = invert(f, model, images[:8], steps=steps, labels=labels[:8], cfg_scale=1)
        for sampler in flow.SAMPLERS:
            back = f.sample(model, 8, labels[:8], cfg_scale=1, sampler=sampler, steps=steps, noise=x_1,
                            progress=False)
            errors[sampler, steps] = (back.float() - images[:8].float()).abs()
    assert x_1.dtype == torch.float32 and x_1.shape == (8, 1, 16, 16)
    assert errors["euler", 10].max() <= 6 and errors["euler", 50].max() <= 1 and errors["euler", 50].mean() < 0.1
    assert errors["heun", 10].mean() < errors["euler", 10].mean()
    with pytest.raises(ValueError, match="steps must be a whole number"):
        invert(f, model, images[:2], steps=0, labels=-1)


def test_img2img_noises_to_a_time_of_the_ode_strength_0_keeps_1_ignores_the_image(digits):
    images, labels, f, exact = digits
    z = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    for sampler in flow.SAMPLERS:
        assert torch.equal(img2img(f, exact, images[:4], 0.0, sampler=sampler, steps=6, labels=labels[:4]),
                           images[:4])
        edited = img2img(f, exact, images[:4], 1.0, sampler=sampler, steps=6, noise=z, labels=labels[:4],
                         progress=False)
        other = img2img(f, exact, images[4:8], 1.0, sampler=sampler, steps=6, noise=z, labels=labels[:4],
                        progress=False)
        sampled = f.sample(exact, 4, labels[:4], sampler=sampler, steps=6, noise=z, progress=False)
        assert torch.equal(edited, sampled) and torch.equal(other, sampled), sampler
    # 0.55 starts where 0.5 does, the ODE's first time at or below it (10 steps: 1, 0.9, ..., 0)
    at = [img2img(f, exact, images[:4], s, steps=10, noise=z, labels=-1, cfg_scale=1, progress=False)
          for s in (0.5, 0.55)]
    assert torch.equal(*at)
    near = img2img(f, exact, images[:4], 0.2, steps=10, labels=-1, cfg_scale=1, progress=False)
    assert (near.float() - images[:4].float()).abs().mean() < 2
    with pytest.raises(ValueError, match="sampler must be euler or heun for flow matching.*got \'dpmpp2m\'"):
        img2img(f, exact, images[:4], 0.5, sampler="dpmpp2m", labels=-1)


def test_flow_inpainting_keeps_the_known_part_exactly_and_fills_the_rest_from_it(digits):
    """The exact velocity of the 64 digits, given their left halves and no label, fills in their right halves.
    Measured (30 steps): within 5 grey levels of the digit's own for 39 of 64 with Heun, 40 with Euler, 47 with
    RePaint's resampling (3x every 5 steps) with either."""
    images, labels, f, exact = digits
    matched = {}
    for sampler, resample in itertools.product(flow.SAMPLERS, (1, 3)):
        torch.manual_seed(0)
        filled = inpaint(f, exact, images, right_half(), sampler=sampler, steps=30, jump=5, resample=resample,
                         progress=False, labels=-1, cfg_scale=1)
        assert filled.dtype == torch.uint8 and torch.equal(filled[..., :8], images[..., :8])  # exactly
        error = (filled[..., 8:].float() - images[..., 8:].float()).abs().flatten(1).mean(1)
        matched[sampler, resample] = (error < 5).sum().item()
    for sampler in flow.SAMPLERS:
        assert matched[sampler, 1] >= 34 and matched[sampler, 3] >= 43, matched
        assert matched[sampler, 3] > matched[sampler, 1], matched  # resampling harmonises


def test_going_back_up_the_path_keeps_its_marginals():
    """RePaint's jump back from s to t: x_t = a x_s + sqrt(t^2 - a^2 s^2) z, a = (1 - t) / (1 - s), is
    (1 - t) x_0 + t eps' with eps' ~ N(0, I), as the path itself at t."""
    f = flow.Flow(img_size=8, c_in=1)
    _, up, _ = edit.flow_moves(f, None, "euler", 10, {})
    torch.manual_seed(0)
    x0, eps = torch.rand(4000, 1, 8, 8) * 2 - 1, torch.randn(4000, 1, 8, 8)
    for s, t in ((0.2, 0.7), (0.5, 0.6), (0.3, 1.0)):
        x_s = (1 - s) * x0 + s * eps
        eps_t = (up(x_s, s, t) - (1 - t) * x0) / t
        assert abs(eps_t.mean()) < 0.01 and abs(eps_t.std() - 1) < 0.01, (s, t)


def test_every_edit_runs_on_a_tiny_unconditional_flow():
    torch.manual_seed(0)
    model, f = UNet(1, 1, width=8, input_skip=True).eval(), flow.Flow(img_size=8, c_in=1)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1
    unknown = mask.bool().expand_as(images)
    filled = inpaint(f, model, images, mask, steps=5, jump=2, resample=2, progress=False)
    assert torch.equal(filled[~unknown], images[~unknown]) and not torch.equal(filled[unknown], images[unknown])
    assert img2img(f, model, images, 0.5, steps=5, progress=False).shape == images.shape
    assert invert(f, model, images, steps=5).shape == images.shape
    with pytest.raises(ValueError, match="sampler must be euler or heun for flow matching.*got \'ddpm\'"):
        inpaint(f, model, images, mask, sampler="ddpm", steps=5)


def test_flow_interpolation_ends_on_the_two_samples(digits):
    images, labels, f, exact = digits
    a, b = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    for kwargs in ({}, {"sampler": "euler", "steps": 5}):  # {}: Flow.sample's default, heun 8
        frames = interpolate(f, exact, a, b, 5, labels=3, progress=False, **kwargs)
        ends = f.sample(exact, 2, [3, 3], noise=torch.stack([a, b]), progress=False, **kwargs)
        assert frames.shape == (5, 1, 16, 16) and torch.equal(frames[[0, -1]], ends), kwargs
    with pytest.raises(ValueError, match="sampler must be euler or heun for flow matching.*got \'ddim\'"):
        interpolate(f, exact, a, b, 5, sampler="ddim", labels=3)


# --------------------------------------------------------------------------- edit.py on a flow-matching run

def make_flow_run(folder, conditional=True):
    """test_edits' tiny untrained run (8x8 gray, two classes), its run.json saying --objective flow."""
    make_run(folder, conditional=conditional)
    config = json.loads((folder / "run.json").read_text())
    config["diffusion_args"] = dict(objective="flow", img_size=8, c_in=1)
    (folder / "run.json").write_text(json.dumps(config))


@pytest.fixture
def runs(in_tmp):
    """A conditional flow run, an unconditional one, a DDPM run, and two 20x20 images."""
    make_flow_run(in_tmp / "run")
    make_flow_run(in_tmp / "plain", conditional=False)
    make_run(in_tmp / "ddpm")
    rng = np.random.default_rng(0)
    for k in range(2):
        write(in_tmp / "mine" / f"{k}.png", rng.integers(0, 256, (20, 20), dtype=np.uint8), "L")
    return in_tmp


def test_the_edit_commands_run_on_a_flow_run(runs, capsys):
    common = ["--run", "run", "--steps", "4"]
    edit.main(["inpaint", *common, "--images", "mine", "--box", "0.5", "0", "1", "1", "--resample", "2", "--jump",
               "2", "--labels", "b"])
    edit.main(["img2img", *common, "--images", "mine", "--strength", "0.5", "--labels", "0", "1"])
    edit.main(["img2img", "--run", "plain", "--steps", "4", "--images", "mine", "--strength", "0.1",
               "--out", "weak.png"])
    edit.main(["invert", *common, "--images", "mine"])
    edit.main(["invert", *common, "--images", "mine", "--sampler", "heun", "--out", "heun.png"])
    out = capsys.readouterr().out
    assert "img2img: strength 0.5 noises each image to t = 0.5 of 1, then 2 of the 4 heun steps denoise it\n" in out
    assert "img2img: strength 0.1 reaches none of the 4 heun steps (the lowest at t = 0.25): the images come " \
           "back unchanged\n" in out
    assert re.search(r"decoded from x_T: mean absolute error [0-9.]+ of 255 \(4 euler steps\)", out)
    assert re.search(r"decoded from x_T: mean absolute error [0-9.]+ of 255 \(4 heun steps\)", out)
    edit.main(["interpolate", *common, "--seeds", "4", "5", "--frames", "3", "--labels", "a"])
    edit.main(["interpolate", *common, "--images", "mine/0.png", "mine/1.png", "--frames", "3", "--out", "i.png"])
    for name in ("edit_inpaint.png", "edit_img2img.png", "weak.png", "edit_invert.png", "heun.png",
                 "edit_interpolate.png", "i.png"):
        assert (runs / name).is_file(), name


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the run was loaded before the flags were checked")


# (argv after the command, the one-line message): each objective's samplers for its own runs, refused before loading
REFUSED = [
    (["img2img", "--images", "mine", "--strength", "0.5", "--sampler", "dpmpp2m"],
     "--sampler dpmpp2m does not apply to run, a flow-matching run: use euler or heun"),
    (["inpaint", "--images", "mine", "--box", "0", "0", "1", "0.5", "--sampler", "ddpm"],
     "--sampler ddpm does not apply to run, a flow-matching run: use euler or heun"),
    (["invert", "--images", "mine", "--sampler", "ddim"],
     "--sampler ddim does not apply to run, a flow-matching run: use euler or heun"),
    (["interpolate", "--sampler", "ddpm"], "--sampler ddpm does not apply to run, a flow-matching run"),
    (["img2img", "--run", "ddpm", "--images", "mine", "--strength", "0.5", "--sampler", "heun"],
     "--sampler heun does not apply to ddpm, a DDPM run: use ddpm or ddim or dpmpp2m"),
    (["invert", "--run", "ddpm", "--images", "mine", "--sampler", "euler"],
     "--sampler euler does not apply to ddpm, a DDPM run"),
]


@pytest.mark.parametrize("argv, message", REFUSED, ids=[m[:40] for _, m in REFUSED])
def test_a_sampler_of_the_other_objective_is_refused_in_one_line(runs, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(edit.sample, "load", refuse_to_load)
    run = [] if "--run" in argv else ["--run", "run"]
    with pytest.raises(SystemExit) as e:
        run_main(lambda: edit.main([argv[0], *run, *argv[1:]]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not list(runs.glob("edit_*"))
