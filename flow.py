"""Flow matching, the second objective: a peer of ddpm.Diffusion with the same interface, readable on its own.

Rectified flow (Liu et al. 2022) and conditional flow matching (Lipman et al. 2023) on the straight path from the
data (t = 0) to the noise (t = 1), with t drawn logit-normal (Esser et al. 2024):

    Flow.noise_images       x_t = (1 - t) x_0 + t eps
    Flow.target             v = dx_t/dt = eps - x_0: what the network learns to predict (a plain MSE)
    Flow.sample_timesteps   t = sigmoid(u), u ~ N(0, 1): the middle of the path, where v is hardest, drawn most
    Flow.sample             dx/dt = v_theta(x_t, t), integrated from t = 1 to t = 0: Euler, or Heun's 2nd order

    python ddpm.py --objective flow                 # and ddpm_conditional.py: guidance works as for DDPM
"""
import argparse
import numbers

import torch
import torch.nn as nn
from tqdm import tqdm

from files import UserError
from utils import checked_inputs, to_images

SAMPLERS = ("euler", "heun")
DDPM_OPTIONS = ("prediction", "loss_weight", "snr_gamma", "schedule", "noise_steps")  # refused with --objective flow
# Heun evaluates the network twice a step but the last: 8 steps are 15 evaluations, as dpmpp2m-15.
DEFAULT_SAMPLER, DEFAULT_STEPS = "heun", 8


