import argparse
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import ddpm
import ddpm_conditional
import evaluate
import sample
from ddpm import SAMPLERS, Diffusion
from tools.exact import ExactDenoiser
from modules import UNet, UNet_conditional
from files import UserError
from runs import run_main


class FixedNoise(torch.nn.Module):
    """An eps model that is a fixed smooth function of (x, t), so samplers can be compared exactly."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t):
        return self.scale * torch.tanh(x) * (t[:, None, None, None].float() / 1000)


def test_ddim_eta0_is_deterministic_given_the_noise():
    d, model, x_T = Diffusion(noise_steps=100, img_size=8, c_in=1), FixedNoise(), torch.randn(3, 1, 8, 8)
    torch.manual_seed(0)
    a = d.sample(model, 3, sampler="ddim", steps=10, noise=x_T, progress=False)
    torch.manual_seed(1)
    b = d.sample(model, 3, sampler="ddim", steps=10, noise=x_T, progress=False)
    assert torch.equal(a, b)
    torch.manual_seed(0)
    c = d.sample(model, 3, sampler="ddim", steps=10, eta=1.0, noise=x_T, progress=False)
    assert not torch.equal(a, c)


def test_same_seed_same_images():
    d, model = Diffusion(noise_steps=50, img_size=8, c_in=1), FixedNoise()
    images = []
    for _ in range(2):
        torch.manual_seed(7)
        images.append(d.sample(model, 2, sampler="ddpm", steps=10, progress=False))
    assert torch.equal(*images)


def final_x(d, model, x_T, **kwargs):
    """The chain's last x (at timestep 0) in its own dtype, before the conversion to uint8."""
    trajectory = []
    d.sample(model, len(x_T), noise=x_T, progress=False, callback=lambda t, x: trajectory.append(x), **kwargs)
    return trajectory[-1]


