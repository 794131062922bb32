"""Denoising diffusion probabilistic models (Ho et al. 2020): unconditional training and sampling.

    python ddpm.py                                  # the embedded digits, no download
    python ddpm.py --dataset_path ~/data/landscapes --image_size 64 --width 64 --batch_size 12
"""
import argparse
import inspect
import math
import numbers
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from modules import ORIGINAL_ATTENTION, ORIGINAL_MULT, UNet
from devices import (autocast, autocast_dtype, barrier, gather, init_distributed, pick_device, precision_name,
                     seed_everything)
from runs import (add_runtime_args, ArgumentParser, check_new_run, load_checkpoint, parse_run_args, real,
                  resume_command, run_main, save_checkpoint, save_json, setup_logging, StopRequest, tensor_bytes,
                  whole, write_error)
from utils import close_loader, get_data, make_grid, save_images, SeededSampler, square_nrow, UserError


SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
PREDICTIONS = ("eps", "v")  # what the network outputs: the noise (the original's), or v (Salimans & Ho 2022)
# The sampler and step count of sample.py, evaluate.py and the in-training grids: on the default run at
# n = 1000 (README, Results) DPM-Solver++ at 15 evaluations scores FD 1.03 against DDIM-50's 1.48 (99.3% and
# 99.9% the asked digit) in a third of the time; at 10, FD 1.18.
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpmpp2m", 15


def default_sampling(input_skip: bool) -> dict:
    """The sampler and steps for a network that has the input skip (every run of the training scripts), or not (the
    original's network, `UNet()`): that one cannot keep a deterministic trajectory in range, and on the digits its
    DDIM-50 drew the asked digit 16.5% of the time where the ancestral chain respaced to 50 steps drew it 97.5%
    (docs/sampling.md)."""
    return dict(sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS) if input_skip else dict(sampler="ddpm", steps=50)


