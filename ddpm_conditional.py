"""Class-conditional DDPM with classifier-free guidance (Ho & Salimans 2022) and an EMA of the weights.

ddpm.py plus labels, guidance and the EMA: it imports ddpm.py and extends it.

    Guided.network_output      classifier-free guidance: out_uncond + s (out_cond - out_uncond), one forward pass
    Trainer.predict            label dropout: each label is dropped with probability --label_drop
    Trainer.after_step         the EMA of the weights (modules.EMA)

    python ddpm_conditional.py                      # the embedded digits, no download
    python ddpm_conditional.py --dataset_path ~/data/cifar10-64/train --num_classes 10 --image_size 64
"""
import argparse
import math
import numbers

import torch
import torch.nn as nn

import ddpm
import flow
from modules import EMA, UNet_conditional
from recipes import CFG_SCALE, CONDITIONAL_RECIPES
from files import UserError
from runs import parse_run_args, real, run_main, whole


GRID_ROWS = 10  # the sample grids' classes at most: the original's 10


class Guided:
    """Labels and classifier-free guidance, for either objective: `Diffusion` (DDPM) and `Flow` (flow matching)."""

    def network_output(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                       cfg_scale: float = 3, guidance_interval: tuple[int, int] | None = None) -> torch.Tensor:
        """out = lerp(out_uncond, out_cond, cfg_scale) = out_uncond + cfg_scale * (out_cond - out_uncond).

        The network's output (eps, v or the flow's velocity) is affine in eps at a given x_t and t, so guiding it
        guides eps. cfg_scale is the guidance paper's w + 1: 1 is plain conditional sampling, and a scale <= 0
        is treated as 1 (as the original does). Both halves come from ONE forward pass on a batch of 2n.
        guidance_interval=(lo, hi) guides only at timesteps lo <= t <= hi and predicts plainly
        conditionally elsewhere (Kynkaanniemi et al. 2024); None guides at every step, as the original.
        """
        if cfg_scale <= 0 or cfg_scale == 1:
            return model(x, t, labels)
        inside = None
        if guidance_interval is not None:  # a Flow's first time, 1000 t = 1000, counts as T - 1: its noisiest
            time = t.clamp(max=self.noise_steps - 1)
            inside = (time >= guidance_interval[0]) & (time <= guidance_interval[1])
            if not inside.any():  # nothing to guide at this step: one pass of n
                return model(x, t, labels)
        no_label = torch.full_like(labels, -1)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, no_label])).chunk(2)
        guided = torch.lerp(uncond.float(), cond.float(), cfg_scale)
        return guided if inside is None else torch.where(inside[:, None, None, None], guided, cond.float())

    def condition(self, model: nn.Module, n: int, labels=None, cfg_scale: float = 3,
                  guidance_interval: tuple[int, int] | None = None) -> dict:
        """network_output's labels and guidance for n images, checked: `labels` as in sample."""
        check_guidance_interval(guidance_interval, self.noise_steps)
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real) or not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
        labels = class_labels(labels, n, model).to(next(model.parameters()).device)
        return dict(labels=labels, cfg_scale=cfg_scale, guidance_interval=guidance_interval)

    def sample(self, model: nn.Module, n: int, labels, cfg_scale: float = 3,
               guidance_interval: tuple[int, int] | None = None, **kwargs) -> torch.Tensor:
        """n images of the classes `labels`: n class indices (a list, array or tensor; -1 samples the unconditional
        model that label dropout trained), or one index for all n; class names too, for a model from sample.load.
        See ddpm.Diffusion.sample (or flow.Flow.sample) for the sampler options."""
        return super().sample(model, n, labels=labels, cfg_scale=cfg_scale, guidance_interval=guidance_interval,
                              **kwargs)


class Diffusion(Guided, ddpm.Diffusion):
    """The DDPM whose noise prediction takes labels and classifier-free guidance."""

    def predict_noise(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                      cfg_scale: float = 3, guidance_interval: tuple[int, int] | None = None) -> torch.Tensor:
        """eps_theta(x_t, t, labels), guided (network_output)."""
        return self.eps_from_output(self.network_output(model, x, t, labels, cfg_scale, guidance_interval), x, t)


class Flow(Guided, flow.Flow):
    """Flow matching whose velocity takes labels and classifier-free guidance; the interval is in 1000 t."""


