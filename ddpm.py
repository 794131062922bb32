"""Denoising diffusion probabilistic models (Ho et al. 2020), unconditional: the paper, top to bottom.

    python ddpm.py                                  # the embedded digits, no download
    python ddpm.py --dataset_path ~/data/landscapes --image_size 64 --width 64 --batch_size 12

    Diffusion.prepare_noise_schedule   beta_1..beta_T, linear (section 4) or cosine
    Diffusion.noise_images             the forward process q(x_t | x_0) in closed form (eq. 4)
    Diffusion.sample                   Algorithm 2, and the faster DDIM and DPM-Solver++ samplers
    Diffusion.ddpm_step, ddim_step, dpmpp2m_step    one reverse step of each
    Trainer.loss, Trainer.train_step   Algorithm 1;  Trainer.fit: the training loop;  build_parser: the flags

flow.py holds the other objective, flow matching; ddpm_conditional.py adds labels, guidance and the EMA; modules.py
the UNet; runs.py the plumbing (run folders, checkpoints, resuming, signals, flags); recipes.py each dataset's defaults.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

import flow
from modules import UNet
from recipes import RECIPES
from runs import parse_run_args, real, Run, run_main, training_parser, whole
from utils import checked_inputs, get_data, to_images


OBJECTIVES = ("ddpm", "flow")  # flow: flow matching (flow.py), a peer of this file's Diffusion
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
SCHEDULES = ("linear", "cosine")
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
        for name, value, allowed in (("schedule", schedule, SCHEDULES), ("prediction", prediction, PREDICTIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got '{value}'")
        self.noise_steps, self.prediction = noise_steps, prediction
        self.beta_start, self.beta_end, self.schedule = beta_start, beta_end, schedule
        self.img_size, self.c_in = img_size, c_in
        self.device = torch.device(device or "cpu")
        self.beta = self.prepare_noise_schedule().to(self.device)
        self.alpha = 1.0 - self.beta
        self.alpha_hat = torch.cumprod(self.alpha, dim=0)

    def settings(self) -> dict:
        """What rebuilds this Diffusion: run.json's "diffusion_args"."""
        return {k: getattr(self, k) for k in ("noise_steps", "beta_start", "beta_end", "img_size", "c_in", "schedule",
                                              "prediction")}

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

    def noise_images(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_t | x_0): x_t = sqrt(alpha_hat_t) x_0 + sqrt(1 - alpha_hat_t) eps, eps ~ N(0, I) (eq. 4); (x_t, eps)."""
        self._to(x.device)
        sqrt_alpha_hat = self.alpha_hat[t].sqrt()[:, None, None, None]
        sqrt_one_minus_alpha_hat = (1.0 - self.alpha_hat[t]).sqrt()[:, None, None, None]
        eps = torch.randn_like(x) if eps is None else eps
        return sqrt_alpha_hat * x + sqrt_one_minus_alpha_hat * eps, eps

    def sample_timesteps(self, n: int, edm: bool = False) -> torch.Tensor:
        """t ~ Uniform{1, ..., T-1}. With `edm`, EDM's training noise levels (Karras et al. 2022, Table 1):
        ln sigma ~ N(-1.2, 1.2^2) for sigma = 1 / sqrt(SNR), each taken to the timestep nearest it."""
        if not edm:
            return torch.randint(low=1, high=self.noise_steps, size=(n,), device=self.device)
        log_sigma = -1.2 + 1.2 * torch.randn(n, device=self.device)
        log_sigmas = -0.5 * self.snr(torch.arange(1, self.noise_steps, device=self.device)).log()
        return (log_sigmas[None] - log_sigma[:, None]).abs().argmin(1) + 1

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return t  # the network is given the timestep itself

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

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output: eps, or v = sqrt(alpha_hat_t) eps - sqrt(1 - alpha_hat_t) x_0
        (Salimans & Ho 2022) with --prediction v."""
        if self.prediction == "eps":
            return eps
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
        """Draw n images, uint8 (n, C, H, W): "ddpm" is Algorithm 2, every step as the original or `steps` evenly
        spaced; "ddim" Song et al. 2021 (deterministic at eta = 0), "dpmpp2m" DPM-Solver++(2M) (Lu et al. 2022), 50
        steps unless told. `noise` is x_T (default N(0, I)); `callback(t, x_t)` sees every step; `start` begins at
        the first step at or below that timestep, `noise` then being x there (as img2img does)."""
        self.check_sampler(sampler, steps, eta)
        shape, cond = checked_inputs(self, model, n, noise, cond)
        steps = 50 if sampler != "ddpm" and steps is None else steps
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
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)} for a DDPM, got '{sampler}'")
        if steps is not None and not 1 <= steps <= self.noise_steps - 1:
            raise ValueError(f"steps must be in [1, {self.noise_steps - 1}], got {steps}")
        if not 0 <= eta <= 1:  # past 1 the DDIM variance exceeds 1 - alpha_hat_prev: no real solution
            raise ValueError(f"eta must be in [0, 1], got {eta:g}")
        if eta and sampler != "ddim":
            raise ValueError(f"eta is DDIM's noise: the {sampler} sampler takes none, got {eta:g}")