def test_the_respaced_ancestral_chain_is_ddim_at_eta_1():
    """Respaced, the ancestral chain takes the posterior variance beta~' (DDPM eq. 7): it is then DDIM at eta = 1
    (DDIM eq. 16), same mean and same noise, where the large variance beta' would add more noise each step."""
    d, model = Diffusion(img_size=8, c_in=1), FixedNoise().double()
    x_T = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.manual_seed(3)
    ancestral = final_x(d, model, x_T, sampler="ddpm", steps=10)
    torch.manual_seed(3)
    ddim = final_x(d, model, x_T, sampler="ddim", steps=10, eta=1.0)
    torch.testing.assert_close(ancestral, ddim, rtol=1e-4, atol=1e-4)  # the two formulas' float32 coefficients


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_one_step_chain_starts_from_pure_noise_at_T_minus_1(sampler):
    """From x_T alone, one step of the exact denoiser of a single image returns that image (not noise)."""
    image = torch.randint(0, 256, (1, 1, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    d = Diffusion(img_size=8, c_in=1)
    assert d.timesteps(1).tolist() == d.timesteps(1, log_snr=True).tolist() == [999]
    images = d.sample(ExactDenoiser(image, None, d), 4, sampler=sampler, steps=1, progress=False)
    # what remains is the noise of timestep 0: sqrt(1 - alpha_hat_0) = 0.01, about one grey level
    assert (images.float() - image.float()).abs().mean() < 2


@pytest.mark.parametrize("log_snr", [False, True])
def test_every_step_count_visits_that_many_distinct_timesteps_from_T_minus_1(log_snr):
    d = Diffusion(noise_steps=100)
    for steps in range(1, 100):
        t = d.timesteps(steps, log_snr)
        assert len(t) == steps and t[0] == 99 and t[-1] >= 1 and bool((t[1:] < t[:-1]).all())


def test_log_snr_spacing_takes_equal_lambda_steps_where_the_timesteps_allow():
    d = Diffusion()
    kept = d.timesteps(10, log_snr=True)
    h = d.lambda_t(torch.cat([kept, kept.new_zeros(1)])).diff()
    # the whole range, lambda_999 = -5.06 to lambda_0 = 4.61, in ten steps of 0.97 (integer timesteps: +-0.1)
    torch.testing.assert_close(h, torch.full_like(h, 0.966), atol=0.1, rtol=0)


def test_dpmpp2m_takes_ddim_steps_first_and_last():
    """DPM-Solver++(2M) extrapolates the x0 prediction only between its first and last step: at 1 step it is DDIM
    at 1 step, and at 2 steps DDIM over its 2 timesteps."""
    images = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    d = Diffusion(img_size=8, c_in=1)
    model = ExactDenoiser(images, None, d)  # its x0 is in [-1, 1]: the clipped first step changes nothing
    x_T = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    one_step = {s: final_x(d, model, x_T, sampler=s, steps=1) for s in ("ddim", "dpmpp2m")}
    torch.testing.assert_close(one_step["dpmpp2m"], one_step["ddim"], rtol=1e-7, atol=1e-7)  # float32 schedule
    x, kept = x_T, d.timesteps(2, log_snr=True).tolist()
    for i, j in zip(kept, kept[1:] + [0]):
        x = d.ddim_step(x, model(x, torch.full((3,), i)), i, j, eta=0.0, last=j == 0)
    torch.testing.assert_close(final_x(d, model, x_T, sampler="dpmpp2m", steps=2), x, rtol=1e-7, atol=1e-7)


@pytest.fixture(scope="module")
def three_images_converged():
    """The exact denoiser of 3 random images (float64), 16 x_T and where a 999-step DPM-Solver++ takes them."""
    images = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    d = Diffusion(img_size=8, c_in=1)
    exact = ExactDenoiser(images, None, d)
    x_T = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return d, exact, x_T, final_x(d, exact, x_T, sampler="dpmpp2m", steps=999)


@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("dpmpp2m", 2)])
def test_the_error_shrinks_at_the_rate_of_the_samplers_order(three_images_converged, sampler, order):
    """Each chain's error against the converged reference from the same x_T divides by 2^order when the steps
    double (the median over the 16 trajectories)."""
    d, exact, x_T, reference = three_images_converged
    errors = torch.stack([(final_x(d, exact, x_T, sampler=sampler, steps=steps) - reference).flatten(1).norm(dim=1)
                          for steps in (80, 160, 320)]).median(1).values
    observed = (errors[:-1] / errors[1:]).log2()  # measured: 1.02 and 1.00 for DDIM, 2.09 and 1.99 for DPM-Solver++
    assert ((observed - order).abs() < 0.2).all(), observed


def test_samples_are_rounded_as_the_real_images_are():
    """uint8 samples are the nearest grey level of the chain's last x: no -0.5 bias from truncation."""
    d = Diffusion(img_size=16, c_in=1)
    x_T = torch.randn(8, 1, 16, 16)
    images = d.sample(FixedNoise(), 8, sampler="ddim", steps=5, noise=x_T, progress=False)
    exact = (final_x(d, FixedNoise(), x_T, sampler="ddim", steps=5).clamp(-1, 1) + 1) * 127.5
    assert (images - exact).abs().max() <= 0.5 + 1e-4
    assert abs((images - exact).mean()) < 0.05