def class_labels(labels, n: int, model: nn.Module) -> torch.Tensor:
    """`labels` as n class indices of `model` (see Diffusion.sample); ValueError for anything else."""
    num_classes = getattr(getattr(model, "module", model), "num_classes", None)
    if num_classes is None:
        raise ValueError("this model takes no labels: sample it with ddpm.Diffusion")
    if labels is None:
        raise ValueError("a conditional model draws the classes it is given: pass labels, n class indices (or -1 "
                         "for the unconditional model)")
    names = getattr(model, "class_names", None) or []
    items = [labels] if isinstance(labels, str) else labels
    if isinstance(items, (list, tuple)) and any(isinstance(label, str) for label in items):
        unknown = [label for label in items if isinstance(label, str) and label not in names]
        if unknown:
            raise ValueError(f"labels {unknown}: not class names of this model "
                             f"({', '.join(names) if names else 'it has none: give class indices'})")
        labels = [names.index(label) if isinstance(label, str) else label for label in items]
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"labels must be class indices, got {labels!r}") from None
    if labels.dtype == torch.bool or labels.is_complex() or (labels.is_floating_point() and
                                                              not torch.equal(labels, labels.round())):
        raise ValueError(f"labels must be whole class indices, got {labels.tolist()}")
    labels = labels.long()
    if labels.dim() == 0:
        labels = labels.expand(n)
    if labels.dim() != 1:
        raise ValueError(f"labels must be one class per image (1-D), got shape {tuple(labels.shape)}")
    if labels.numel() != n:
        raise ValueError(f"got {labels.numel()} labels for n={n} images: give one label per image")
    if labels.numel() and (labels.min() < -1 or labels.max() >= num_classes):
        raise ValueError(f"labels must be classes 0..{num_classes - 1}, or -1 for none (the unconditional "
                         f"model), got {labels.tolist()}")
    return labels


class Trainer(ddpm.Trainer):
    """The unconditional training loop plus per-sample label dropout and an EMA model."""

    diffusion_class, flow_class = Diffusion, Flow

    def __init__(self, args: argparse.Namespace, loader=None):
        super().__init__(args, loader)
        self.ema = EMA(args.ema_beta, args.ema_start, args.ema_power or None)
        self.ema_model = EMA.copy_of(self.model)
        if self.run.is_main and args.sample_every and args.num_classes > GRID_ROWS:
            shown = self.grid_classes().tolist()
            print(f"sample grids: {GRID_ROWS} of the {args.num_classes} classes, a row each: "
                  f"{', '.join(args.class_names[k] for k in shown)}")

    def build_model(self) -> nn.Module:
        a = self.args
        if a.num_classes is None:
            a.num_classes = a.num_classes_found
        elif a.num_classes != a.num_classes_found:
            raise UserError(f"--num_classes {a.num_classes} does not match the {a.num_classes_found} classes "
                            f"found in the data ({', '.join(a.class_names[:12])}): drop the flag or fix the folder")
        return UNet_conditional(c_in=a.c_in, c_out=a.c_in, num_classes=a.num_classes, width=a.width,
                                input_skip=a.input_skip, channel_mult=a.channel_mult, attention=a.attention,
                                heads=a.heads)

    def sampling(self) -> dict:
        return {**super().sampling(), "cfg_scale": self.args.cfg_scale, "guidance_interval": self.args.guidance_interval}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Drop each sample's label with probability label_drop: the model also learns the unconditional prediction.
        drop = torch.rand(labels.shape, device=labels.device) < self.args.label_drop
        return self.net(x_t, t, labels.masked_fill(drop, -1))

    def after_step(self) -> None:
        self.ema.step_ema(self.ema_model, self.model)

    def sample_grids(self) -> dict[str, torch.Tensor]:
        """One row per class, `n_samples` columns, from the model and from the EMA model."""
        a = self.args
        labels = self.grid_classes().to(self.device).repeat_interleave(a.n_samples)
        with self.run.autocast():
            return {suffix: self.diffusion.sample(model, len(labels), labels, **self.sampling())
                    for suffix, model in (("", self.model), ("_ema", self.ema_model))}

    def grid_classes(self) -> torch.Tensor:
        """The grids' classes, a row each: every class, or GRID_ROWS of them spread evenly over many (a grid of
        every class of a large dataset would cost more than the training)."""
        k = self.args.num_classes
        return torch.arange(k) if k <= GRID_ROWS else torch.linspace(0, k - 1, GRID_ROWS).round().long()

    def checkpoint(self) -> tuple[dict, dict]:
        files, state = super().checkpoint()
        files["ema_ckpt.pt"] = self.ema_model.state_dict()
        return files, {**state, "ema_model": self.ema_model.state_dict(), "ema": self.ema.state_dict()}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.ema_model.load_state_dict(state["ema_model"])
        self.ema.step = state["ema"]["step"]  # beta, start and power come from the flags given now


