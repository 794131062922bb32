"""Denoising diffusion probabilistic models (Ho et al. 2020): unconditional training and sampling.

    python ddpm.py                                  # the embedded digits, no download
    python ddpm.py --dataset_path ~/data/landscapes --image_size 64 --width 64 --batch_size 12
"""
import argparse
import math
import signal
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from modules import UNet
from utils import (PRECISION_HELP, UserError, autocast_dtype, barrier, get_data, init_distributed, load_checkpoint,
                   make_grid, pick_device, run_main, save_checkpoint, save_images, save_json, seed_everything,
                   setup_logging, stop_workers)


class Diffusion:
    """The noise schedule, the forward process q(x_t | x_0) and the reverse-process samplers.

    Timestep indices run 0..T-1 and, as in the original, training and sampling use 1..T-1:
    the chain ends at index 0, where alpha_hat is 1 - beta_start (almost clean).
    """

    def __init__(self, noise_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 img_size: int = 256, device=None, c_in: int = 3, schedule: str = "linear"):
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got '{schedule}'")
        self.noise_steps = noise_steps
        self.beta_start, self.beta_end, self.schedule = beta_start, beta_end, schedule
        self.img_size, self.c_in = img_size, c_in
        self.device = torch.device(device or "cpu")

        self.beta = self.prepare_noise_schedule().to(self.device)
        self.alpha = 1.0 - self.beta
        self.alpha_hat = torch.cumprod(self.alpha, dim=0)

    def prepare_noise_schedule(self) -> torch.Tensor:
        """beta_t: linear from beta_start to beta_end (Ho et al. 2020, section 4), or cosine.

        The cosine schedule (Nichol & Dhariwal 2021, eq. 17) sets alpha_hat_t = f(t) / f(0) with
        f(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008, and beta_t = 1 - alpha_hat_t / alpha_hat_{t-1},
        clipped at 0.999.
        """
        if self.schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, self.noise_steps)
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

    def predict_noise(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t); the conditional Diffusion adds labels and guidance here."""
        return model(x, t)

    def timesteps(self, steps: int | None = None) -> torch.Tensor:
        """The timesteps a sampler visits, descending: all of T-1..1, or `steps` of them evenly spaced."""
        if steps is None:
            return torch.arange(self.noise_steps - 1, 0, -1)
        if not 1 <= steps <= self.noise_steps - 1:
            raise ValueError(f"steps must be in [1, {self.noise_steps - 1}], got {steps}")
        return torch.linspace(1, self.noise_steps - 1, steps).round().long().unique().flip(0)

    def respaced_betas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """beta'_k = 1 - alpha_hat[s_k] / alpha_hat[s_{k-1}] for ascending kept steps s_k (alpha_hat[s_{-1}] = 1).

        The chain over the kept steps has the same alpha_hat there as the full chain; with every
        step kept these are the original betas.
        """
        alpha_hat = self.alpha_hat[timesteps.to(self.alpha_hat.device)]
        previous = torch.cat([alpha_hat.new_ones(1), alpha_hat[:-1]])
        return 1 - alpha_hat / previous

    @torch.inference_mode()
    def sample(self, model: nn.Module, n: int, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
               noise: torch.Tensor | None = None, progress: bool = True, callback=None, **cond) -> torch.Tensor:
        """Draw n images; uint8 in [0, 255], shape (n, C, H, W).

        sampler "ddpm": ancestral sampling (Algorithm 2) over every step, as the original, or over
        `steps` evenly spaced ones. sampler "ddim": Song et al. 2021 over `steps` (default 50)
        steps, deterministic at eta=0. Both chains end at timestep 0. `noise` is x_T (default
        N(0, I)); `callback(t, x_t)` sees every intermediate x_t (for trajectories).
        """
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got '{sampler}'")
        if sampler == "ddim" and steps is None:
            steps = 50
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        self._to(device)
        # Visit the kept steps s_K > ... > s_1 and end at 0: alpha_hat[0] = 1 - beta_start, almost clean.
        kept = self.timesteps(steps)
        if steps is None:
            beta = self.beta[kept.to(device)]  # exactly the original's chain
        else:
            beta = self.respaced_betas(torch.cat([torch.zeros(1, dtype=torch.long), kept.flip(0)]))[1:].flip(0)
        previous = torch.cat([kept[1:], torch.zeros(1, dtype=torch.long)])
        clip = self.clipped_steps(kept)
        x = torch.randn((n, self.c_in, self.img_size, self.img_size), device=device) if noise is None else noise.to(device)
        for k in tqdm(range(len(kept)), desc=f"sampling ({sampler})", leave=False, disable=not progress):
            i, j = kept[k].item(), previous[k].item()
            t = torch.full((n,), i, dtype=torch.long, device=device)
            eps = self.predict_noise(model, x, t, **cond).float()
            if clip[k]:  # x0 clipped to the data range, eps re-derived from it
                x0 = self.predict_x0(x, eps, i).clamp(-1, 1)
                eps = (x - self.alpha_hat[i].sqrt() * x0) / (1 - self.alpha_hat[i]).sqrt()
            last = j == 0
            if sampler == "ddpm":
                x = self.ddpm_step(x, eps, i, beta[k], last)
            else:
                x = self.ddim_step(x, eps, i, j, eta, last)
            if callback is not None:
                callback(j, x)
        model.train(was_training)
        x = (x.clamp(-1, 1) + 1) / 2
        return (x * 255).type(torch.uint8)

    def clipped_steps(self, kept: torch.Tensor) -> list[bool]:
        """For each step s_k -> s_{k-1} of a chain: does it clip the x0 prediction to [-1, 1] (and re-derive eps)?

        Those that would multiply its error more than 10-fold, sqrt(alpha_hat[s_{k-1}] / alpha_hat[s_k]) > 10.
        Only the first step of a cosine-schedule chain is such a step: alpha_hat at T-1 is about 1e-9
        there, and unclipped it multiplies the model's error 632-fold in DDIM-50. Clipping every step
        (as Nichol & Dhariwal do) costs FD on the linear schedule, whose chains of 10 or more steps
        never qualify.
        """
        alpha_hat = self.alpha_hat[torch.cat([kept, kept.new_zeros(1)]).to(self.alpha_hat.device)]
        return ((alpha_hat[1:] / alpha_hat[:-1]).sqrt() > 10).tolist()

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, i: int) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - alpha_hat_t) eps) / sqrt(alpha_hat_t): eq. 4 solved for x_0."""
        return (x - (1 - self.alpha_hat[i]).sqrt() * eps) / self.alpha_hat[i].sqrt()

    def ddpm_step(self, x: torch.Tensor, eps: torch.Tensor, i: int, beta: torch.Tensor, last: bool) -> torch.Tensor:
        """x_{t-1} = 1/sqrt(alpha_t) (x_t - (1 - alpha_t)/sqrt(1 - alpha_hat_t) eps) + sqrt(beta_t) z   (Algorithm 2)."""
        alpha, alpha_hat = 1 - beta, self.alpha_hat[i]
        z = torch.zeros_like(x) if last else torch.randn_like(x)
        return 1 / alpha.sqrt() * (x - (1 - alpha) / (1 - alpha_hat).sqrt() * eps) + beta.sqrt() * z

    def ddim_step(self, x: torch.Tensor, eps: torch.Tensor, i: int, j: int, eta: float, last: bool) -> torch.Tensor:
        """x_s = sqrt(alpha_hat_s) x0_pred + sqrt(1 - alpha_hat_s - sigma^2) eps + sigma z   (DDIM, eq. 12)."""
        alpha_hat, alpha_hat_prev = self.alpha_hat[i], self.alpha_hat[j]
        x0 = self.predict_x0(x, eps, i)
        sigma = eta * ((1 - alpha_hat_prev) / (1 - alpha_hat) * (1 - alpha_hat / alpha_hat_prev)).sqrt()
        x = alpha_hat_prev.sqrt() * x0 + (1 - alpha_hat_prev - sigma ** 2).sqrt() * eps
        if eta > 0 and not last:
            x = x + sigma * torch.randn_like(x)
        return x