class Diffusion:
    """The noise schedule, the forward process q(x_t | x_0) and the reverse-process samplers.

    Timestep indices run 0..T-1 and, as in the original, training and sampling use 1..T-1:
    the chain ends at index 0, where alpha_hat is 1 - beta_start (almost clean).
    """

    def __init__(self, noise_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 img_size: int = 256, device=None, c_in: int = 3, schedule: str = "linear",
                 prediction: str = "eps"):
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got '{schedule}'")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got '{prediction}'")
        self.noise_steps, self.prediction = noise_steps, prediction
        self.beta_start, self.beta_end, self.schedule = beta_start, beta_end, schedule
        self.img_size, self.c_in = img_size, c_in
        self.device = torch.device(device or "cpu")

        self.beta = self.prepare_noise_schedule().to(self.device)
        self.alpha = 1.0 - self.beta
        self.alpha_hat = torch.cumprod(self.alpha, dim=0)

    def prepare_noise_schedule(self) -> torch.Tensor:
        """beta_t: linear from beta_start to beta_end (Ho et al. 2020, section 4), or cosine.

        For T other than 1000 the linear betas are scaled by 1000/T (Nichol & Dhariwal 2021's
        improved-diffusion does the same), capped at 0.999: alpha_hat at T-1 is then 2e-5 to 4e-5 for
        any T >= 100, where unscaled betas at T = 100 would leave 0.36 of the image in the "pure noise".

        The cosine schedule (Nichol & Dhariwal 2021, eq. 17) sets alpha_hat_t = f(t) / f(0) with
        f(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008, and beta_t = 1 - alpha_hat_t / alpha_hat_{t-1},
        clipped at 0.999.
        """
        if self.schedule == "linear":  # beta_start and beta_end are T = 1000's values; other T scale them
            scale = 1000 / self.noise_steps
            return torch.linspace(self.beta_start * scale, self.beta_end * scale, self.noise_steps).clamp(max=0.999)
        s = 0.008
        f = torch.cos((torch.arange(self.noise_steps + 1, dtype=torch.float64) / self.noise_steps + s) / (1 + s)
                      * math.pi / 2) ** 2
        alpha_hat = f / f[0]
        return (1 - alpha_hat[1:] / alpha_hat[:-1]).clamp(max=0.999).float()

    def _to(self, device: torch.device) -> None:
        """Follow the data: the schedule moves to whichever device the model runs on."""
        if self.beta.device != device:
            self.beta, self.alpha, self.alpha_hat = (s.to(device) for s in (self.beta, self.alpha, self.alpha_hat))
            self.device = device

    def noise_images(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = sqrt(alpha_hat_t) x_0 + sqrt(1 - alpha_hat_t) eps, eps ~ N(0, I)   (eq. 4). Returns (x_t, eps)."""
        self._to(x.device)
        sqrt_alpha_hat = self.alpha_hat[t].sqrt()[:, None, None, None]
        sqrt_one_minus_alpha_hat = (1.0 - self.alpha_hat[t]).sqrt()[:, None, None, None]
        eps = torch.randn_like(x)
        return sqrt_alpha_hat * x + sqrt_one_minus_alpha_hat * eps, eps

    def sample_timesteps(self, n: int) -> torch.Tensor:
        """t ~ Uniform{1, ..., T-1}."""
        return torch.randint(low=1, high=self.noise_steps, size=(n,), device=self.device)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = alpha_hat_t / (1 - alpha_hat_t): signal over noise variance in x_t."""
        return self.alpha_hat[t] / (1 - self.alpha_hat[t])

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_hat_t) eps - sqrt(1 - alpha_hat_t) x_0 (Salimans & Ho 2022), the v-prediction target."""
        alpha_hat = self.alpha_hat[t].to(x0.dtype)[:, None, None, None]
        return alpha_hat.sqrt() * eps - (1 - alpha_hat).sqrt() * x0

    def eps_from_output(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output as eps: itself, or for v-prediction eps = sqrt(alpha_hat_t) v + sqrt(1 - alpha_hat_t) x_t."""
        if self.prediction == "eps":
            return output
        alpha_hat = self.alpha_hat[t].to(x.dtype)[:, None, None, None]
        return alpha_hat.sqrt() * output + (1 - alpha_hat).sqrt() * x

    def predict_noise(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t), whatever the network predicts; the conditional Diffusion adds labels and guidance."""
        return self.eps_from_output(model(x, t), x, t)

    def timesteps(self, steps: int | None = None, log_snr: bool = False) -> torch.Tensor:
        """The timesteps a sampler visits, descending from T-1: all of T-1..1, or `steps` of them (1..T-1).

        `steps` of them are evenly spaced in t, or with log_snr in lambda_t from lambda_{T-1} to
        lambda_0, where the chain ends, each on the nearest timestep.
        """
        if steps is None:
            return torch.arange(self.noise_steps - 1, 0, -1)
        if not log_snr:
            return torch.linspace(self.noise_steps - 1, 1, steps).round().long()  # spaced >= 1: distinct
        lam = self.lambda_t(torch.arange(self.noise_steps, device=self.alpha_hat.device)).cpu().double()
        grid = torch.linspace(lam[-1].item(), lam[0].item(), steps + 1)[:-1]
        t = (lam[1:, None] - grid).abs().argmin(0) + 1
        # lambda grows fastest near t = 0, where neighbours can round to one timestep: move each one
        # up until the steps are distinct (at most T-1-k for the k-th, so the first stays T-1)
        k = torch.arange(steps)
        t = (t + k).flip(0).cummax(0).values.flip(0) - k
        return torch.minimum(t, self.noise_steps - 1 - k)

    def lambda_t(self, t: torch.Tensor | int) -> torch.Tensor:
        """lambda_t = log(alpha_t / sigma_t) = log(sqrt(alpha_hat_t) / sqrt(1 - alpha_hat_t)): half the log-SNR."""
        alpha_hat = self.alpha_hat[t]
        return 0.5 * torch.log(alpha_hat / (1 - alpha_hat))

    def respaced_betas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """beta'_k = 1 - alpha_hat[s_k] / alpha_hat[s_{k-1}] for ascending kept steps s_k (alpha_hat[s_{-1}] = 1).

        The chain over the kept steps has the same alpha_hat there as the full chain; with every
        step kept these are the original betas.
        """
        alpha_hat = self.alpha_hat[timesteps.to(self.alpha_hat.device)]
        previous = torch.cat([alpha_hat.new_ones(1), alpha_hat[:-1]])
        return 1 - alpha_hat / previous

    def condition(self, model: nn.Module, n: int, **cond) -> dict:
        """The keyword arguments of predict_noise for n images, checked (the conditional Diffusion's: labels and
        guidance)."""
        unknown = set(cond) - set(inspect.signature(self.predict_noise).parameters)
        if unknown:
            raise TypeError(f"sample() got {', '.join(sorted(unknown))}, which {type(self).__module__}."
                            f"{type(self).__name__} does not take (labels and guidance: ddpm_conditional.Diffusion)")
        return cond

    @torch.inference_mode()
    def sample(self, model: nn.Module, n: int, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
               noise: torch.Tensor | None = None, progress: bool = True, callback=None, start: int | None = None,
               **cond) -> torch.Tensor:
        """Draw n images; uint8 in [0, 255], shape (n, C, H, W).

        sampler "ddpm": ancestral sampling (Algorithm 2) over every step, as the original, or over
        `steps` evenly spaced ones. sampler "ddim": Song et al. 2021, deterministic at eta=0.
        sampler "dpmpp2m": DPM-Solver++(2M) (Lu et al. 2022), deterministic, over `steps` spaced
        evenly in log-SNR. ddim and dpmpp2m take 50 steps unless told; each step is one network
        evaluation. Every chain starts at T-1 and ends at timestep 0. `noise` is x_T (default
        N(0, I)); `callback(t, x_t)` sees every intermediate x_t (for trajectories). `start` begins
        the chain at its first step at or below that timestep instead, `noise` then being x there
        (what img2img does).
        """
        self.check_sampler(sampler, steps, eta)
        check_count(n)
        shape = (n, self.c_in, self.img_size, self.img_size)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(f"noise must have the shape of the n images, {shape}, got {tuple(noise.shape)}")
        cond = self.condition(model, n, **cond)
        if sampler != "ddpm" and steps is None:
            steps = 50
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        self._to(device)
        # Visit the kept steps s_K > ... > s_1 and end at 0: alpha_hat[0] = 1 - beta_start, almost clean.
        kept = self.timesteps(steps, log_snr=sampler == "dpmpp2m")
        if start is not None:
            kept = kept[kept <= start]
        previous = torch.cat([kept[1:], torch.zeros(1, dtype=torch.long)])
        if steps is None:
            beta = variance = self.beta[kept.to(device)]  # exactly the original's chain: sigma_t^2 = beta_t
        else:
            beta = self.respaced_betas(torch.cat([torch.zeros(1, dtype=torch.long), kept.flip(0)]))[1:].flip(0)
            # the posterior variance beta~ (eq. 7): beta's excess noise is not undone by a few large steps
            variance = (1 - self.alpha_hat[previous.to(device)]) / (1 - self.alpha_hat[kept.to(device)]) * beta
        clip = self.clipped_steps(kept)
        x = torch.randn((n, self.c_in, self.img_size, self.img_size), device=device) if noise is None else noise.to(device)
        history = None  # dpmpp2m: the previous step's x0 prediction and lambda step
        for k in tqdm(range(len(kept)), desc=f"sampling ({sampler})", leave=False, disable=not progress):
            i, j = kept[k].item(), previous[k].item()
            eps = self.eps_at(model, x, i, clip[k], **cond)
            last = j == 0
            if sampler == "ddpm":
                x = self.ddpm_step(x, eps, i, beta[k], variance[k], last)
            elif sampler == "ddim":
                x = self.ddim_step(x, eps, i, j, eta, last)
            else:
                x, history = self.dpmpp2m_step(x, eps, i, j, history, last)
            if callback is not None:
                callback(j, x)
        model.train(was_training)
        return to_images(x)

    def eps_at(self, model: nn.Module, x: torch.Tensor, i: int, clip: bool = False, **cond) -> torch.Tensor:
        """eps_theta(x_t, t = i) for the whole batch, in x's dtype (out of autocast's); with `clip`, re-derived from
        the x0 prediction clipped to the data range (see clipped_steps)."""
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        eps = self.predict_noise(model, x, t, **cond).to(x.dtype)
        if clip:
            x0 = self.predict_x0(x, eps, i).clamp(-1, 1)
            eps = (x - self.alpha_hat[i].sqrt() * x0) / (1 - self.alpha_hat[i]).sqrt()
        return eps

    def check_sampler(self, sampler: str, steps: int | None, eta: float = 0.0) -> None:
        """ValueError unless sampler is one of SAMPLERS, steps None or in [1, T-1], and eta in [0, 1] (ddim only)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got '{sampler}'")
        if steps is not None and not 1 <= steps <= self.noise_steps - 1:
            raise ValueError(f"steps must be in [1, {self.noise_steps - 1}], got {steps}")
        if not 0 <= eta <= 1:  # past 1 the DDIM variance exceeds 1 - alpha_hat_prev: no real solution
            raise ValueError(f"eta must be in [0, 1], got {eta:g}")
        if eta and sampler != "ddim":
            raise ValueError(f"eta is DDIM's noise: the {sampler} sampler takes none, got {eta:g}")

    def clipped_steps(self, kept: torch.Tensor) -> list[bool]:
        """For each step s_k -> s_{k-1} of a chain: does it clip the x0 prediction to [-1, 1] (and re-derive eps)?

        Those that would multiply its error more than 10-fold, sqrt(alpha_hat[s_{k-1}] / alpha_hat[s_k]) > 10.
        Chiefly the first step of a cosine-schedule chain: alpha_hat at T-1 is about 1e-9 there, and
        unclipped it multiplies the model's error 632-fold in DDIM-50 (chains of under 5 steps have
        such steps on either schedule). Clipping every step (as Nichol & Dhariwal do) costs FD on the
        linear schedule, whose chains of 5 or more steps never qualify.
        """
        alpha_hat = self.alpha_hat[torch.cat([kept, kept.new_zeros(1)]).to(self.alpha_hat.device)]
        return ((alpha_hat[1:] / alpha_hat[:-1]).sqrt() > 10).tolist()

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - alpha_hat_t) eps) / sqrt(alpha_hat_t): eq. 4 solved for x_0."""
        return (x - (1 - self.alpha_hat[i]).sqrt() * eps) / self.alpha_hat[i].sqrt()

    def ddpm_step(self, x: torch.Tensor, eps: torch.Tensor, i: int, beta: torch.Tensor, variance: torch.Tensor,
                  last: bool) -> torch.Tensor:
        """x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - alpha_hat_t) eps) + sigma_t z   (Algorithm 2).

        sigma_t^2 = variance: beta_t as the original, or the posterior variance
        beta~_t = (1 - alpha_hat_{t-1}) / (1 - alpha_hat_t) beta_t (section 3.2).
        """
        alpha, alpha_hat = 1 - beta, self.alpha_hat[i]
        z = torch.zeros_like(x) if last else torch.randn_like(x)
        return 1 / alpha.sqrt() * (x - (1 - alpha) / (1 - alpha_hat).sqrt() * eps) + variance.sqrt() * z

    def ddim_step(self, x: torch.Tensor, eps: torch.Tensor, i: int, j: int, eta: float, last: bool) -> torch.Tensor:
        """x_s = sqrt(alpha_hat_s) x0_pred + sqrt(1 - alpha_hat_s - sigma^2) eps + sigma z   (DDIM, eq. 12)."""
        alpha_hat, alpha_hat_prev = self.alpha_hat[i], self.alpha_hat[j]
        x0 = self.predict_x0(x, eps, i)
        sigma = eta * ((1 - alpha_hat_prev) / (1 - alpha_hat) * (1 - alpha_hat / alpha_hat_prev)).sqrt()
        x = alpha_hat_prev.sqrt() * x0 + (1 - alpha_hat_prev - sigma ** 2).sqrt() * eps
        if eta > 0 and not last:
            x = x + sigma * torch.randn_like(x)
        return x

    def dpmpp2m_step(self, x: torch.Tensor, eps: torch.Tensor, i: int, j: int,
                     history: tuple[torch.Tensor, torch.Tensor] | None, last: bool
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One step of DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from t_{i-1} = i to t_i = j:

            x_{t_i} = sigma_{t_i} / sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,
            D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},

        h_i = lambda_{t_i} - lambda_{t_{i-1}}, r_i = h_{i-1} / h_i, alpha_t = sqrt(alpha_hat_t),
        sigma_t = sqrt(1 - alpha_hat_t): the data prediction extrapolated linearly in lambda from
        the previous step's. `history` is (x0_{i-2}, h_{i-1}), None on the first step. The first
        step (nothing to extrapolate from) and the last (as Lu et al., for stability with few
        steps) take D_i = x0_{i-1}, which is the DDIM step. Returns x_{t_i} and the next history.
        """
        x0 = self.predict_x0(x, eps, i)
        h = self.lambda_t(j) - self.lambda_t(i)
        D = x0
        if history is not None and not last:
            x0_previous, h_previous = history
            r = h_previous / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_previous
        sigma_ratio = ((1 - self.alpha_hat[j]) / (1 - self.alpha_hat[i])).sqrt()
        return sigma_ratio * x - self.alpha_hat[j].sqrt() * torch.expm1(-h) * D, (x0, h)


    # ----------------------------------------------------------------------- beyond sampling: edits of images

    @torch.inference_mode()
    def inpaint(self, model: nn.Module, images: torch.Tensor, mask: torch.Tensor, sampler: str = "ddpm",
                steps: int = 50, eta: float = 0.0, jump: int = 10, resample: int = 1, progress: bool = True,
                **cond) -> torch.Tensor:
        """Fill the masked part of uint8 `images` (N, C, H, W); `mask` is 1 (True) where to generate, broadcast
        over them (1 or N masks, 1 or C channels). RePaint (Lugmayr et al. 2022, Algorithm 1): every step of the
        reverse chain denoises x_t (eq. 8b) and then replaces the known part with the image noised to the same
        level, x_{t-1}^known = sqrt(alpha_hat_{t-1}) x_0 + sqrt(1 - alpha_hat_{t-1}) eps (eq. 8a), combined as
        m * known + (1 - m) * unknown (eq. 8c; here m = 1 - mask). With `resample` > 1, after every `jump` steps
        the chain goes back up that many steps, x_{t+j} ~ q(x_{t+j} | x_t) in closed form, and down again,
        `resample` - 1 times: the generated part gets to agree with the known part (section 4.2). sampler "ddpm"
        (ancestral, RePaint's) or "ddim" over `steps` evenly spaced steps; the known pixels come back exactly.
        """
        self.check_sampler(sampler, steps, eta)
        if sampler == "dpmpp2m":
            raise ValueError("inpainting takes the ddpm or ddim sampler: DPM-Solver++'s multistep history does "
                             "not survive the known part's replacement")
        if jump < 1 or resample < 1:
            raise ValueError(f"jump and resample must be at least 1, got {jump} and {resample}")
        device = next(model.parameters()).device
        self._to(device)
        x0 = from_images(images, device)
        mask = torch.as_tensor(mask, device=device).float()
        if mask.dim() != 4 or mask.shape[-2:] != x0.shape[-2:] or mask.shape[0] not in (1, len(x0)) \
                or mask.shape[1] not in (1, x0.shape[1]):
            raise ValueError(f"mask must be (1 or N, 1 or C, H, W) for images {tuple(x0.shape)}, got "
                             f"{tuple(mask.shape)}")
        cond = self.condition(model, len(x0), **cond)
        kept = self.timesteps(steps)
        at = kept.tolist() + [0]  # the timestep of each position on the chain: 0 is x_T, len(kept) the image

        def known(t: int) -> torch.Tensor:
            return self.noise_images(x0, torch.full((len(x0),), t, device=device))[0]

        x = mask * torch.randn_like(x0) + (1 - mask) * known(at[0])
        path = repaint_path(len(kept), jump, resample)
        for a, b in tqdm(list(zip(path[:-1], path[1:])), desc="inpainting", leave=False, disable=not progress):
            i, j = at[a], at[b]
            ratio = self.alpha_hat[j] / self.alpha_hat[i]
            if b < a:  # back up the chain: q(x_j | x_i) = N(sqrt(ratio) x_i, (1 - ratio) I)
                x = ratio.sqrt() * x + (1 - ratio).sqrt() * torch.randn_like(x)
                continue
            eps = self.eps_at(model, x, i, bool(ratio.sqrt() > 10), **cond)
            if sampler == "ddpm":  # the respaced step and its posterior variance, as sample's
                beta = 1 - self.alpha_hat[i] / self.alpha_hat[j]
                x = self.ddpm_step(x, eps, i, beta, (1 - self.alpha_hat[j]) / (1 - self.alpha_hat[i]) * beta, j == 0)
            else:
                x = self.ddim_step(x, eps, i, j, eta, j == 0)
            x = mask * x + (1 - mask) * known(j)
        return to_images(mask * x + (1 - mask) * x0)

    @torch.inference_mode()
    def img2img(self, model: nn.Module, images: torch.Tensor, strength: float, sampler: str = DEFAULT_SAMPLER,
                steps: int | None = DEFAULT_STEPS, noise: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """SDEdit (Meng et al. 2022, Algorithm 1): noise uint8 `images` to the level `strength` in [0, 1] of the
        chain, x_t0 = sqrt(alpha_hat_t0) x_0 + sqrt(1 - alpha_hat_t0) z (eq. 4), and denoise from there with any
        sampler (of whose `steps` those at or below t0 run). Strength 0 returns the images; 1 starts from the pure
        noise `z` (default N(0, I)) as sampling does, and equals sample(noise=z). A conditional model takes labels
        and guidance: towards the class asked."""
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        self.check_sampler(sampler, steps)
        device = next(model.parameters()).device
        self._to(device)
        x0 = from_images(images, device)
        z = torch.randn_like(x0) if noise is None else noise.to(device)
        chain = self.timesteps(50 if sampler != "ddpm" and steps is None else steps, log_snr=sampler == "dpmpp2m")
        chain = chain[chain <= round(strength * (self.noise_steps - 1))]  # sample's chain (ddim: 50 unless told)
        if not len(chain):  # too weak to reach the chain's first step
            return images.clone()
        t0 = chain[0].item()
        # eq. 4 with this z; from T-1 the chain starts at pure noise, as sampling does
        x = z if t0 == self.noise_steps - 1 else self.alpha_hat[t0].sqrt() * x0 + (1 - self.alpha_hat[t0]).sqrt() * z
        return self.sample(model, len(x0), sampler=sampler, steps=steps, noise=x, start=t0, **kwargs)

    @torch.inference_mode()
    def invert(self, model: nn.Module, images: torch.Tensor, steps: int = 50, progress: bool = True,
               **cond) -> torch.Tensor:
        """DDIM inversion: the x_T from which sample(sampler="ddim", steps=steps, noise=x_T) gives back uint8
        `images`. DDIM's deterministic update (Song et al. 2021, eq. 12 at sigma = 0; as an ODE, eq. 13) run from
        t = 0 up the same timesteps, x_next = sqrt(alpha_hat_next) x0_pred + sqrt(1 - alpha_hat_next) eps, with eps
        predicted at the current, less noisy x_t (the approximation that makes it one evaluation a step; its
        error shrinks with the step). Returns float x_T; conditional: with labels, and guidance 1 (cfg_scale=1)
        for the closest round trip."""
        device = next(model.parameters()).device
        self._to(device)
        x = from_images(images, device)
        cond = self.condition(model, len(x), **cond)
        up = [0] + self.timesteps(steps).flip(0).tolist()
        for i, j in tqdm(list(zip(up[:-1], up[1:])), desc="inverting", leave=False, disable=not progress):
            eps = self.eps_at(model, x, i, **cond)
            x = self.alpha_hat[j].sqrt() * self.predict_x0(x, eps, i) + (1 - self.alpha_hat[j]).sqrt() * eps
        return x

    @torch.inference_mode()
    def interpolate(self, model: nn.Module, noise_a: torch.Tensor, noise_b: torch.Tensor, frames: int = 8,
                    sampler: str = "ddim", steps: int = 50, **kwargs) -> torch.Tensor:
        """`frames` images along the spherical interpolation (slerp) from x_T = noise_a to noise_b (each (C, H,
        W): two draws of N(0, I), or two inversions), decoded by a deterministic sampler: the first and last are
        the samples of noise_a and noise_b. A conditional model takes labels (one for every frame, or one each)."""
        if sampler == "ddpm":
            raise ValueError("interpolation needs a deterministic sampler (ddim or dpmpp2m): the ancestral chain "
                             "adds fresh noise at every step")
        if frames < 2:
            raise ValueError(f"frames must be at least 2 (the two ends), got {frames}")
        x = slerp(noise_a, noise_b, torch.linspace(0, 1, frames))
        return self.sample(model, frames, sampler=sampler, steps=steps, noise=x, **kwargs)

def to_images(x: torch.Tensor) -> torch.Tensor:
    """Model-range x in [-1, 1] -> uint8 images, rounded as the real images are."""
    return (((x.clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8)


def from_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> float x in [-1, 1] on `device`: to_images' inverse (exact on the 256 levels)."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (N, C, H, W), as the samplers return them, got {images.dtype}")
    return images.to(device).float() / 127.5 - 1


def slerp(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) of each of `w`'s weights between a and b: sin((1-w) theta) / sin
    theta a + sin(w theta) / sin theta b, theta the angle between them; Gaussian noise keeps its norm along the
    arc, where a straight line would pass through low-norm x_T that the model never saw. w = 0 gives a exactly."""
    theta = torch.arccos((a.flatten() @ b.flatten() / (a.norm() * b.norm())).clamp(-1, 1))
    w = w.to(a.dtype).view(-1, *[1] * a.dim())
    if theta < 1e-4:  # parallel: the straight line
        return (1 - w) * a + w * b
    # the weights first: sin(theta) / sin(theta) is exactly 1, so the ends are exactly a and b
    return torch.sin((1 - w) * theta) / torch.sin(theta) * a + torch.sin(w * theta) / torch.sin(theta) * b


def repaint_path(k: int, jump: int, resample: int) -> list[int]:
    """RePaint's schedule over the positions 0 (x_T) .. k (the image) of a chain of k steps: down one at a time;
    at every `jump`-th position, `resample` - 1 times back up `jump` positions (one move) and down again."""
    path = [0]
    for p in range(1, k + 1):
        path.append(p)
        if resample > 1 and p % jump == 0 and p >= jump and p < k:
            for _ in range(resample - 1):
                path += [p - jump, *range(p - jump + 1, p + 1)]
    return path


def check_count(n) -> None:
    """ValueError unless n, a number of images, is a whole number of at least 1."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a whole number of images, at least 1, got {n!r}")


# --------------------------------------------------------------------------- training

class Trainer:
    """The training loop of Algorithm 1; ddpm_conditional.py extends it with labels and EMA."""

    diffusion_class = Diffusion

    def __init__(self, args: argparse.Namespace, loader: DataLoader | None = None):
        self.args = args
        self.rank, self.world_size, self.device = init_distributed(pick_device(args.device))
        self.is_main = self.rank == 0  # only rank 0 writes files, grids and TensorBoard
        args.device, args.world_size = str(self.device), self.world_size
        seed_everything(args.seed + self.rank)  # each rank draws its own noise; DDP syncs the initial weights
        if not args.resume:
            check_new_run(args.run_name, args.overwrite)  # on every rank, before rank 0 writes anything
        barrier()
        if self.is_main:
            setup_logging(args.run_name, overwrite=args.overwrite and not args.resume)
        barrier()
        self.loader = get_data(args) if loader is None else loader
        self.model = self.build_model().to(self.device)
        # DDP and torch.compile wrap the model for training; checkpoints come from the plain module
        self.net = self.model
        if dist.is_initialized():  # under torchrun, even with one process
            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if args.compile:
            self.net = torch.compile(self.net)
        self.diffusion = self.build_diffusion()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                           fused=self.device.type in ("cuda", "cpu"))
        self.total_steps = args.epochs * len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: lr_factor(s, args, self.total_steps))
        self.amp_dtype = autocast_dtype(args.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0                      # optimizer steps done
        self.train_seconds, self.clock = 0.0, time.monotonic()  # wall-clock of fit(), over every resume
        self.epoch, self.batch = 0, 0      # where the next step starts
        self.logger = None                 # TensorBoard, opened by fit() on rank 0
        self.first_bad_step = torch.full((), -1, device=self.device)
        self.saved_step = None             # the step of the last checkpoint written
        self.stop = StopRequest(self.world_size)  # Ctrl-C / SIGTERM: finish the step, save, exit
        self.folder = Path("models") / args.run_name
        if self.is_main and not args.resume:
            save_json(self.run_config(), self.folder / "run.json")

    def run_config(self) -> dict:
        """Everything needed to rebuild the model and the Diffusion from the run folder."""
        a = self.args
        return {
            "model": type(self.model).__name__,
            "model_args": dict(c_in=a.c_in, c_out=a.c_in, time_dim=self.model.time_dim, width=a.width,
                              input_skip=a.input_skip, **self.shape()),
            "diffusion_args": dict(noise_steps=a.noise_steps, beta_start=self.diffusion.beta_start,
                                   beta_end=self.diffusion.beta_end, img_size=a.image_size, c_in=a.c_in,
                                   schedule=a.schedule, prediction=a.prediction),
            "sampling": self.sampling(),
            "class_names": a.class_names,
            "dataset": a.dataset,
            "dataset_path": a.dataset_path,
            "command": a.command,
            "args": {k: v for k, v in vars(a).items() if k != "class_names"},
        }

    def build_model(self) -> nn.Module:
        a = self.args
        return UNet(c_in=a.c_in, c_out=a.c_in, width=a.width, input_skip=a.input_skip, **self.shape())

    def shape(self) -> dict:
        """The UNet's shape options (modules.ORIGINAL_MULT): the original's unless the flags say otherwise."""
        a = self.args
        return dict(channel_mult=list(a.channel_mult), attention=sorted(a.attention), heads=a.heads)

    def build_diffusion(self) -> Diffusion:
        a = self.args
        return self.diffusion_class(noise_steps=a.noise_steps, img_size=a.image_size, device=self.device, c_in=a.c_in,
                                    schedule=a.schedule, prediction=a.prediction)

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """|| eps - eps_theta(x_t, t) ||^2 at a random t (eq. 14), or v's; weighted per image with --loss_weight."""
        a, d = self.args, self.diffusion
        t = d.sample_timesteps(images.shape[0])
        x_t, eps = d.noise_images(images, t)
        with self.autocast():
            predicted = self.predict(x_t, t, labels)
        target = eps if d.prediction == "eps" else d.velocity(images, eps, t)
        if a.loss_weight == "none":
            return F.mse_loss(predicted.float(), target)
        per_image = (predicted.float() - target).pow(2).mean(dim=(1, 2, 3))
        return (min_snr_weight(d.snr(t), a.snr_gamma, d.prediction) * per_image).mean()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(x_t, t)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; returns the (detached) loss without syncing the device."""
        loss = self.loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.after_step()
        # remember the first non-finite step without a host sync; checked when logging and saving
        bad = (self.first_bad_step < 0) & ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(bad, self.step, self.first_bad_step)
        self.step += 1
        return loss.detach()

    def after_step(self) -> None:
        """Called after every optimizer step (the conditional trainer updates its EMA here)."""

    def sample_grids(self) -> dict[str, torch.Tensor]:
        """{file name suffix: uint8 images} for this epoch's sample grid."""
        with self.autocast():
            return {"": self.diffusion.sample(self.model, self.args.n_samples, **self.sampling())}

    def sampling(self) -> dict:
        """The in-training grids' sampling settings, recorded in run.json as the run's recommended ones
        (sample.py, evaluate.py and the notebook use them unless told otherwise). DEFAULT_SAMPLER over
        `sample_steps` steps: seconds, not minutes. The original network (--no-input_skip) cannot keep a
        deterministic trajectory in range: it gets the ancestral chain respaced to as many steps."""
        sampler = default_sampling(self.args.input_skip)["sampler"]
        return dict(sampler=sampler, steps=min(self.args.sample_steps, self.args.noise_steps - 1))

    def state_dicts(self) -> dict[str, dict]:
        """The original's files: plain state_dicts."""
        return {"ckpt.pt": self.model.state_dict(), "optim.pt": self.optimizer.state_dict()}

    def resume_state(self) -> dict:
        """Everything --resume needs but the random states (save() adds them), in one file so that it is
        always consistent with itself."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "batch": self.batch, "train_seconds": self.train_seconds,
                "device": str(self.device), "precision": precision_name(self.amp_dtype),
                "args": {k: v for k, v in vars(self.args).items()
                         if k not in ("class_names", "command", "device", "overwrite")}}

    def rng_state(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_resume_state(self, state: dict) -> None:
        a = self.args
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():  # fp16 after fp16; any other change of precision starts afresh
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.saved_step = self.step
        self.train_seconds = state.get("train_seconds", 0.0)
        # the optimisation flags given now win over the saved ones; a cosine schedule spans the new --epochs
        saved_epochs = state["args"]["epochs"]
        if a.lr_schedule == "cosine" and a.epochs != saved_epochs and self.is_main:
            before = lr_factor(self.step, a, saved_epochs * len(self.loader))
            print(f"the cosine schedule now ends at epoch {a.epochs}, not {saved_epochs}: the learning rate goes "
                  f"from {before:.3g} to {lr_factor(self.step, a, self.total_steps):.3g} x --lr here")
        self.scheduler.base_lrs = [a.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["lr"] = a.lr * lr_factor(self.step, a, self.total_steps)
            group["weight_decay"] = a.weight_decay
        rng = state["rng"][self.rank]  # this rank's stream, continued
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def check_finite(self) -> None:
        """Stop on a non-finite loss (collective under torchrun: every rank stops together)."""
        bad = self.first_bad_step.clone()
        if self.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        bad = int(bad)
        if bad >= 0:
            raise UserError(f"the loss became non-finite at step {bad}: lower --lr or check the data; "
                            f"{self.what_is_kept()}")

    def what_is_kept(self) -> str:
        """After a failure: the last checkpoint and the command that continues from it, or that there is none."""
        if self.saved_step is None:
            return (f"no checkpoint was saved before it, so start again (--overwrite reuses the name "
                    f"{self.args.run_name})")
        return (f"the checkpoint of step {self.saved_step} in {self.folder} is kept; resume with: "
                f"{resume_command(self.args, self.world_size)}")

    def save(self) -> None:
        """Write the checkpoints of the current position, each atomically; resume.pt last."""
        self.check_finite()
        rng = gather(self.rng_state())  # every process's random state (collective), for rank 0 to save
        now = time.monotonic()
        self.train_seconds, self.clock = self.train_seconds + now - self.clock, now
        if self.is_main:
            files = {**self.state_dicts(), "resume.pt": {**self.resume_state(), "rng": rng}}
            try:
                self.logger.flush()  # every logged step up to this checkpoint is on disk before it
                for name, state in files.items():
                    save_checkpoint(state, self.folder / name)
            except OSError as e:  # a full disk, a quota, a read-only folder: each file is the old or the new one
                raise UserError(f"{write_error(e, self.folder, tensor_bytes(files))}; make room: "
                                f"{self.what_is_kept()}") from None
        self.saved_step = self.step
        barrier()

    def log_samples(self, epoch: int) -> None:
        folder = Path("results") / self.args.run_name
        for suffix, images in self.sample_grids().items():
            nrow = self.grid_nrow(images)
            try:
                save_images(images, folder / f"{epoch}{suffix}.jpg", nrow=nrow)
            except OSError as e:
                raise UserError(f"{write_error(e, folder, images.numel())}; make room: {self.what_is_kept()}") from None
            self.logger.add_image(f"samples{suffix}", make_grid(images, nrow), epoch)

    def grid_nrow(self, images: torch.Tensor) -> int:
        return square_nrow(images.shape[0])

    def fit(self) -> None:
        a = self.args
        if a.resume:
            self.load_resume_state(load_checkpoint(self.folder / "resume.pt"))
            if self.epoch >= a.epochs:
                if self.is_main:
                    print(f"{a.run_name} already finished its {self.epoch} epochs: raise --epochs to train on")
                return
            if self.is_main:
                print(f"resuming {a.run_name} at epoch {self.epoch}, step {self.step}")
        steps = len(self.loader)
        if self.is_main:
            # a resumed run drops the TensorBoard events written after its checkpoint
            self.logger = SummaryWriter(f"runs/{a.run_name}", purge_step=self.epoch * steps + self.batch if a.resume else None)
            backend = f" ({dist.get_backend()})" if dist.is_initialized() else ""
            print(f"world size {self.world_size}{backend}: global batch {a.batch_size * self.world_size} "
                  f"({a.batch_size} per process)")
            print(f"training {a.run_name}: {len(self.loader.dataset)} images {a.c_in}x{a.image_size}x{a.image_size}, "
                  f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters, device {self.device}, "
                  f"precision {self.amp_dtype or torch.float32}, {a.epochs} epochs of {steps} steps")
        self.model.train()
        self.clock = time.monotonic()
        self.stop.listen()
        try:
            for epoch in range(self.epoch, a.epochs):
                self.train_epoch(epoch)
                self.epoch, self.batch = epoch + 1, 0
                if self.is_main and a.sample_every and ((epoch + 1) % a.sample_every == 0 or epoch == a.epochs - 1):
                    self.log_samples(epoch)
                self.save()
            if self.is_main:
                print(f"{a.run_name}: {self.step} steps in {self.train_seconds / 60:.1f} minutes")
        finally:
            self.stop.restore()
            close_loader(self.loader)
            if self.is_main:
                self.logger.close()

    def train_epoch(self, epoch: int) -> None:
        a, steps = self.args, len(self.loader)
        if isinstance(self.loader.sampler, SeededSampler):
            self.loader.sampler.set_epoch(epoch)
            self.loader.sampler.start = self.batch * self.loader.batch_size  # mid-epoch resume: skip what was trained
        rng = torch.get_rng_state()
        batches = iter(self.loader)
        torch.set_rng_state(rng)  # starting the loader draws a seed: undo it, so a resumed run's stream matches
        pbar = tqdm(batches, desc=f"epoch {epoch}", initial=self.batch, total=steps, dynamic_ncols=True,
                    disable=not self.is_main)
        running, count = torch.zeros((), device=self.device), 0
        for i, (images, labels) in enumerate(pbar, start=self.batch):
            running += self.train_step(images.to(self.device, non_blocking=True),
                                       labels.to(self.device, non_blocking=True))
            count += 1
            self.batch = i + 1
            stop = self.stop.requested()  # after every step: torchrun gives its workers 30 s to save
            log = count == a.log_every or i == steps - 1 or stop
            if log:
                mse = running.item() / count  # the only host sync, once per log_every steps
                self.check_finite()
                pbar.set_postfix(MSE=f"{mse:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.is_main:  # rank 0's loss stands for all
                    self.logger.add_scalar("MSE", mse, global_step=epoch * steps + i)
                running, count = torch.zeros((), device=self.device), 0
            if a.save_every and self.step % a.save_every == 0 and i < steps - 1:
                self.save()
            if stop:
                self.save()
                signum = self.stop.signal or signal.SIGTERM
                if self.is_main:
                    print(f"\n{signal.Signals(signum).name}: stopped at epoch {epoch}, step {self.step}; checkpoint "
                          f"saved in {self.folder}. Resume with: {resume_command(a, self.world_size)}", file=sys.stderr)
                sys.exit(128 + signum)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): weight the x_0 error by min(SNR, gamma), so that the nearly clean
    timesteps stop dominating the gradient. The eps error is SNR times the x_0 error and the v error
    SNR + 1 times, so the loss on the trained target is weighted min(SNR, gamma) / SNR or / (SNR + 1)."""
    return snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)


