"""Denoising diffusion probabilistic models (Ho et al. 2020), unconditional: the paper, top to bottom.

    python ddpm.py                                  # the embedded digits, no download
    python ddpm.py --dataset_path ~/data/landscapes --image_size 64 --width 64 --batch_size 12

    Diffusion.prepare_noise_schedule   beta_1..beta_T, linear (section 4) or cosine
    Diffusion.noise_images             the forward process q(x_t | x_0) in closed form (eq. 4)
    Diffusion.sample                   Algorithm 2, and the faster DDIM and DPM-Solver++ samplers
    Diffusion.ddpm_step, ddim_step, dpmpp2m_step    one reverse step of each
    Trainer.loss, Trainer.train_step   Algorithm 1;  Trainer.fit: the training loop;  build_parser: the flags

ddpm_conditional.py adds labels, classifier-free guidance and the EMA; modules.py holds the UNet; runs.py the
plumbing (run folders, checkpoints, resuming, stop signals); recipes.py the defaults of each dataset.
"""
import argparse
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from modules import UNet
from recipes import ORIGINAL_OPTIONS, RECIPES
from runs import add_shape_args, parse_run_args, real, Run, run_main, training_parser, whole
from utils import get_data, square_nrow


SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
PREDICTIONS = ("eps", "v")  # what the network outputs: the noise (the original's), or v (Salimans & Ho 2022)
# What sample.py, evaluate.py and the in-training grids use unless told (why: docs/sampling.md).
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpmpp2m", 15


def default_sampling(input_skip: bool) -> dict:
    """The recommended sampler with the input skip (every run trained here), or without (the original's UNet())."""
    return dict(sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS) if input_skip else dict(sampler="ddpm", steps=50)