def test_respaced_alphas_reproduce_alpha_hat_at_the_kept_steps():
    d = Diffusion()
    kept = d.timesteps(50).flip(0)
    assert kept[0] == 1 and kept[-1] == 999 and len(kept) == 50
    alphas = d.respaced_alphas(kept)
    torch.testing.assert_close(torch.cumprod(alphas, 0), d.alpha_hat[kept], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(1 - d.respaced_alphas(torch.arange(1000)), d.beta, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_few_long_steps_of_a_short_schedule_stay_finite(sampler):
    """T = 20 ends at alpha_hat 6e-11: a respaced step from there has alpha' = 1 - (1 - 6e-11), 0 in float32, if it
    is computed from beta'; the ancestral chain then drew inf and NaN, and the grids came out black."""
    d = Diffusion(noise_steps=20, img_size=8, c_in=1)
    for steps in (1, 2, 3, 19):
        seen = []
        d.sample(FixedNoise(), 2, sampler=sampler, steps=steps, progress=False,
                 callback=lambda t, x: seen.append(bool(torch.isfinite(x).all())))
        assert all(seen), (steps, seen)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_are_monotone_in_0_1(schedule):
    d = Diffusion(schedule=schedule)
    assert torch.all((d.alpha_hat > 0) & (d.alpha_hat < 1))
    assert torch.all(d.alpha_hat[1:] < d.alpha_hat[:-1])
    assert torch.all((d.beta > 0) & (d.beta <= 0.999))


def test_cosine_schedule_closed_form():
    import math
    d = Diffusion(noise_steps=1000, schedule="cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert d.alpha_hat[499].item() == pytest.approx(f(500) / f(0), rel=1e-4)


class OnePercentOff(torch.nn.Module):
    """At high noise eps is almost x_t; this model is off by 1%."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.01))

    def forward(self, x, t):
        return self.scale * x


@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("ddpm", 100)])
def test_the_first_cosine_step_does_not_blow_up_a_small_error(sampler, steps):
    d = Diffusion(img_size=8, c_in=1, schedule="cosine")
    after_first = []
    d.sample(OnePercentOff(), 64, sampler=sampler, steps=steps, progress=False,
             callback=lambda t, x: after_first.append(x.std().item()) if not after_first else None)
    # unclipped, the first step multiplies the 1% error 632-fold (DDIM-50): x_t's std would be about 6
    assert after_first[0] < 1.5


def test_the_linear_chains_are_never_clipped():
    d = Diffusion(img_size=8, c_in=1)
    for steps in (None, 10, 50, 100):
        assert not any(d.clipped_steps(d.timesteps(steps)))
    assert Diffusion(schedule="cosine").clipped_steps(d.timesteps(50)) == [True] + [False] * 49  # only the first


def test_bad_sampler_arguments():
    d, model = Diffusion(noise_steps=10, img_size=8, c_in=1), FixedNoise()
    with pytest.raises(ValueError, match="sampler"):
        d.sample(model, 1, sampler="euler", progress=False)
    with pytest.raises(ValueError, match="steps"):
        d.sample(model, 1, sampler="ddim", steps=10, progress=False)
    for eta in (1.5, -0.1):  # past 1 DDIM's variance exceeds 1 - alpha_hat: the square root of a negative number
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            d.sample(model, 1, sampler="ddim", steps=5, eta=eta, progress=False)
    with pytest.raises(ValueError, match="eta"):
        d.sample(model, 1, sampler="dpmpp2m", steps=5, eta=0.5, progress=False)


def make_run(folder, conditional=True):
    """A run folder as training writes it, with a random tiny model."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = UNet_conditional(c_in=1, c_out=1, num_classes=3, width=8) if conditional else UNet(1, 1, width=8)
    torch.save(model.state_dict(), folder / "ckpt.pt")
    config = {"model_args": dict(c_in=1, c_out=1, time_dim=256, width=8),
              "diffusion_args": dict(noise_steps=20, beta_start=1e-4, beta_end=0.02, img_size=16, c_in=1,
                                     schedule="cosine"),
              "class_names": ["a", "b", "c"] if conditional else ["x"]}
    (folder / "run.json").write_text(json.dumps(config))
    return model


def test_load_round_trips_a_run(tmp_path):
    original = make_run(tmp_path / "run")
    model, diffusion = sample.load(tmp_path / "run", device="cpu")
    assert isinstance(diffusion, ddpm_conditional.Diffusion) and diffusion.schedule == "cosine"
    assert (diffusion.noise_steps, diffusion.img_size, diffusion.c_in) == (20, 16, 1)
    assert model.class_names == ["a", "b", "c"]
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 9]), torch.tensor([0, 2])
    torch.testing.assert_close(model(x, t, y), original.eval()(x, t, y))


def test_load_prefers_ema_weights(tmp_path):
    make_run(tmp_path / "run")
    ema = UNet_conditional(c_in=1, c_out=1, num_classes=3, width=8)
    torch.save(ema.state_dict(), tmp_path / "run" / "ema_ckpt.pt")
    model, _ = sample.load(tmp_path / "run")
    torch.testing.assert_close(model.outc.weight, ema.outc.weight)
    model, _ = sample.load(tmp_path / "run", ema=False)
    assert not torch.equal(model.outc.weight, ema.outc.weight)


def test_the_originals_bare_checkpoint_loads(tmp_path):
    original = UNet_conditional(num_classes=10)  # the original's defaults: RGB, width 64
    torch.save(original.state_dict(), tmp_path / "ema_ckpt.pt")
    model, diffusion = sample.load(tmp_path / "ema_ckpt.pt", device="cpu")
    assert isinstance(model, UNet_conditional) and model.num_classes == 10
    assert diffusion.img_size == 64 and diffusion.c_in == 3 and diffusion.noise_steps == 1000
    torch.testing.assert_close(model.outc.weight, original.outc.weight)


def test_a_bare_checkpoint_with_input_skip_loads(tmp_path):
    trained = UNet(c_in=1, c_out=1, width=8, input_skip=True)
    torch.save(trained.state_dict(), tmp_path / "ckpt.pt")
    model, diffusion = sample.load(tmp_path / "ckpt.pt", device="cpu", image_size=16)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 9])
    torch.testing.assert_close(model(x, t), trained.eval()(x, t))
    assert diffusion.img_size == 16
    assert sample.load(tmp_path / "ckpt.pt", device="cpu", img_size=24)[1].img_size == 24  # the Diffusion's spelling
    sample.main(["--run", str(tmp_path / "ckpt.pt"), "--img_size", "8", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "grid.png"), "--out_dir", str(tmp_path / "each")])  # the flag's old spelling
    with Image.open(tmp_path / "each" / "00000.png") as im:
        assert im.size == (8, 8)


