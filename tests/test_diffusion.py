import math

import pytest
import torch

import ddpm
import ddpm_conditional
from ddpm import Diffusion
from modules import UNet, UNet_conditional


def test_schedule_matches_closed_form():
    d = Diffusion(noise_steps=1000, beta_start=1e-4, beta_end=0.02, img_size=8, device="cpu")
    assert d.beta.shape == (1000,)
    assert d.beta[0].item() == pytest.approx(1e-4) and d.beta[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(d.beta[1:] - d.beta[:-1], torch.full((999,), (0.02 - 1e-4) / 999), atol=1e-8, rtol=0)
    torch.testing.assert_close(d.alpha, 1 - d.beta)
    t = 500
    expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * s / 999) for s in range(t + 1))
    assert d.alpha_hat[t].item() == pytest.approx(expected, rel=1e-4)
    assert torch.all(d.alpha_hat[1:] < d.alpha_hat[:-1])


def test_noise_images_statistics():
    torch.manual_seed(0)
    d = Diffusion(img_size=32, device="cpu")
    x0 = torch.full((512, 1, 32, 32), 0.5)
    for step in (1, 300, 999):
        t = torch.full((512,), step)
        x_t, eps = d.noise_images(x0, t)
        torch.testing.assert_close(x_t, d.alpha_hat[step].sqrt() * x0 + (1 - d.alpha_hat[step]).sqrt() * eps)
        assert abs(eps.mean().item()) < 0.01 and abs(eps.std().item() - 1) < 0.01
        assert x_t.mean().item() == pytest.approx(0.5 * d.alpha_hat[step].sqrt().item(), abs=0.01)
        assert x_t.var().item() == pytest.approx(1 - d.alpha_hat[step].item(), abs=0.01)


def test_sample_timesteps_never_draws_zero():
    d = Diffusion(noise_steps=10, img_size=8, device="cpu")
    t = d.sample_timesteps(5000)
    assert t.min().item() == 1 and t.max().item() == 9


class Recorder(torch.nn.Module):
    """A fake eps model that returns fixed noise and records its inputs."""

    def __init__(self, eps):
        super().__init__()
        self.eps, self.calls = eps, []
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        self.calls.append((x.clone(), t.clone(), None if y is None else y.clone()))
        return self.eps[: x.shape[0]]


def test_one_reverse_step_by_hand():
    torch.manual_seed(0)
    d = Diffusion(noise_steps=3, beta_start=1e-5, beta_end=6e-4, img_size=4, c_in=1, device="cpu")  # betas to 0.2
    eps = torch.randn(2, 1, 4, 4)
    x_T = torch.randn(2, 1, 4, 4)
    model = Recorder(eps)
    trajectory = []
    torch.manual_seed(1)
    z = torch.randn_like(x_T)  # the noise the sampler draws at its first step (i = 2)
    torch.manual_seed(1)
    d.sample(model, 2, noise=x_T, callback=lambda t, x: trajectory.append(x.clone()), progress=False)
    a, ah, b = d.alpha[2], d.alpha_hat[2], d.beta[2]
    expected = 1 / a.sqrt() * (x_T - (1 - a) / (1 - ah).sqrt() * eps) + b.sqrt() * z
    torch.testing.assert_close(trajectory[0], expected)
    # the last step (i = 1) adds no noise
    a, ah = d.alpha[1], d.alpha_hat[1]
    torch.testing.assert_close(trajectory[1], 1 / a.sqrt() * (expected - (1 - a) / (1 - ah).sqrt() * eps))
    assert [c[1].tolist() for c in model.calls] == [[2, 2], [1, 1]]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [16, 32, 64])
def test_sample_shape_and_dtype(channels, size):
    d = Diffusion(noise_steps=4, img_size=size, c_in=channels, device="cpu")
    model = UNet(c_in=channels, c_out=channels, width=4)
    x = d.sample(model, 2, progress=False)
    assert x.shape == (2, channels, size, size) and x.dtype == torch.uint8
    assert model.training  # sampling restores the training mode


def test_original_readme_snippets_run_unchanged(tmp_path, monkeypatch):
    """The original's README code, with device="cpu"; only T is shortened so that it runs in seconds."""
    from utils import plot_images

    for cls in (ddpm.Diffusion, ddpm_conditional.Diffusion):  # noise_steps=4 instead of 1000
        monkeypatch.setattr(cls.__init__, "__defaults__", (4, *cls.__init__.__defaults__[1:]))
    torch.save(UNet().state_dict(), tmp_path / "unconditional_ckpt.pt")
    torch.save(UNet_conditional(num_classes=10).state_dict(), tmp_path / "conditional_ema_ckpt.pt")
    monkeypatch.chdir(tmp_path)

    device = "cpu"
    model = UNet().to(device)
    ckpt = torch.load("unconditional_ckpt.pt")
    model.load_state_dict(ckpt)
    diffusion = ddpm.Diffusion(img_size=64, device=device)
    x = diffusion.sample(model, n=2)
    plot_images(x)
    assert x.shape == (2, 3, 64, 64)

    n = 2
    model = UNet_conditional(num_classes=10).to(device)
    ckpt = torch.load("conditional_ema_ckpt.pt")
    model.load_state_dict(ckpt)
    diffusion = ddpm_conditional.Diffusion(img_size=64, device=device)
    y = torch.Tensor([6] * n).long().to(device)
    x = diffusion.sample(model, n, y, cfg_scale=3)
    plot_images(x)
    assert x.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("T", [100, 250, 1000, 4000])
def test_linear_schedule_scales_to_any_number_of_steps(T):
    """betas x 1000/T: every T ends at the same noise level (T = 1000 exactly the original's)."""
    d = Diffusion(noise_steps=T, img_size=8)
    assert d.beta[0].item() == pytest.approx(1e-4 * 1000 / T) and d.beta[-1].item() == pytest.approx(0.02 * 1000 / T)
    assert 2e-5 <= d.alpha_hat[-1].item() <= 4.3e-5  # unscaled, T = 100 would end at 0.36
    tiny = Diffusion(noise_steps=10, img_size=8)
    assert tiny.beta.max().item() == pytest.approx(0.999) and tiny.alpha_hat[-1] < 1e-10  # capped, still usable