# --------------------------------------------------------------------------- training

class Trainer:
    """The training loop of Algorithm 1; ddpm_conditional.py extends it with labels and EMA."""

    diffusion_class = Diffusion

    def __init__(self, args: argparse.Namespace, loader: DataLoader | None = None):
        self.args = args
        self.rank, self.world_size, self.device = init_distributed(pick_device(args.device))
        self.is_main = self.rank == 0  # only rank 0 writes files, grids and TensorBoard
        args.device = str(self.device)
        seed_everything(args.seed + self.rank)  # each rank draws its own noise; DDP syncs the initial weights
        if self.is_main:
            setup_logging(args.run_name)
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
        self.epoch, self.batch = 0, 0      # where the next step starts
        self.logger = None                 # TensorBoard, opened by fit() on rank 0
        self.first_bad_step = torch.full((), -1, device=self.device)
        self.stop_signal = None
        self.folder = Path("models") / args.run_name
        if self.is_main and not args.resume:
            save_json(self.run_config(), self.folder / "run.json")

    def run_config(self) -> dict:
        """Everything needed to rebuild the model and the Diffusion from the run folder."""
        a = self.args
        return {
            "model": type(self.model).__name__,
            "model_args": dict(c_in=a.c_in, c_out=a.c_in, time_dim=self.model.time_dim, width=a.width,
                              input_skip=a.input_skip),
            "diffusion_args": dict(noise_steps=a.noise_steps, beta_start=self.diffusion.beta_start,
                                   beta_end=self.diffusion.beta_end, img_size=a.image_size, c_in=a.c_in,
                                   schedule=a.schedule),
            "class_names": a.class_names,
            "dataset_path": a.dataset_path,
            "command": a.command,
            "args": {k: v for k, v in vars(a).items() if k != "class_names"},
        }

    def build_model(self) -> nn.Module:
        a = self.args
        return UNet(c_in=a.c_in, c_out=a.c_in, width=a.width, input_skip=a.input_skip)

    def build_diffusion(self) -> Diffusion:
        a = self.args
        return self.diffusion_class(noise_steps=a.noise_steps, img_size=a.image_size, device=self.device, c_in=a.c_in,
                                    schedule=a.schedule)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """|| eps - eps_theta(x_t, t) ||^2 at a random t."""
        t = self.diffusion.sample_timesteps(images.shape[0])
        x_t, eps = self.diffusion.noise_images(images, t)
        with self.autocast():
            predicted = self.predict(x_t, t, labels)
        return F.mse_loss(predicted.float(), eps)

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
            return {"": self.diffusion.sample(self.model, self.args.n_samples, **self.grid_sampler())}

    def grid_sampler(self) -> dict:
        """In-training grids use DDIM over `sample_steps` steps: seconds, not minutes. The original
        network (--no-input_skip) cannot keep a deterministic trajectory in range: it gets the
        ancestral chain respaced to as many steps."""
        sampler = "ddim" if self.args.input_skip else "ddpm"
        return dict(sampler=sampler, steps=min(self.args.sample_steps, self.args.noise_steps - 1))

    def state_dicts(self) -> dict[str, dict]:
        """The original's files: plain state_dicts."""
        return {"ckpt.pt": self.model.state_dict(), "optim.pt": self.optimizer.state_dict()}

    def resume_state(self) -> dict:
        """Everything --resume needs, in one file so that it is always consistent with itself."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "step": self.step, "epoch": self.epoch, "batch": self.batch, "rng": torch.get_rng_state(),
                 "args": {k: v for k, v in vars(self.args).items() if k not in ("class_names", "command", "device")}}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_resume_state(self, state: dict) -> None:
        a = self.args
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without loss scaling (bf16, fp32): an fp16 resume starts afresh
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        # the optimisation flags given now win over the saved ones
        self.scheduler.base_lrs = [a.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["lr"] = a.lr * lr_factor(self.step, a, self.total_steps)
            group["weight_decay"] = a.weight_decay
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if self.world_size > 1:  # rank 0's saved state, made distinct per rank
            torch.manual_seed(a.seed + self.rank + 1000003 * self.step)

    def check_finite(self) -> None:
        """Stop on a non-finite loss (collective under torchrun: every rank stops together)."""
        bad = self.first_bad_step.clone()
        if self.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        bad = int(bad)
        if bad >= 0:
            raise UserError(f"the loss became non-finite at step {bad}: lower --lr or check the data; the last good "
                            f"checkpoint in {self.folder} is kept (--resume continues from it)")

    def save(self) -> None:
        """Write the checkpoints of the current position, each atomically; resume.pt last."""
        self.check_finite()
        if self.is_main:
            self.logger.flush()  # every logged step up to this checkpoint is on disk before it
            for name, state in self.state_dicts().items():
                save_checkpoint(state, self.folder / name)
            save_checkpoint(self.resume_state(), self.folder / "resume.pt")
        barrier()

    def log_samples(self, epoch: int) -> None:
        for suffix, images in self.sample_grids().items():
            nrow = self.grid_nrow(images)
            save_images(images, f"results/{self.args.run_name}/{epoch}{suffix}.jpg", nrow=nrow)
            self.logger.add_image(f"samples{suffix}", make_grid(images, nrow), epoch)

    def grid_nrow(self, images: torch.Tensor) -> int:
        return max(1, round(math.sqrt(images.shape[0])))

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
        previous_handlers = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for epoch in range(self.epoch, a.epochs):
                self.train_epoch(epoch)
                self.epoch, self.batch = epoch + 1, 0
                if self.is_main and a.sample_every and ((epoch + 1) % a.sample_every == 0 or epoch == a.epochs - 1):
                    self.log_samples(epoch)
                self.save()
        finally:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
            if self.is_main:
                self.logger.close()
            stop_workers(self.loader)

    def train_epoch(self, epoch: int) -> None:
        a, steps = self.args, len(self.loader)
        if isinstance(self.loader.sampler, DistributedSampler):
            self.loader.sampler.set_epoch(epoch)  # the shuffle is a function of (seed, epoch) alone
        rng = torch.get_rng_state()
        batches = iter(self.loader)
        if self.batch:  # resuming mid-epoch: skip the batches already trained on, and undo the loader's
            for _ in range(self.batch):  # random draws, which the interrupted run made before its checkpoint
                next(batches)
            torch.set_rng_state(rng)
        pbar = tqdm(batches, desc=f"epoch {epoch}", initial=self.batch, total=steps, dynamic_ncols=True,
                    disable=not self.is_main)
        running, count = torch.zeros((), device=self.device), 0
        for i, (images, labels) in enumerate(pbar, start=self.batch):
            running += self.train_step(images.to(self.device, non_blocking=True),
                                       labels.to(self.device, non_blocking=True))
            count += 1
            self.batch = i + 1
            log = count == a.log_every or i == steps - 1 or (self.stop_signal is not None and self.world_size == 1)
            if log:
                mse = running.item() / count  # the only host sync, once per log_every steps
                self.check_finite()
                pbar.set_postfix(MSE=f"{mse:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.is_main:  # rank 0's loss stands for all
                    self.logger.add_scalar("MSE", mse, global_step=epoch * steps + i)
                running, count = torch.zeros((), device=self.device), 0
            if a.save_every and self.step % a.save_every == 0 and i < steps - 1:
                self.save()
            if log and self.stop_requested():
                self.save()
                signum = self.stop_signal or signal.SIGTERM
                if self.is_main:
                    print(f"\n{signal.Signals(signum).name}: stopped at epoch {epoch}, step {self.step}; checkpoint "
                          f"saved in {self.folder}. Resume with: {resume_command(a)}", file=sys.stderr)
                sys.exit(128 + signum)

    def stop_requested(self) -> bool:
        """Whether any process got Ctrl-C / SIGTERM (all processes agree, at the same step)."""
        stop = torch.tensor(float(self.stop_signal is not None), device=self.device)
        if self.world_size > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        return bool(stop)

    def request_stop(self, signum, frame) -> None:
        """First Ctrl-C / SIGTERM: finish the step, save, exit. Second: exit at once (checkpoints stay intact)."""
        if self.stop_signal is not None:
            raise KeyboardInterrupt
        self.stop_signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step and saving (again to quit at once)",
              file=sys.stderr)


def resume_command(args: argparse.Namespace) -> str:
    script = "ddpm_conditional.py" if hasattr(args, "num_classes") else "ddpm.py"
    return f"python {script} --resume --run_name {args.run_name}"


def lr_factor(step: int, args: argparse.Namespace, total_steps: int) -> float:
    """Linear warm-up over `args.warmup` steps, then constant or cosine decay to zero."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    if args.lr_schedule == "cosine":
        progress = (step - args.warmup) / max(1, total_steps - args.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


# --------------------------------------------------------------------------- command line

# Defaults that depend on the data. The embedded digits get a recipe that shows digits after
# about 23 minutes on 2 CPU cores; a folder of images gets the original's landscape recipe.
RECIPES = {
    "digits": dict(image_size=16, width=32, batch_size=64, epochs=60, lr=2e-3, warmup=200, lr_schedule="cosine",
                   sample_every=20),
    "folder": dict(image_size=64, width=64, batch_size=12, epochs=500, lr=3e-4, warmup=0, lr_schedule="constant",
                   sample_every=1),
}


def build_parser(description: str = "Train an unconditional DDPM.", run_name: str = "DDPM_Unconditional",
                 recipes: dict = RECIPES) -> argparse.ArgumentParser:
    def recipe(key):
        return f"(default: {recipes['digits'][key]} for the embedded digits, {recipes['folder'][key]} for a folder)"

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run_name", default=run_name, help="names the folders under models/, results/ and runs/")
    p.add_argument("--dataset_path", default=None,
                   help="a folder of images: one sub-folder per class, or a flat folder; "
                        "default: the 4,500 embedded MNIST training digits (no download)")
    p.add_argument("--image_size", type=int, default=None, help=f"side of the square images, divisible by 8 {recipe('image_size')}")
    p.add_argument("--c_in", type=int, default=None, help="image channels: 1, 3 or 4 (default: from the data)")
    p.add_argument("--width", type=int, default=None, help=f"base channel width of the UNet {recipe('width')}")
    p.add_argument("--input_skip", action=argparse.BooleanOptionalAction, default=True,
                   help="1x1 conv from x_t past the first GroupNorm, so the UNet sees the scale of x_t (DDIM needs "
                        "it); --no-input_skip trains the original's exact network")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the data {recipe('epochs')}")
    p.add_argument("--batch_size", type=int, default=None, help=f"images per step {recipe('batch_size')}")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW peak learning rate {recipe('lr')}")
    p.add_argument("--warmup", type=int, default=None, help=f"linear learning-rate warm-up steps {recipe('warmup')}")
    p.add_argument("--lr_schedule", choices=["constant", "cosine"], default=None,
                   help=f"after warm-up {recipe('lr_schedule')}")
    p.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--noise_steps", type=int, default=1000, help="diffusion steps T")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear",
                   help="noise schedule: linear (the original's) or cosine (Nichol & Dhariwal 2021)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help=PRECISION_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (smoke runs)")
    p.add_argument("--sample_every", type=int, default=None,
                   help=f"epochs between sample grids, 0 = never; the last epoch always gets one {recipe('sample_every')}")
    p.add_argument("--n_samples", type=int, default=16, help="images in each sample grid (conditional: per class)")
    p.add_argument("--sample_steps", type=int, default=50, help="DDIM steps of the in-training grids")
    p.add_argument("--log_every", type=int, default=10, help="steps between loss logs (each one syncs the device)")
    p.add_argument("--num_workers", type=int, default=None, help="data-loading processes for a folder (default: min(4, cores))")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on GPUs)")
    p.add_argument("--resume", action="store_true", help="continue models/<run_name> where its last checkpoint left it")
    p.add_argument("--save_every", type=int, default=0, help="also checkpoint every N steps (0 = at epoch ends only)")
    p.add_argument("--skip_bad_images", action="store_true", help="skip unreadable images instead of stopping")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None, recipes: dict = RECIPES
               ) -> argparse.Namespace:
    """Parse, fill the data-dependent defaults, and check the values."""
    args = parser.parse_args(argv)
    if args.resume:
        args = resumed_args(parser, argv, args)
    for key, value in recipes["digits" if args.dataset_path is None else "folder"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.image_size < 8 or args.image_size % 8:
        raise UserError(f"--image_size {args.image_size} must be a positive multiple of 8 (the UNet halves it 3 times)")
    for name in ("batch_size", "epochs", "width", "noise_steps", "sample_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.width % 4:
        raise UserError(f"--width {args.width} must be a multiple of 4 (4 attention heads)")
    if args.noise_steps < 2:
        raise UserError("--noise_steps must be at least 2")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.c_in is not None and args.c_in not in (1, 3, 4):
        raise UserError(f"--c_in {args.c_in} is not supported: use 1 (grayscale), 3 (RGB) or 4 (RGBA)")
    args.command = " ".join(sys.argv) if argv is None else " ".join(["ddpm.py", *argv])
    return args


# What a resumed run may not change: the model and the data (and so the meaning of a step).
LOCKED = ("dataset_path", "image_size", "c_in", "width", "input_skip", "noise_steps", "schedule", "num_classes", "limit",
          "batch_size", "label_drop")


def resumed_args(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace
                 ) -> argparse.Namespace:
    """The saved run's arguments, overridden by the flags given now; changing a LOCKED one is an error."""
    path = Path("models") / args.run_name / "resume.pt"
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} does not exist (check --run_name, or drop --resume)")
    saved = load_checkpoint(path)["args"]
    # argparse only fills defaults for attributes the namespace lacks: flags given now win, the rest is the run's
    merged = parser.parse_args(argv, namespace=argparse.Namespace(**saved))
    changed = [f"--{k} {getattr(merged, k)} (the run has {saved[k]})" for k in LOCKED
               if k in saved and getattr(merged, k) != saved[k]]
    if changed:
        raise UserError(f"a resumed run keeps its model and data: {', '.join(changed)}; "
                        f"start a new --run_name to change them")
    merged.resume = True
    return merged


def train(args: argparse.Namespace) -> None:
    Trainer(args).fit()


def main(argv: list[str] | None = None) -> None:
    train(parse_args(build_parser(), argv))


if __name__ == "__main__":
    run_main(main)