def lr_factor(step: int, args: argparse.Namespace, total_steps: int) -> float:
    """Linear warm-up over `args.warmup` steps, then constant or cosine decay to zero."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.lr_schedule == "cosine":
        progress = (step - args.warmup) / max(1, total_steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


# --------------------------------------------------------------------------- command line

# Defaults that depend on the data: --dataset NAME (or "folder" for --dataset_path).
# Short CPU runs: width 32 and batch 64 keep 2 cores busy without wasting steps; a high rate early, decayed to zero.
# The original's objective, the plain MSE of the noise; also what a run saved before these options existed used.
ORIGINAL_OPTIONS = dict(prediction="eps", loss_weight="none", channel_mult=list(ORIGINAL_MULT),
                        attention=list(ORIGINAL_ATTENTION), heads=4)
_SMALL = dict(width=32, batch_size=64, lr=2e-3, warmup=200, lr_schedule="cosine", **ORIGINAL_OPTIONS)
RECIPES = {
    # 4,500 digits at 16x16, 60 epochs (4,200 steps) unconditional; ddpm_conditional.py's recipe trains 40 with
    # v-prediction and Min-SNR, which reach its quality bar sooner
    "digits": dict(image_size=16, epochs=60, sample_every=20, **_SMALL),
    # 60,000 images at 16x16: about the digits recipe's number of steps (5 epochs, 4,685 steps)
    "mnist": dict(image_size=16, epochs=5, sample_every=1, **_SMALL),
    "fashion_mnist": dict(image_size=16, epochs=5, sample_every=1, **_SMALL),
    # 3,400 colour icons at 32x32, 1,700 steps: what fits 30 minutes on 2 CPU cores (27 with bf16). In so few
    # steps v-prediction with Min-SNR learns shapes where the original's objective leaves blobs (docs/emoji.md);
    # ddpm_conditional.py's recipe trains a cheaper shape for more steps
    "emoji": {**_SMALL, "image_size": 32, "epochs": 32, "sample_every": 5, "prediction": "v", "loss_weight": "min_snr"},
    # GPU-sized: the DDPM paper's CIFAR-10 setting (32x32, batch 128, lr 2e-4 after a 5,000-step warm-up),
    # for 117k of its 800k steps; days on a CPU
    "cifar10": dict(image_size=32, width=64, batch_size=128, epochs=300, lr=2e-4, warmup=5000,
                    lr_schedule="constant", sample_every=10, **ORIGINAL_OPTIONS),
    # the original's landscape recipe: 64x64, batch 12, 500 epochs at AdamW 3e-4, a grid every epoch
    "folder": dict(image_size=64, width=64, batch_size=12, epochs=500, lr=3e-4, warmup=0, lr_schedule="constant",
                   sample_every=1, **ORIGINAL_OPTIONS),
}
DATASETS = ("digits", "emoji", "mnist", "fashion_mnist", "cifar10")


def add_shape_args(p: argparse.ArgumentParser, default: Callable[[str], str] = lambda flag: "", **defaults) -> None:
    """The UNet's shape flags, for the training scripts (defaults None, `default(flag)` wording the recipes' in the
    help) and benchmark.py (`defaults`, shown by the help's formatter)."""
    p.add_argument("--channel_mult", type=whole(1), nargs=3, metavar=("M2", "M4", "M8"),
                   help="the UNet's widths at 1/2, 1/4 and 1/8 of the side, as multiples of --width (the bottleneck: "
                        f"twice the last) {default('channel_mult')}".rstrip())
    p.add_argument("--attention", type=int, nargs="*", choices=[1, 2, 4, 8], metavar="FACTOR",
                   help="where the UNet attends, as downsampling factors: 1 = full resolution (the costly one), 2, 4, "
                        f"8 = the lowest; none = no attention {default('attention')}".rstrip())
    p.add_argument("--heads", type=whole(1), help=f"attention heads {default('heads')}".rstrip())
    p.set_defaults(**defaults)


def build_parser(description: str = "Train an unconditional DDPM.", run_name: str = "DDPM_Unconditional",
                 recipes: dict = RECIPES) -> argparse.ArgumentParser:
    def recipe(key):
        return "(default: " + ", ".join(f"{name} {value[key]}" for name, value in recipes.items()) + ")"

    p = ArgumentParser(description)
    p.add_argument("--run_name", default=run_name, help="names the folders under models/, results/ and runs/")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="digits and emoji ship with pip packages (no download); mnist, fashion_mnist and cifar10 "
                        "come through torchvision, downloaded once into --data_root (default: digits)")
    p.add_argument("--dataset_path", default=None,
                   help="instead of --dataset, a folder of images: one sub-folder per class, or a flat folder")
    p.add_argument("--data_root", default="data", help="where torchvision datasets are downloaded and kept")
    p.add_argument("--image_size", type=whole(8), default=None,
                   help=f"side of the square images, divisible by 8 {recipe('image_size')}")
    p.add_argument("--c_in", type=int, choices=[1, 3, 4], default=None,
                   help="image channels: 1, 3 or 4 (default: from the data)")
    p.add_argument("--width", type=whole(4), default=None, help=f"base channel width of the UNet {recipe('width')}")
    add_shape_args(p, recipe)
    p.add_argument("--input_skip", action=argparse.BooleanOptionalAction, default=True,
                   help="1x1 conv from x_t past the first GroupNorm, so the UNet sees the scale of x_t (DDIM needs "
                        "it); --no-input_skip trains the original's exact network")
    p.add_argument("--epochs", type=whole(1), default=None, help=f"passes over the data {recipe('epochs')}")
    p.add_argument("--batch_size", type=whole(1), default=None, help=f"images per step {recipe('batch_size')}")
    p.add_argument("--lr", type=real(positive=True), default=None, help=f"AdamW peak learning rate {recipe('lr')}")
    p.add_argument("--warmup", type=whole(0), default=None, help=f"linear learning-rate warm-up steps {recipe('warmup')}")
    p.add_argument("--lr_schedule", choices=["constant", "cosine"], default=None,
                   help=f"after warm-up {recipe('lr_schedule')}")
    p.add_argument("--weight_decay", type=real(0), default=0.01, help="AdamW weight decay")
    p.add_argument("--noise_steps", type=whole(2), default=1000,
                   help="diffusion steps T; the linear betas scale by 1000/T (1e-4..0.02 at T = 1000, capped at "
                        "0.999), so that any T ends at the same noise level")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear",
                   help="noise schedule: linear (the original's) or cosine (Nichol & Dhariwal 2021)")
    p.add_argument("--prediction", choices=PREDICTIONS, default=None,
                   help="what the network learns to output: eps, the noise (the original's), or "
                        "v = sqrt(alpha_hat) eps - sqrt(1 - alpha_hat) x_0 (Salimans & Ho 2022); every sampler "
                        f"converts {recipe('prediction')}")
    p.add_argument("--loss_weight", choices=["none", "min_snr"], default=None,
                   help="per-timestep loss weight: none (the original's plain MSE) or min_snr, Min-SNR-gamma "
                        f"(Hang et al. 2023) {recipe('loss_weight')}")
    p.add_argument("--snr_gamma", type=real(positive=True), default=5.0, help="gamma of --loss_weight min_snr")
    add_runtime_args(p)
    p.add_argument("--limit", type=whole(1), default=None,
                   help="use only N images, every class in proportion (smoke runs; default: all)")
    p.add_argument("--sample_every", type=whole(0), default=None,
                   help=f"epochs between sample grids, 0 = never; the last epoch always gets one {recipe('sample_every')}")
    p.add_argument("--n_samples", type=whole(1), default=16, help="images in each sample grid (conditional: per class)")
    p.add_argument("--sample_steps", type=whole(1), default=DEFAULT_STEPS,
                   help=f"{DEFAULT_SAMPLER} steps of the in-training grids")
    p.add_argument("--log_every", type=whole(1), default=10, help="steps between loss logs (each one syncs the device)")
    p.add_argument("--num_workers", type=whole(0), default=None,
                   help="data-loading processes for a folder (default: min(4, cores))")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (pays off on GPUs)")
    p.add_argument("--resume", action="store_true", help="continue models/<run_name> where its last checkpoint left it")
    p.add_argument("--overwrite", action="store_true",
                   help="start again over an existing run: deletes models/, results/ and runs/<run_name> first")
    p.add_argument("--save_every", type=whole(0), default=0,
                   help="also checkpoint every N steps (0 = at epoch ends only)")
    p.add_argument("--skip_bad_images", action=argparse.BooleanOptionalAction, default=False,
                   help="skip unreadable images instead of stopping")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_run_args(build_parser(), argv, RECIPES, ORIGINAL_OPTIONS)


def train(args: argparse.Namespace) -> None:
    Trainer(args).fit()


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    run_main(main)
