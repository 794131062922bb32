import json
import os

import pytest
import torch
from PIL import Image

import ddpm_conditional
import sample
from ddpm import Diffusion
from modules import UNet, UNet_conditional
from utils import UserError


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


def test_ddim_full_chain_eta1_has_the_ancestral_mean():
    """DDIM over every step with eta=1 has the mean of the ancestral update (Song et al. 2021, eq. 16)."""
    d = Diffusion(noise_steps=50, img_size=8, c_in=1)
    x, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    for i in (49, 20, 2):
        ddim_mean = d.ddim_step(x, eps, i, i - 1, eta=1.0, last=True)  # last=True: no noise added, the mean
        ddpm_mean = d.ddpm_step(x, eps, i, d.beta[i], last=True)
        torch.testing.assert_close(ddim_mean, ddpm_mean, atol=1e-5, rtol=1e-4)


def test_full_respacing_is_the_original_chain():
    d, model, x_T = Diffusion(noise_steps=30, img_size=8, c_in=1), FixedNoise(), torch.randn(2, 1, 8, 8)
    torch.manual_seed(3)
    original = d.sample(model, 2, noise=x_T, progress=False)
    torch.manual_seed(3)
    respaced = d.sample(model, 2, steps=29, noise=x_T, progress=False)
    assert (original.int() - respaced.int()).abs().max() <= 1


def test_respaced_betas_reproduce_alpha_hat_at_the_kept_steps():
    d = Diffusion()
    kept = d.timesteps(50).flip(0)
    assert kept[0] == 1 and kept[-1] == 999 and len(kept) == 50
    betas = d.respaced_betas(kept)
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), d.alpha_hat[kept], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d.respaced_betas(torch.arange(1000)), d.beta, rtol=1e-4, atol=1e-7)


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
    model, _ = sample.load(tmp_path / "ckpt.pt", device="cpu", img_size=16)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 9])
    torch.testing.assert_close(model(x, t), trained.eval()(x, t))


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
    sample.main(["--run", str(tmp_path / "run"), "--labels", "2", "0", "--n", "3", "--steps", "4",
                 "--out", str(out), "--out_dir", str(tmp_path / "each"), "--precision", "fp32", "--device", device])
    with Image.open(out) as im:
        assert im.size == (3 * 18 + 2, 2 * 18 + 2)  # rows = labels, columns = n
    assert len(list((tmp_path / "each").glob("*.png"))) == 6
    assert "rows: c, a" in capsys.readouterr().out


def test_sample_command_guidance_interval(tmp_path):
    make_run(tmp_path / "run")
    run = lambda name, *flags: sample.main(["--run", str(tmp_path / "run"), "--n", "2", "--steps", "4",
                                            "--out", str(tmp_path / name), *flags])
    run("all.png")
    run("all_again.png", "--guidance_interval", "0", "19")
    run("high.png", "--guidance_interval", "10", "19")
    assert (tmp_path / "all.png").read_bytes() == (tmp_path / "all_again.png").read_bytes()
    assert (tmp_path / "all.png").read_bytes() != (tmp_path / "high.png").read_bytes()
    with pytest.raises(UserError, match="guidance_interval"):
        run("bad.png", "--guidance_interval", "10", "20")


def test_sample_command_same_seed_same_file(tmp_path, device):
    make_run(tmp_path / "run", conditional=False)
    for name in ("a.png", "b.png"):
        sample.main(["--run", str(tmp_path / "run"), "--n", "4", "--steps", "5", "--sampler", "ddpm",
                     "--out", str(tmp_path / name), "--seed", "1", "--device", device])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_sampling_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """sampling.ipynb against a tiny conditional run trained here, as a user runs it from the repo root."""
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    from conftest import ROOT

    monkeypatch.chdir(tmp_path)
    ddpm_conditional.main(["--width", "8", "--image_size", "16", "--noise_steps", "100", "--limit", "32",
                           "--epochs", "1", "--sample_every", "0", "--precision", "fp32"])
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(ROOT / "sampling.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # grid, denoising, noising