class Payload:
    def __reduce__(self):
        return os.system, (f"touch {Payload.marker}",)


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    Payload.marker = tmp_path / "pwned"
    evil = tmp_path / "ckpt.pt"
    torch.save({"inc.double_conv.0.weight": torch.zeros(1), "x": Payload()}, evil)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        sample.load(evil)
    assert not Payload.marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="junk.pt"):
        sample.load(tmp_path / "junk.pt")


def test_sample_command_writes_grid_and_images(tmp_path, capsys, device):
    make_run(tmp_path / "run")
    out = tmp_path / "grid.png"
    sample.main(["--run", str(tmp_path / "run"), "--labels", "2", "0", "--n", "6", "--steps", "4",
                 "--out", str(out), "--out_dir", str(tmp_path / "each"), "--precision", "fp32", "--device", device])
    with Image.open(out) as im:  # rows = labels, columns = n; 56 pixels wide, enlarged 9x towards 512 pixels
        assert im.size == (9 * (3 * 18 + 2), 9 * (2 * 18 + 2))
        grid = np.asarray(im)
    assert (grid[::9, ::9].repeat(9, 0).repeat(9, 1) == grid).all()  # nearest neighbour: 9x9 blocks
    each = sorted((tmp_path / "each").glob("*.png"))
    assert len(each) == 6
    with Image.open(each[0]) as im:
        assert im.size == (16, 16)  # single images at native size
    assert "rows: c, a" in capsys.readouterr().out
    # --n is the total, as in sample(model, n): 8 per label unless given, and it must split evenly
    sample.main(["--run", str(tmp_path / "run"), "--labels", "1", "--steps", "2", "--out", str(tmp_path / "g.png"),
                 "--out_dir", str(tmp_path / "eight")])
    assert len(list((tmp_path / "eight").glob("*.png"))) == 8
    with pytest.raises(UserError, match="--n 5 images do not split evenly over 2 labels: give a multiple of 2"):
        sample.main(["--run", str(tmp_path / "run"), "--labels", "2", "0", "--n", "5", "--out", str(out)])