class Flow:
    """The straight path between data and noise, and the ODE samplers that walk it back."""

    # The network is given 1000 t: the scale of the DDPM timesteps its sinusoidal embedding was built for. A
    # guidance interval LO..HI is in the same units: guided where LO <= 1000 t <= HI.
    noise_steps = 1000

    def __init__(self, img_size: int = 64, device=None, c_in: int = 3):
        self.img_size, self.c_in = img_size, c_in
        self.device = torch.device(device or "cpu")

    def settings(self) -> dict:
        """What rebuilds this Flow: run.json's "diffusion_args"."""
        return dict(objective="flow", img_size=self.img_size, c_in=self.c_in)

    def noise_images(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = (1 - t) x_0 + t eps, eps ~ N(0, I) unless given; (x_t, eps)."""
        eps = torch.randn_like(x) if eps is None else eps
        t = t.to(x.dtype)[:, None, None, None]
        return (1 - t) * x + t * eps, eps

    def sample_timesteps(self, n: int, edm: bool = False) -> torch.Tensor:
        """Logit-normal t (Esser et al. 2024, eq. 19, m = 0, s = 1): in (0, 1), dense in the middle."""
        if edm:
            raise ValueError("EDM's noise levels are a lever of DDPM's: flow matching draws its own t")
        return torch.sigmoid(torch.randn(n, device=self.device))

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.noise_steps * t

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity of the path, v = eps - x_0."""
        return eps - x0

    def network_output(self, model: nn.Module, x: torch.Tensor, time: torch.Tensor, **cond) -> torch.Tensor:
        """The network at (x_t, 1000 t). The conditional Flow adds labels and guidance here."""
        return model(x, time)

    def velocity_at(self, model: nn.Module, x: torch.Tensor, t: float, **cond) -> torch.Tensor:
        """v_theta(x_t, t) in x's dtype."""
        time = torch.full((x.shape[0],), self.noise_steps * t, device=x.device)
        return self.network_output(model, x, time, **cond).to(x.dtype)

    # ----------------------------------------------------------------------- the ODE, from noise to data

    @torch.inference_mode()
    def sample(self, model: nn.Module, n: int, sampler: str = DEFAULT_SAMPLER, steps: int | None = None,
               eta: float = 0.0, noise: torch.Tensor | None = None, progress: bool = True, callback=None,
               start: float | None = None, **cond) -> torch.Tensor:
        """Draw n images: uint8 in [0, 255], shape (n, C, H, W), by integrating dx/dt = v from t = 1 to 0 over
        `steps` equal steps (default 8). `noise` is x_1 (default N(0, I)); `callback(t, x_t)` sees every step;
        `start` begins at the first time at or below it, `noise` then being x there (as img2img does)."""
        steps = DEFAULT_STEPS if steps is None else steps
        self.check_sampler(sampler, steps, eta)
        shape, cond = checked_inputs(self, model, n, noise, cond)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        times = self.times(steps, start)
        x = torch.randn(shape, device=device) if noise is None else noise.to(device)
        for t, s in tqdm(list(zip(times[:-1], times[1:])), desc=f"sampling ({sampler})", leave=False,
                         disable=not progress):
            x = self.step(sampler, model, x, t, s, **cond)
            if callback is not None:
                callback(s, x)
        model.train(was_training)
        return to_images(x)

    def step(self, sampler: str, model: nn.Module, x: torch.Tensor, t: float, s: float, **cond) -> torch.Tensor:
        """One step of `sampler` from t to s; Heun's last step, to s = 0, is Euler's (EDM's Algorithm 1 too)."""
        if sampler == "euler" or s == 0:
            return self.euler_step(model, x, t, s, **cond)
        return self.heun_step(model, x, t, s, **cond)

    def euler_step(self, model: nn.Module, x: torch.Tensor, t: float, s: float, **cond) -> torch.Tensor:
        """x_s = x_t + (s - t) v_theta(x_t, t)."""
        return x + (s - t) * self.velocity_at(model, x, t, **cond)

    def heun_step(self, model: nn.Module, x: torch.Tensor, t: float, s: float, **cond) -> torch.Tensor:
        """Heun's method (Karras et al. 2022, Algorithm 1): an Euler step, then the mean of the slopes at both ends."""
        v = self.velocity_at(model, x, t, **cond)
        v_next = self.velocity_at(model, x + (s - t) * v, s, **cond)
        return x + (s - t) * (v + v_next) / 2

    def invert(self, model: nn.Module, x: torch.Tensor, steps: int = 50, **cond) -> torch.Tensor:
        """The same ODE run forwards, from data (t = 0) to noise (t = 1) in Euler steps: x_1 that samples back to x."""
        _, cond = checked_inputs(self, model, x.shape[0], None, cond)
        times = self.times(steps)[::-1]
        with torch.inference_mode():
            for t, s in zip(times[:-1], times[1:]):
                x = self.euler_step(model, x, t, s, **cond)
        return x

    def times(self, steps: int, start: float | None = None) -> list[float]:
        """1 = t_0 > t_1 > ... > t_steps = 0, equally spaced; from `start`: the ones at or below it."""
        times = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        if start is not None:
            times = times[times <= start + 1e-9]
        return times.tolist()

    def check_sampler(self, sampler: str, steps: int | None, eta: float = 0.0) -> None:
        """ValueError unless sampler is one of SAMPLERS, steps a whole number >= 1 and eta 0."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be {' or '.join(SAMPLERS)} for flow matching, which integrates an ODE, "
                             f"got '{sampler}'")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(f"steps must be a whole number, at least 1, got {steps!r}")
        if eta:
            raise ValueError(f"eta is DDIM's noise: the {sampler} sampler takes none, got {eta:g}")


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str] | None
               ) -> argparse.Namespace:
    """A training run's flags for --objective flow: the network predicts the velocity of a straight path under a
    plain MSE, with logit-normal t, so a recipe's --prediction and --loss_weight (DDPM's) give way, and DDPM's
    options given on the command line are refused."""
    if args.objective != "flow":
        return args
    unset = object()  # argparse keeps what the namespace holds unless the flag is given
    raw = parser.parse_args(argv, argparse.Namespace(**{k: unset for k in DDPM_OPTIONS}))
    given = [f"--{k} {getattr(raw, k)}" for k in DDPM_OPTIONS if getattr(raw, k) is not unset]
    if given:
        raise UserError(f"{' and '.join(given)}: DDPM's, which flow matching does not use (it predicts the velocity "
                        f"of a straight path, t logit-normal, under a plain MSE): drop "
                        f"{'them' if len(given) > 1 else 'it'}")
    args.prediction, args.loss_weight = "velocity", "none"
    return args