# --------------------------------------------------------------------------- Algorithm 1: training

class Trainer:
    """Algorithm 1 on a dataset: the model, its optimizer and the loss. `self.run` does the rest (runs.py)."""

    diffusion_class, flow_class = Diffusion, flow.Flow

    def __init__(self, args: argparse.Namespace, loader=None):
        self.args = args
        self.run = Run(args)  # the device, torch.distributed, the seed, the run's folders
        self.device = self.run.device
        self.loader = get_data(args) if loader is None else loader
        self.model = self.build_model().to(self.device)
        self.net = self.run.prepare(self.model)  # what trains: the model itself, or its DDP or compiled wrapper
        self.diffusion = self.build_diffusion()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, args.adam_beta2),
                                           weight_decay=args.weight_decay, fused=self.device.type in ("cuda", "cpu"))
        self.scheduler = self.run.lr_schedule(self.optimizer, args.epochs * len(self.loader))
        # fp16 gradients are scaled up so that small ones do not round to zero; bf16 and fp32 need no scaling
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.run.amp_dtype == torch.float16)
        self.run.record(self.model, self.diffusion, self.sampling())

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Algorithm 1, lines 3-5: t ~ Uniform, eps ~ N(0, I), and || eps - eps_theta(x_t, t) ||^2 (eq. 14). The
        target is v with --prediction v; --loss_weight draws t and weights each image's error by it; --immiscible
        pairs each image with a nearby noise. --objective flow: t, x_t and the target are flow matching's (flow.py)."""
        a, d = self.args, self.diffusion
        t = d.sample_timesteps(images.shape[0], edm=a.loss_weight == "edm")
        eps = torch.randn_like(images)
        if a.immiscible:
            eps = immiscible_noise(images, eps)
        x_t, eps = d.noise_images(images, t, eps)
        with self.run.autocast():
            predicted = self.predict(x_t, d.network_time(t), labels)
        target = d.target(images, eps, t)
        if a.loss_weight == "none":
            return F.mse_loss(predicted.float(), target)
        per_image = (predicted.float() - target).pow(2).mean(dim=(1, 2, 3))
        return (loss_weight(a.loss_weight, d.snr(t), a.snr_gamma, d.prediction) * per_image).mean()

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
                    run.save_grids(epoch, self.sample_grids())
                run.save(*self.checkpoint())

    # ----------------------------------------------------------------------- what the loop builds, samples and saves

    def build_model(self) -> nn.Module:
        a = self.args
        return UNet(c_in=a.c_in, c_out=a.c_in, width=a.width, input_skip=a.input_skip, channel_mult=a.channel_mult,
                    attention=a.attention, heads=a.heads)

    def build_diffusion(self) -> Diffusion | flow.Flow:
        a = self.args
        if a.objective == "flow":
            return self.flow_class(img_size=a.image_size, device=self.device, c_in=a.c_in)
        return self.diffusion_class(noise_steps=a.noise_steps, img_size=a.image_size, device=self.device, c_in=a.c_in,
                                    schedule=a.schedule, prediction=a.prediction)

    def sampling(self) -> dict:
        """The grids' sampler, recorded in run.json as the run's recommended one for sample.py and evaluate.py."""
        a = self.args
        if a.objective == "flow":
            return dict(sampler=flow.DEFAULT_SAMPLER, steps=a.sample_steps or flow.DEFAULT_STEPS)
        sampler = default_sampling(a.input_skip)["sampler"]
        return dict(sampler=sampler, steps=min(a.sample_steps or DEFAULT_STEPS, a.noise_steps - 1))

    def sample_grids(self) -> dict[str, torch.Tensor]:
        """{file name suffix: uint8 images} for this epoch's sample grid."""
        with self.run.autocast():
            return {"": self.diffusion.sample(self.model, self.args.n_samples, **self.sampling())}

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
        self.run.continue_schedule(self.optimizer, self.scheduler, state["args"]["epochs"], len(self.loader))