def test_sample_command_takes_class_names_and_lists_them_when_one_is_unknown(tmp_path, capsys):
    make_run(tmp_path / "run")
    draw = lambda name, *labels: sample.main(["--run", str(tmp_path / "run"), "--n", "3", "--steps", "4",
                                              "--out", str(tmp_path / name), "--labels", *labels])
    draw("names.png", "c", "a", "-1")
    draw("indices.png", "2", "0", "-1")
    assert (tmp_path / "names.png").read_bytes() == (tmp_path / "indices.png").read_bytes()
    capsys.readouterr()
    for bad in ("z", "3", "-2"):
        with pytest.raises(SystemExit):
            run_main(lambda: draw("bad.png", bad))
        err = capsys.readouterr().err.strip()
        assert err == f"error: --labels {bad}: not a class of this run, whose classes are 0 a, 1 b, 2 c (or -1 for none)"


def test_sample_command_guidance_interval(tmp_path):
    make_run(tmp_path / "run")
    run = lambda name, *flags: sample.main(["--run", str(tmp_path / "run"), "--n", "3", "--steps", "4",
                                            "--out", str(tmp_path / name), *flags])
    run("all.png")
    run("all_again.png", "--guidance_interval", "0", "19")
    run("high.png", "--guidance_interval", "10", "19")
    assert (tmp_path / "all.png").read_bytes() == (tmp_path / "all_again.png").read_bytes()
    assert (tmp_path / "all.png").read_bytes() != (tmp_path / "high.png").read_bytes()
    with pytest.raises(UserError, match="guidance_interval"):
        run("bad.png", "--guidance_interval", "10", "20")


def test_sample_command_bad_sampler_arguments_are_one_line_errors(tmp_path):
    make_run(tmp_path / "unconditional", conditional=False)
    make_run(tmp_path / "conditional")
    for run, flags, message in (("unconditional", ["--steps", "-3"], "--steps must be at least 0"),
                                ("unconditional", ["--sampler", "ddim", "--steps", "4", "--eta", "2"], "eta must be in"),
                                ("conditional", ["--sampler", "ddim", "--steps", "4", "--eta", "1.5"], "eta must be in"),
                                ("conditional", ["--steps", "4", "--sampler", "dpmpp2m", "--eta", "0.5"], "--eta is the ddim sampler's noise")):
        with pytest.raises(UserError, match=message):
            sample.main(["--run", str(tmp_path / run), "--out", str(tmp_path / "x.png"), *flags])


def test_sample_command_same_seed_same_file(tmp_path, device):
    make_run(tmp_path / "run", conditional=False)
    for name in ("a.png", "b.png"):
        sample.main(["--run", str(tmp_path / "run"), "--n", "4", "--steps", "5", "--sampler", "ddpm",
                     "--out", str(tmp_path / name), "--seed", "1", "--device", device])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_sampling_notebook_runs_top_to_bottom_and_keeps_its_pictures(tmp_path, monkeypatch, objective):
    """sampling.ipynb against a tiny conditional run of each objective trained here, executed in place by
    `python -m tools.notebook` from the repo root (on a copy: the committed notebook keeps the default run's
    outputs)."""
    nbformat = pytest.importorskip("nbformat")
    import shutil

    from conftest import ROOT
    from tools import notebook as notebook_tool

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the tool sets it for the kernel; restored after the test
    with pytest.raises(UserError, match="train it first"):
        notebook_tool.main(["--notebook", str(ROOT / "sampling.ipynb")])
    shorter = ["--noise_steps", "100"] if objective == "ddpm" else []  # T is DDPM's: flow matching has none
    ddpm_conditional.main(["--width", "8", "--image_size", "16", "--limit", "32", "--epochs", "1", "--sample_every",
                           "0", "--precision", "fp32", "--objective", objective, *shorter])
    shutil.copy(ROOT / "sampling.ipynb", tmp_path / "copy.ipynb")
    notebook_tool.main(["--notebook", str(tmp_path / "copy.ipynb"), "--timeout", "300"])
    notebook = nbformat.read(tmp_path / "copy.ipynb", as_version=4)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error" or o.get("name") == "stderr"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 8  # grid, denoising, noising, 5 of edits
    printed = "".join(o.get("text", "") for o in outputs)
    assert f"'cfg_scale': {3.0 if objective == 'flow' else 3.5}" in printed  # the recipe's guidance, recorded
    assert f"'sampler': '{'heun' if objective == 'flow' else 'dpmpp2m'}'" in printed


