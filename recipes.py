"""The defaults that depend on the data: one recipe for each --dataset, and "folder" for --dataset_path.

A recipe fills every flag the command line leaves unset. A folder gets the original's recipe (its network,
objective, optimizer, EMA and guidance). The named datasets get recipes that reach good samples in minutes on a
CPU; each choice and the measurements behind it: docs/data.md#the-digits-recipe, docs/training.md, docs/emoji.md.
"""
import argparse

from modules import ORIGINAL_SHAPE

CFG_SCALE = 3.0  # the original's guidance scale

# The original's objective and network: the plain MSE of the noise. A run saved before these options existed was
# trained with them, so resuming it fills them in.
ORIGINAL_OPTIONS = dict(objective="ddpm", prediction="eps", loss_weight="none", immiscible=False, adam_beta2=0.999,
                        **ORIGINAL_SHAPE)
# Minutes on a CPU: width 32 and batch 64 keep 2 cores busy; a high learning rate early, decayed to zero.
_SMALL = dict(width=32, batch_size=64, lr=2e-3, warmup=200, lr_schedule="cosine", **ORIGINAL_OPTIONS)

# ddpm.py's recipes.
RECIPES = {
    "digits": dict(image_size=16, epochs=60, sample_every=20, **_SMALL),
    "mnist": dict(image_size=16, epochs=5, sample_every=1, **_SMALL),  # about as many steps as the digits
    "fashion_mnist": dict(image_size=16, epochs=5, sample_every=1, **_SMALL),
    # colour icons in few steps: v-prediction with Min-SNR learns shapes where plain eps leaves blobs
    "emoji": {**_SMALL, "image_size": 32, "epochs": 32, "sample_every": 5, "prediction": "v", "loss_weight": "min_snr"},
    # for a GPU: the DDPM paper's CIFAR-10 setting (batch 128, lr 2e-4 after a 5,000-step warm-up)
    "cifar10": dict(image_size=32, width=64, batch_size=128, epochs=300, lr=2e-4, warmup=5000,
                    lr_schedule="constant", sample_every=10, **ORIGINAL_OPTIONS),
    # the original's landscape recipe: 64x64, batch 12, 500 epochs at AdamW 3e-4, a grid every epoch
    "folder": dict(image_size=64, width=64, batch_size=12, epochs=500, lr=3e-4, warmup=0, lr_schedule="constant",
                   sample_every=1, **ORIGINAL_OPTIONS),
}


class Noisiest:
    """A guidance interval: the noisiest `fraction` of the T timesteps (t = 400..999 of 1000 for 0.6). The linear
    betas scale with 1000 / T, so these are the same noise levels at any --noise_steps."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def __call__(self, args: argparse.Namespace) -> list[int]:
        return [round((1 - self.fraction) * args.noise_steps), args.noise_steps - 1]

    def __str__(self) -> str:
        return "{} {} (scaled to --noise_steps)".format(*self(argparse.Namespace(noise_steps=1000)))


class ByObjective:
    """A recipe value that depends on --objective: one for DDPM, one for flow matching (either may be a Noisiest)."""

    def __init__(self, ddpm, flow):
        self.values = {"ddpm": ddpm, "flow": flow}

    def __call__(self, args: argparse.Namespace):
        value = self.values[args.objective]
        return value(args) if callable(value) else value

    def __format__(self, spec: str) -> str:
        return ", ".join(f"{objective}: {format(value, spec) if value is not None else None}"
                         for objective, value in self.values.items())

    def __str__(self) -> str:
        return format(self, "")


# ddpm_conditional.py's recipes: ddpm.py's, plus the EMA and guidance. The original's EMA is 0.995 after 2,000
# steps of copying (--ema_power 0), and its guidance 3 at every step.
CONDITIONAL_ORIGINAL_OPTIONS = {**ORIGINAL_OPTIONS, "ema_power": 0.0, "cfg_scale": CFG_SCALE,
                                "guidance_interval": None}
CONDITIONAL_RECIPES = {name: {**CONDITIONAL_ORIGINAL_OPTIONS, **recipe} for name, recipe in RECIPES.items()}
# The digits and emoji train too few steps for the original's EMA: they use the power EMA, whose width follows the
# run's length. The digits: v-prediction with Min-SNR, guided at high noise only, in the original's network (no
# cheaper shape measured in docs/training.md met the quality bar on both seeds). --objective flow: half the epochs,
# and guidance 3 at the noisiest 30% of t only (flow matching learns the class early; docs/objectives.md).
CONDITIONAL_RECIPES["digits"].update(epochs=ByObjective(40, 20), prediction="v", loss_weight="min_snr", ema_power=6.94,
                                     cfg_scale=ByObjective(3.5, 3.0),
                                     guidance_interval=ByObjective(Noisiest(0.6), Noisiest(0.3)))
# The emoji: a UNet that attends only at 8x8 and 4x4 trains more steps in fewer minutes, and draws more of the
# asked groups. Guidance 2: scales 2 and 1.5 tied for the lowest FD, and 2 drew the asked group more often.
CONDITIONAL_RECIPES["emoji"].update(epochs=80, attention=[4, 8], ema_power=6.94, cfg_scale=2.0)
# The original's conditional script: batch 14, 300 epochs, a grid every 10 epochs.
CONDITIONAL_RECIPES["folder"].update(batch_size=14, epochs=300, sample_every=10)