class Diffusion:
    """The noise schedule, the forward process q(x_t | x_0) and the samplers of the reverse process. Timesteps are
    indices 0..T-1; as in the original, training and sampling use 1..T-1, and every chain ends at 0 (almost clean)."""

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
        """beta_t, linear from beta_start to beta_end (section 4), or cosine (Nichol & Dhariwal 2021, eq. 17). The
        linear betas are T = 1000's; another T scales them by 1000 / T, so that x_{T-1} is pure noise at any T."""
        if self.schedule == "linear":
            scale = 1000 / self.noise_steps
            return torch.linspace(self.beta_start * scale, self.beta_end * scale, self.noise_steps).clamp(max=0.999)
        # cosine: alpha_hat_t = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2)
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
        """q(x_t | x_0): x_t = sqrt(alpha_hat_t) x_0 + sqrt(1 - alpha_hat_t) eps, eps ~ N(0, I) (eq. 4); (x_t, eps)."""
        self._to(x.device)
        sqrt_alpha_hat = self.alpha_hat[t].sqrt()[:, None, None, None]
        sqrt_one_minus_alpha_hat = (1.0 - self.alpha_hat[t]).sqrt()[:, None, None, None]
        eps = torch.randn_like(x)
        return sqrt_alpha_hat * x + sqrt_one_minus_alpha_hat * eps, eps

    def sample_timesteps(self, n: int) -> torch.Tensor:
        """t ~ Uniform{1, ..., T-1}."""
        return torch.randint(low=1, high=self.noise_steps, size=(n,), device=self.device)

    # ----------------------------------------------------------------------- what the network predicts

    def predict_noise(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t). The conditional Diffusion adds labels and guidance here."""
        return self.eps_from_output(model(x, t), x, t)

    def eps_from_output(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output as eps: itself, or from v as eps = sqrt(alpha_hat_t) v + sqrt(1 - alpha_hat_t) x_t."""
        if self.prediction == "eps":
            return output
        alpha_hat = self.alpha_hat[t].to(x.dtype)[:, None, None, None]
        return alpha_hat.sqrt() * output + (1 - alpha_hat).sqrt() * x

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_hat_t) eps - sqrt(1 - alpha_hat_t) x_0 (Salimans & Ho 2022): the target of --prediction v."""
        alpha_hat = self.alpha_hat[t].to(x0.dtype)[:, None, None, None]
        return alpha_hat.sqrt() * eps - (1 - alpha_hat).sqrt() * x0

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        """Eq. 4 solved for x_0: x_0 = (x_t - sqrt(1 - alpha_hat_t) eps) / sqrt(alpha_hat_t)."""
        return (x - (1 - self.alpha_hat[i]).sqrt() * eps) / self.alpha_hat[i].sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = alpha_hat_t / (1 - alpha_hat_t): the signal over the noise variance in x_t."""
        return self.alpha_hat[t] / (1 - self.alpha_hat[t])

    # ----------------------------------------------------------------------- Algorithm 2 and faster samplers

    @torch.inference_mode()
    def sample(self, model: nn.Module, n: int, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
               noise: torch.Tensor | None = None, progress: bool = True, callback=None, start: int | None = None,
               **cond) -> torch.Tensor:
        """Draw n images: uint8 in [0, 255], shape (n, C, H, W).

        sampler "ddpm" is Algorithm 2, over every step as the original, or over `steps` evenly spaced ones; "ddim"
        is Song et al. 2021 (deterministic at eta = 0), "dpmpp2m" DPM-Solver++(2M) (Lu et al. 2022); those two
        take 50 steps unless told. `noise` is x_T (default N(0, I)); `callback(t, x_t)` sees every step; `start`
        begins at the chain's first step at or below that timestep, `noise` then being x there (as img2img does).
        """
        self.check_sampler(sampler, steps, eta)
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"n must be a whole number of images, at least 1, got {n!r}")
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
        # Visit the kept steps s_K > ... > s_1, and end at 0.
        kept = self.timesteps(steps, log_snr=sampler == "dpmpp2m")
        if start is not None:
            kept = kept[kept <= start]
        previous = torch.cat([kept[1:], torch.zeros(1, dtype=torch.long)])
        if steps is None:  # exactly the original's chain: sigma_t^2 = beta_t
            alpha, variance = self.alpha[kept.to(device)], self.beta[kept.to(device)]
        else:  # a few large steps cannot undo beta's excess noise: use the posterior variance beta~ (eq. 7)
            alpha = self.respaced_alphas(torch.cat([torch.zeros(1, dtype=torch.long), kept.flip(0)]))[1:].flip(0)
            variance = (1 - self.alpha_hat[previous.to(device)]) / (1 - self.alpha_hat[kept.to(device)]) * (1 - alpha)
        clip = self.clipped_steps(kept)
        x = torch.randn(shape, device=device) if noise is None else noise.to(device)
        history = None  # dpmpp2m: the previous step's x0 prediction and lambda step
        for k in tqdm(range(len(kept)), desc=f"sampling ({sampler})", leave=False, disable=not progress):
            i, j = kept[k].item(), previous[k].item()
            eps = self.eps_at(model, x, i, clip[k], **cond)
            last = j == 0
            if sampler == "ddpm":
                x = self.ddpm_step(x, eps, i, alpha[k], variance[k], last)
            elif sampler == "ddim":
                x = self.ddim_step(x, eps, i, j, eta, last)
            else:
                x, history = self.dpmpp2m_step(x, eps, i, j, history, last)
            if callback is not None:
                callback(j, x)
        model.train(was_training)
        return to_images(x)

    def ddpm_step(self, x: torch.Tensor, eps: torch.Tensor, i: int, alpha: torch.Tensor, variance: torch.Tensor,
                  last: bool) -> torch.Tensor:
        """Algorithm 2, line 4: x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - alpha_hat_t) eps) + sigma_t z,
        sigma_t^2 = variance: beta_t as the original, or the posterior variance of section 3.2."""
        alpha_hat = self.alpha_hat[i]
        z = torch.zeros_like(x) if last else torch.randn_like(x)
        return 1 / alpha.sqrt() * (x - (1 - alpha) / (1 - alpha_hat).sqrt() * eps) + variance.sqrt() * z

    def ddim_step(self, x: torch.Tensor, eps: torch.Tensor, i: int, j: int, eta: float, last: bool) -> torch.Tensor:
        """DDIM (Song et al. 2021, eq. 12): x_s = sqrt(alpha_hat_s) x0 + sqrt(1 - alpha_hat_s - sigma^2) eps + sigma z."""
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
        """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), one step from t = i to t = j, h = lambda_j - lambda_i:

            x_j = sigma_j / sigma_i x_i - alpha_j (e^{-h} - 1) D,   D = (1 + 1/(2r)) x0_i - 1/(2r) x0_prev,

        alpha_t = sqrt(alpha_hat_t), sigma_t = sqrt(1 - alpha_hat_t), r = h_prev / h: D extrapolates x0 linearly in
        lambda. The first and last steps take D = x0_i, the DDIM step. `history` is (x0_prev, h_prev)."""
        x0 = self.predict_x0(x, eps, i)
        h = self.lambda_t(j) - self.lambda_t(i)
        D = x0
        if history is not None and not last:
            x0_previous, h_previous = history
            r = h_previous / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_previous
        sigma_ratio = ((1 - self.alpha_hat[j]) / (1 - self.alpha_hat[i])).sqrt()
        return sigma_ratio * x - self.alpha_hat[j].sqrt() * torch.expm1(-h) * D, (x0, h)

    def eps_at(self, model: nn.Module, x: torch.Tensor, i: int, clip: bool = False, **cond) -> torch.Tensor:
        """eps_theta(x_t, t = i) in x's dtype; with `clip`, re-derived from the x0 prediction clipped to [-1, 1]."""
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        eps = self.predict_noise(model, x, t, **cond).to(x.dtype)
        if clip:
            x0 = self.predict_x0(x, eps, i).clamp(-1, 1)
            eps = (x - self.alpha_hat[i].sqrt() * x0) / (1 - self.alpha_hat[i]).sqrt()
        return eps

    def timesteps(self, steps: int | None = None, log_snr: bool = False) -> torch.Tensor:
        """The timesteps a sampler visits, descending: T-1..1, or `steps` of them evenly spaced in t or lambda_t."""
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
        """lambda_t = log(sqrt(alpha_hat_t) / sqrt(1 - alpha_hat_t)): half the log-SNR."""
        alpha_hat = self.alpha_hat[t]
        return 0.5 * torch.log(alpha_hat / (1 - alpha_hat))

    def respaced_alphas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha'_k = alpha_hat[s_k] / alpha_hat[s_{k-1}] over ascending kept steps s_k: the chain over them keeps the
        full chain's alpha_hat at each. Not 1 - beta': over a long jump that is 1 - (1 - tiny), 0 in float32."""
        alpha_hat = self.alpha_hat[timesteps.to(self.alpha_hat.device)]
        previous = torch.cat([alpha_hat.new_ones(1), alpha_hat[:-1]])
        return alpha_hat / previous

    def clipped_steps(self, kept: torch.Tensor) -> list[bool]:
        """The steps that clip the x0 prediction: those that multiply its error over 10-fold (chiefly the cosine
        schedule's first). Clipping every step, as Nichol & Dhariwal do, costs quality on the linear schedule."""
        alpha_hat = self.alpha_hat[torch.cat([kept, kept.new_zeros(1)]).to(self.alpha_hat.device)]
        return ((alpha_hat[1:] / alpha_hat[:-1]).sqrt() > 10).tolist()

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

    def condition(self, model: nn.Module, n: int, **cond) -> dict:
        """predict_noise's extra arguments for n images, checked: none here; labels and guidance when conditional."""
        if cond:
            raise TypeError(f"sample() got {', '.join(sorted(cond))}, which {type(self).__module__}."
                            f"{type(self).__name__} does not take (labels and guidance: ddpm_conditional.Diffusion)")
        return cond


def to_images(x: torch.Tensor) -> torch.Tensor:
    """x in [-1, 1] -> uint8 images, rounded as the real images are."""
    return (((x.clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------- Algorithm 1: training

class Trainer:
    """Algorithm 1 on a dataset: the model, its optimizer and the loss. `self.run` does the rest (runs.py)."""

    diffusion_class = Diffusion

    def __init__(self, args: argparse.Namespace, loader=None):
        self.args = args
        self.run = Run(args)  # the device, torch.distributed, the seed, the run's folders
        self.device = self.run.device
        self.loader = get_data(args) if loader is None else loader
        self.model = self.build_model().to(self.device)
        self.net = self.run.prepare(self.model)  # what trains: the model itself, or its DDP or compiled wrapper
        self.diffusion = self.build_diffusion()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                           fused=self.device.type in ("cuda", "cpu"))
        self.total_steps = args.epochs * len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, args, self.total_steps))
        # fp16 gradients are scaled up so that small ones do not round to zero; bf16 and fp32 need no scaling
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.run.amp_dtype == torch.float16)
        self.run.record(self.model, self.diffusion, self.sampling())

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Algorithm 1, lines 3-5: t ~ Uniform, eps ~ N(0, I), and || eps - eps_theta(x_t, t) ||^2 (eq. 14). With
        --prediction v the target is v; with --loss_weight min_snr each image's error is weighted by its t."""
        a, d = self.args, self.diffusion
        t = d.sample_timesteps(images.shape[0])
        x_t, eps = d.noise_images(images, t)
        with self.run.autocast():
            predicted = self.predict(x_t, t, labels)
        target = eps if d.prediction == "eps" else d.velocity(images, eps, t)
        if a.loss_weight == "none":
            return F.mse_loss(predicted.float(), target)
        per_image = (predicted.float() - target).pow(2).mean(dim=(1, 2, 3))
        return (min_snr_weight(d.snr(t), a.snr_gamma, d.prediction) * per_image).mean()

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(x_t, t)  # unconditional: the labels are not used

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Algorithm 1, line 5: one gradient step. Returns the loss, detached, without waiting for the device."""
        loss = self.loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.after_step()
        return loss.detach()

    def after_step(self) -> None:
        """Called after every optimizer step (the conditional trainer updates its EMA here)."""

    def fit(self) -> None:
        """The training loop: Algorithm 1 over the data, and after every epoch a checkpoint (and a sample grid)."""
        a, run = self.args, self.run
        if a.resume:
            self.load_state(run.resume())
        if run.finished():
            return
        with run.training(self.loader, self.model):  # TensorBoard and stop signals, closed at the end
            for epoch in range(run.epoch, a.epochs):
                for images, labels in run.batches(self.loader, epoch):
                    run.log_step(self.train_step(images, labels), self.scheduler.get_last_lr()[0])
                    if run.stop_requested:  # Ctrl-C or SIGTERM: save, and exit
                        run.save_and_exit(*self.checkpoint())
                    if run.checkpoint_due():
                        run.save(*self.checkpoint())
                if run.grid_due(epoch):
                    run.save_grids(epoch, self.sample_grids(), self.grid_nrow())
                run.save(*self.checkpoint())

    # ----------------------------------------------------------------------- what the loop builds, samples and saves

    def build_model(self) -> nn.Module:
        a = self.args
        return UNet(c_in=a.c_in, c_out=a.c_in, width=a.width, input_skip=a.input_skip, channel_mult=a.channel_mult,
                    attention=a.attention, heads=a.heads)

    def build_diffusion(self) -> Diffusion:
        a = self.args
        return self.diffusion_class(noise_steps=a.noise_steps, img_size=a.image_size, device=self.device, c_in=a.c_in,
                                    schedule=a.schedule, prediction=a.prediction)

    def sampling(self) -> dict:
        """The grids' sampler, recorded in run.json as the run's recommended one for sample.py and evaluate.py."""
        sampler = default_sampling(self.args.input_skip)["sampler"]
        return dict(sampler=sampler, steps=min(self.args.sample_steps, self.args.noise_steps - 1))

    def sample_grids(self) -> dict[str, torch.Tensor]:
        """{file name suffix: uint8 images} for this epoch's sample grid."""
        with self.run.autocast():
            return {"": self.diffusion.sample(self.model, self.args.n_samples, **self.sampling())}

    def grid_nrow(self) -> int:
        return square_nrow(self.args.n_samples)

    def checkpoint(self) -> tuple[dict, dict]:
        """The original's files (plain state_dicts), and what resume.pt holds besides the run's position."""
        files = {"ckpt.pt": self.model.state_dict(), "optim.pt": self.optimizer.state_dict()}
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
        return files, state

    def load_state(self, state: dict) -> None:
        """Continue from resume.pt; the optimisation flags given now (--lr, --epochs, ...) win over the saved ones."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():  # fp16 after fp16; any other change of precision starts afresh
            self.scaler.load_state_dict(state["scaler"])
        self.run.continue_schedule(self.optimizer, self.scheduler, lr_factor, state["args"]["epochs"], len(self.loader))


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): the x_0 error weighted by min(SNR, gamma), so that nearly clean timesteps
    stop dominating. The eps error is SNR times the x_0 error, and the v error SNR + 1 times: divide by those."""
    return snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)