# --------------------------------------------------------------------------- the command line

def add_guidance_args(p: argparse.ArgumentParser, recipes: dict | None = None) -> None:
    """--cfg_scale and --guidance_interval, as every script that samples a conditional model takes them. Their
    defaults: the training recipes' (`recipes`), else (a script that samples a trained run) the run's recommended
    settings."""
    if recipes is None:
        scale, interval = f"the run's, else {CFG_SCALE:g}", "the run's, else every step"
    else:
        scale = ", ".join(f"{k} {r['cfg_scale']:g}" for k, r in recipes.items())
        interval = ", ".join(f"{k} {r['guidance_interval']}" for k, r in recipes.items()
                             if r["guidance_interval"]) + ", others every step"
    p.add_argument("--cfg_scale", type=real(), default=None,
                   help=f"classifier-free guidance scale: 1 = none, <= 0 treated as 1 (default: {scale})")
    p.add_argument("--guidance_interval", type=whole(0), nargs=2, default=None, metavar=("LO", "HI"),
                   help=f"guide only at timesteps LO..HI (flow matching: at 1000 t), plain conditional elsewhere; "
                        f"0 999 (0 to T - 1) guides every step (default: {interval})")


def check_guidance_interval(interval: tuple[int, int] | None, noise_steps: int) -> None:
    """ValueError unless interval is None or timesteps (lo, hi) with 0 <= lo <= hi < noise_steps."""
    if interval is not None and not 0 <= interval[0] <= interval[1] < noise_steps:
        raise ValueError(f"guidance_interval must be timesteps LO HI with 0 <= LO <= HI < {noise_steps}, "
                         f"got {' '.join(map(str, interval))}")


def build_parser() -> argparse.ArgumentParser:
    p = ddpm.build_parser("Train a class-conditional DDPM with classifier-free guidance.", "DDPM_conditional",
                          CONDITIONAL_RECIPES)
    p.set_defaults(n_samples=8)
    p.add_argument("--num_classes", type=whole(1), default=None, help="number of classes (default: from the data)")
    add_guidance_args(p, CONDITIONAL_RECIPES)  # of the sample grids, and recommended in run.json
    p.add_argument("--label_drop", type=real(0), default=0.1, help="probability that a sample's label is dropped")
    p.add_argument("--ema_beta", type=real(0), default=0.995, help="EMA decay per step")
    p.add_argument("--ema_start", type=whole(0), default=2000, help="steps during which the EMA only copies the model")
    p.add_argument("--ema_power", type=real(0), default=None, metavar="GAMMA",
                   help="instead of --ema_beta and --ema_start, the power-function EMA (Karras et al. 2024): decay "
                        "(1 - 1/t)^(GAMMA + 1) at step t, an average whose width is a fixed fraction of the run at "
                        "any length; 6.94: a tenth (sigma_rel 0.10); 0 = off "
                        "(default: " + ", ".join(f"{k} {r['ema_power']:g}" for k, r in CONDITIONAL_RECIPES.items()) + ")")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = flow.check_args(parse_run_args(parser, argv, CONDITIONAL_RECIPES), parser, argv)
    if not 0 <= args.label_drop < 1:
        raise UserError(f"--label_drop must be in [0, 1), got {args.label_drop}")
    if args.ema_power < 0:
        raise UserError(f"--ema_power must be positive (or 0 for the constant --ema_beta), got {args.ema_power:g}")
    if not 0 <= args.ema_beta < 1:
        raise UserError(f"--ema_beta must be in [0, 1), got {args.ema_beta}")
    try:
        check_guidance_interval(args.guidance_interval, args.noise_steps)
    except ValueError as e:
        raise UserError(f"--{e}")
    return args


def main(argv: list[str] | None = None) -> None:
    Trainer(parse_args(argv)).fit()


if __name__ == "__main__":
    run_main(main)