def test_sample_command_refuses_flags_that_would_do_nothing(tmp_path, capsys):
    make_run(tmp_path / "plain", conditional=False)
    make_run(tmp_path / "cond")
    for run, flags, message in [
        ("plain", ["--labels", "1"], "unconditional run: --labels need a class-conditional one"),
        ("plain", ["--cfg_scale", "2"], "unconditional run: --cfg_scale need a class-conditional one"),
        ("cond", ["--sampler", "ddpm", "--eta", "0.5"], "--eta is the ddim sampler's noise"),
    ]:
        with pytest.raises(SystemExit) as e:
            run_main(lambda: sample.main(["--run", str(tmp_path / run), "--out", str(tmp_path / "x.png"), *flags]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x.png").exists()


def test_sample_command_draws_the_unconditional_model_of_a_conditional_run(tmp_path, capsys):
    make_run(tmp_path / "cond")
    sample.main(["--run", str(tmp_path / "cond"), "--labels", "-1", "1", "--n", "2", "--steps", "3",
                 "--out", str(tmp_path / "grid.png")])
    assert "rows: (unconditional), b" in capsys.readouterr().out


def test_help_shows_each_default_once_and_explains_every_flag(capsys):
    parsers = [ddpm.build_parser(), ddpm_conditional.build_parser(), evaluate.build_parser(), benchmark.build_parser()]
    for parser in parsers:
        assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
        switches = [a for a in parser._actions if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))]
        # a switch's default is its absence: "--unconditional (default: True)" misled
        assert not [a.dest for a in switches if "(default:" in parser.formatter_class(parser.prog)._get_help_string(a)]
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    for text in [parser.format_help() for parser in parsers] + [capsys.readouterr().out]:
        assert "(default: None)" not in text and text.count("(default:") >= 5
        assert not re.search(r"\(default: [^)]*\)\s*\(default:", text)


def test_a_runs_recommended_sampling_settings_are_the_defaults(in_tmp):
    """Training records its grids' sampler, steps and guidance in run.json; sample.py, evaluate.py and `recommended`
    (the notebook's) use them unless told otherwise, and a run without them gets the project's defaults."""
    ddpm_conditional.main(["--width", "8", "--image_size", "16", "--noise_steps", "20", "--limit", "30", "--epochs", "1",
                           "--sample_every", "0", "--precision", "fp32", "--sample_steps", "4", "--cfg_scale", "2",
                           "--guidance_interval", "5", "19"])
    run = in_tmp / "models" / "DDPM_conditional"
    config = json.loads((run / "run.json").read_text())
    assert config["sampling"] == {"sampler": "dpmpp2m", "steps": 4, "cfg_scale": 2.0, "guidance_interval": [5, 19]}
    model, _ = sample.load(run)
    assert sample.recommended(run, model) == dict(sampler="dpmpp2m", steps=4, cfg_scale=2.0, guidance_interval=(5, 19))
    assert sample.recommended(run, model, False) == dict(sampler="dpmpp2m", steps=4)

    draw = lambda name, *flags: sample.main(["--run", str(run), "--n", "10", "--out", name, *flags])
    draw("run.png")
    draw("spelt_out.png", "--sampler", "dpmpp2m", "--steps", "4", "--cfg_scale", "2", "--guidance_interval", "5", "19")
    draw("scale_3.png", "--cfg_scale", "3")
    assert Path("run.png").read_bytes() == Path("spelt_out.png").read_bytes() != Path("scale_3.png").read_bytes()

    report = evaluate.evaluate(evaluate.build_parser().parse_args(["--run", str(run), "--n", "10", "--judge_epochs", "1"]))
    assert evaluate.setting_name(report["results"][0]) == "dpmpp2m-4 cfg 2 t 5-19"

    del config["sampling"]  # a run from before run.json carried them
    (run / "run.json").write_text(json.dumps(config))
    assert sample.recommended(run, model) == dict(sampler=ddpm.DEFAULT_SAMPLER, steps=ddpm.DEFAULT_STEPS,
                                                 cfg_scale=ddpm_conditional.CFG_SCALE, guidance_interval=None)