def lr_factor(step: int, args: argparse.Namespace, total_steps: int) -> float:
    """Linear warm-up over `args.warmup` steps, then constant, or cosine decay to zero."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.lr_schedule == "cosine":
        progress = (step - args.warmup) / max(1, total_steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


# --------------------------------------------------------------------------- the command line

def build_parser(description: str = "Train an unconditional DDPM.", run_name: str = "DDPM_Unconditional",
                 recipes: dict = RECIPES) -> argparse.ArgumentParser:
    def recipe(key):
        return "(default: " + ", ".join(f"{name} {value[key]}" for name, value in recipes.items()) + ")"

    p = training_parser(description, run_name, recipe)  # with the data, grids, device, saving and resuming
    p.add_argument("--width", type=whole(4), default=None, help=f"base channel width of the UNet {recipe('width')}")
    add_shape_args(p, recipe)
    p.add_argument("--input_skip", action=argparse.BooleanOptionalAction, default=True,
                   help="a 1x1 conv from x_t past the first GroupNorm (docs/changes.md); --no-input_skip: the original")
    p.add_argument("--epochs", type=whole(1), default=None, help=f"passes over the data {recipe('epochs')}")
    p.add_argument("--batch_size", type=whole(1), default=None, help=f"images per step {recipe('batch_size')}")
    p.add_argument("--lr", type=real(positive=True), default=None, help=f"AdamW peak learning rate {recipe('lr')}")
    p.add_argument("--warmup", type=whole(0), default=None, help=f"linear learning-rate warm-up steps {recipe('warmup')}")
    p.add_argument("--lr_schedule", choices=["constant", "cosine"], default=None,
                   help=f"after warm-up {recipe('lr_schedule')}")
    p.add_argument("--weight_decay", type=real(0), default=0.01, help="AdamW weight decay")
    p.add_argument("--noise_steps", type=whole(2), default=1000,
                   help="diffusion steps T; the linear betas (1e-4..0.02 at T = 1000) scale by 1000/T")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear",
                   help="noise schedule: linear (the original's) or cosine (Nichol & Dhariwal 2021)")
    p.add_argument("--prediction", choices=PREDICTIONS, default=None,
                   help="what the network outputs: eps, the noise (the original's), or v = sqrt(alpha_hat) eps - "
                        f"sqrt(1 - alpha_hat) x_0 (Salimans & Ho 2022) {recipe('prediction')}")
    p.add_argument("--loss_weight", choices=["none", "min_snr"], default=None,
                   help=f"none (the original's plain MSE) or min_snr, Min-SNR-gamma (Hang et al. 2023) "
                        f"{recipe('loss_weight')}")
    p.add_argument("--snr_gamma", type=real(positive=True), default=5.0, help="gamma of --loss_weight min_snr")
    p.add_argument("--sample_steps", type=whole(1), default=DEFAULT_STEPS,
                   help=f"{DEFAULT_SAMPLER} steps of the in-training grids")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_run_args(build_parser(), argv, RECIPES, ORIGINAL_OPTIONS)


def main(argv: list[str] | None = None) -> None:
    Trainer(parse_args(argv)).fit()


if __name__ == "__main__":
    run_main(main)