def loss_weight(kind: str, snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Each image's weight, so that its x_0 error counts w: min_snr, Min-SNR-gamma (Hang et al. 2023): w = min(SNR,
    gamma), nearly clean t stop dominating; edm: EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    (Karras et al. 2022) = SNR + 4 at sigma^2 = 1/SNR, sigma_data = 0.5. The eps error is SNR times the x_0 error,
    the v error SNR + 1 times: divide by those."""
    w = snr.clamp(max=gamma) if kind == "min_snr" else snr + 4
    return w / (snr if prediction == "eps" else snr + 1)


def immiscible_noise(images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Immiscible diffusion (Li et al. 2024): the batch's noises, reassigned to its images by the linear assignment
    of least total distance. Each noise is still N(0, I); each image now denoises towards a nearer one."""
    distance = torch.cdist(images.flatten(1).float(), eps.flatten(1).float())
    _, assigned = linear_sum_assignment(distance.cpu().numpy())
    return eps[torch.as_tensor(assigned, device=eps.device)]


# --------------------------------------------------------------------------- the command line

def build_parser(description: str = "Train an unconditional DDPM.", run_name: str = "DDPM_Unconditional",
                 recipes: dict = RECIPES) -> argparse.ArgumentParser:
    def recipe(key):
        return "(default: " + ", ".join(f"{name} {value[key]}" for name, value in recipes.items()) + ")"

    p = training_parser(description, run_name, recipe)  # with the UNet's shape, and the run's flags
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help=f"ddpm (the original's) or flow: flow matching (flow.py) {recipe('objective')}")
    p.add_argument("--noise_steps", type=whole(2), default=1000,
                   help="diffusion steps T; the linear betas (1e-4..0.02 at T = 1000) scale by 1000/T")
    p.add_argument("--schedule", choices=SCHEDULES, default="linear",
                   help="noise schedule: linear (the original's) or cosine (Nichol & Dhariwal 2021)")
    p.add_argument("--prediction", choices=PREDICTIONS, default=None,
                   help="what the network outputs: eps, the noise (the original's), or v = sqrt(alpha_hat) eps - "
                        f"sqrt(1 - alpha_hat) x_0 (Salimans & Ho 2022) {recipe('prediction')}")
    p.add_argument("--loss_weight", choices=["none", "min_snr", "edm"], default=None,
                   help="none (the original's plain MSE), min_snr: Min-SNR-gamma (Hang et al. 2023), or edm: EDM's "
                        f"log-normal noise levels and their weight (Karras et al. 2022) {recipe('loss_weight')}")
    p.add_argument("--snr_gamma", type=real(positive=True), default=5.0, help="gamma of --loss_weight min_snr")
    p.add_argument("--immiscible", action=argparse.BooleanOptionalAction, default=None,
                   help=f"pair each image with a nearby noise of its batch (Li et al. 2024) {recipe('immiscible')}")
    p.add_argument("--sample_steps", type=whole(1), default=None,
                   help=f"steps of the grids' sampler (default: {DEFAULT_SAMPLER} {DEFAULT_STEPS}, "
                        f"flow: {flow.DEFAULT_SAMPLER} {flow.DEFAULT_STEPS})")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    return flow.check_args(parse_run_args(parser, argv, RECIPES), parser, argv)


def main(argv: list[str] | None = None) -> None:
    Trainer(parse_args(argv)).fit()


if __name__ == "__main__":
    run_main(main)
