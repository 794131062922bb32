"""The exact denoiser: the network output that is exact when the training images are the whole distribution.

`evaluate.py --exact` samples with it to measure what a sampler and guidance alone cost, and the tests use it as a
model without error: any sampler run on it must land on the training images.
"""
import math

import torch
import torch.nn as nn

from flow import Flow


class ExactDenoiser(nn.Module):
    """Both objectives write x_t = a_t x_0 + s_t eps: a = sqrt(alpha_hat_t), s = sqrt(1 - alpha_hat_t) for DDPM, and
    a = 1 - t, s = t for flow matching. When the training images x_i are the whole distribution, E[x_0 | x_t] is
    their mean weighted by N(x_t; a x_i, s^2 I) (only those of class y when a label is given), and the exact
    output follows from it: eps* = (x_t - a E[x_0 | x_t]) / s, v* = a eps* - s x_0 for a v-prediction DDPM, and the
    velocity eps* - x_0 for flow matching. Sampling with it ends on training images (the memorisation check flags
    it), so its FD is the best any model can score at the same setting. Each call compares every image with every
    training image (float64): fine for the digits, slow for a folder of tens of thousands. At s = 0 (a flow's t = 0)
    the posterior is a point and eps* is undefined (NaN): the samplers never ask there, Flow.invert's first step does.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, diffusion, num_classes: int | None = None):
        super().__init__()
        # The training images are its parameters (the samplers read the device off them).
        self.x0 = nn.Parameter(images.flatten(1).double() / 127.5 - 1, requires_grad=False)
        self.register_buffer("x0_sq", self.x0.square().sum(1))
        self.register_buffer("labels", labels)
        self.flow = isinstance(diffusion, Flow)
        self.time_scale = diffusion.noise_steps  # flow matching: the network is given 1000 t
        self.register_buffer("alpha_hat", None if self.flow else diffusion.alpha_hat.double().cpu())
        self.prediction = "velocity" if self.flow else diffusion.prediction  # what the sampler expects
        if num_classes is not None:
            self.num_classes = num_classes  # read by the conditional sampler

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.flow:
            s = (t.double() / self.time_scale)[:, None]
            a = 1 - s
        else:
            a, s = self.alpha_hat[t][:, None].sqrt(), (1 - self.alpha_hat[t][:, None]).sqrt()
        x_t = x.flatten(1).double()
        # log N(x_t; a x_i, s^2 I) up to terms that do not depend on i
        logits = (a * x_t @ self.x0.T - 0.5 * a ** 2 * self.x0_sq) / s ** 2
        if y is not None and self.labels is not None:  # label -1 (or an exact denoiser without labels): every image
            logits = logits.masked_fill((y[:, None] >= 0) & (self.labels[None] != y[:, None]), -math.inf)
        x0 = torch.softmax(logits, dim=1) @ self.x0
        eps = (x_t - a * x0) / s
        if self.prediction == "v":
            out = a * eps - s * x0
        else:
            out = eps - x0 if self.prediction == "velocity" else eps
        return out.to(x.dtype).view_as(x)
