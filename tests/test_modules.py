import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import CPU_PLAIN_ATTENTION_TOKENS, EMA, SelfAttention, UNet, UNet_conditional

# A copy of shared/reference/original_checkpoint_layout.json: the original's parameter names and shapes.
LAYOUT = Path(__file__).parent / "data" / "original_checkpoint_layout.json"


def layout():
    return json.loads(LAYOUT.read_text())


@pytest.mark.parametrize("name, build", [
    ("UNet(c_in=3, c_out=3, time_dim=256)", lambda: UNet()),
    ("UNet_conditional(c_in=3, c_out=3, time_dim=256, num_classes=10)", lambda: UNet_conditional(num_classes=10)),
])
def test_state_dict_matches_original_layout(name, build):
    expected = layout()[name]
    model = build()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    # a checkpoint of the original's layout loads strictly
    model.load_state_dict({k: torch.zeros(s) for k, s in expected.items()}, strict=True)


@pytest.mark.parametrize("size", [8, 16, 24, 40])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_any_size_and_channel_count(size, channels):
    model = UNet(c_in=channels, c_out=channels, width=8)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([1, 500]))
    assert out.shape == x.shape


def test_width_scales_every_layer():
    small, big = UNet(width=8), UNet(width=16)
    assert small.sa5.mha.embed_dim == 8 and big.sa5.mha.embed_dim == 16
    assert small.bot1.double_conv[0].out_channels == 64 and big.bot1.double_conv[0].out_channels == 128
    assert sum(p.numel() for p in big.parameters()) > 3 * sum(p.numel() for p in small.parameters())


def test_device_keyword_is_accepted_and_follows_the_input():
    model = UNet(c_in=1, c_out=1, width=8, device="cuda")  # old notebooks pass device; it must not matter
    assert next(model.parameters()).device.type == "cpu"
    assert model(torch.randn(1, 1, 8, 8), torch.tensor([3])).device.type == "cpu"


def test_the_original_network_cannot_see_the_scale_of_x_t_and_input_skip_can():
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    original, skip = UNet(1, 1, width=8), UNet(1, 1, width=8, input_skip=True)
    # bias-free conv -> GroupNorm(1) divides the scale out: eps(3 x_t) = eps(x_t), whatever the weights
    torch.testing.assert_close(original(3 * x, t), original(x, t), atol=1e-4, rtol=1e-4)
    assert (skip(3 * x, t) - skip(x, t)).abs().max() > 1e-2
    assert set(skip.state_dict()) - set(original.state_dict()) == {"inc_skip.weight", "inc_skip.bias"}


@pytest.mark.parametrize("side, dtype, plain", [(6, torch.bfloat16, True), (6, torch.float32, False),
                                                (12, torch.bfloat16, False)])
def test_attention_equals_multihead_attention(monkeypatch, side, dtype, plain):
    """Plain softmax(QK^T/sqrt(d))V for few tokens in bf16 on a CPU, the fused kernel otherwise; both exact."""
    assert (side * side <= CPU_PLAIN_ATTENTION_TOKENS) == (side == 6)
    fused_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a: fused_calls.append(1) or sdpa(*a))
    torch.manual_seed(0)
    sa = SelfAttention(16)
    x = torch.randn(2, 16, side, side)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = sa(x).float()
    assert len(fused_calls) == (0 if plain else 1)
    tokens = x.flatten(2).transpose(1, 2)
    normed = sa.ln(tokens)
    reference, _ = sa.mha(normed, normed, normed)
    reference = reference + tokens
    reference = sa.ff_self(reference) + reference
    reference = reference.transpose(1, 2).reshape(2, 16, side, side)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, reference, atol=tol, rtol=tol)


def test_time_encoding_closed_form():
    model = UNet(width=8, time_dim=8)
    t = torch.tensor([0, 7, 999])
    enc = model.pos_encoding(t, 8)
    inv_freq = torch.tensor([1.0, 10000 ** (-2 / 8), 10000 ** (-4 / 8), 10000 ** (-6 / 8)])
    angles = t[:, None].float() * inv_freq
    torch.testing.assert_close(enc, torch.cat([angles.sin(), angles.cos()], dim=1))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = UNet_conditional(c_in=1, c_out=1, num_classes=3, width=8)
    x = torch.randn(4, 1, 16, 16)
    model(x, torch.tensor([1, 10, 100, 900]), torch.tensor([0, 1, 2, 0])).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_label_minus_one_is_the_unconditional_branch():
    torch.manual_seed(0)
    model = UNet_conditional(c_in=1, c_out=1, num_classes=3, width=8)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 500])
    unconditional = model(x, t, None)
    mixed = model(x, t, torch.tensor([-1, 2, -1]))
    torch.testing.assert_close(mixed[[0, 2]], unconditional[[0, 2]])
    torch.testing.assert_close(mixed[1], model(x, t, torch.tensor([2, 2, 2]))[1])
    assert not torch.allclose(mixed[1], unconditional[1])


def test_conditional_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        UNet_conditional()


def test_ema_copies_then_follows_the_closed_form():
    torch.manual_seed(0)
    model, beta, start = nn.Linear(3, 2), 0.9, 2
    ema_model, ema = EMA.copy_of(model), EMA(beta, step_start_ema=start)
    history = []
    for _ in range(6):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        history.append(model.weight.detach().clone())
        ema.step_ema(ema_model, model)
    # steps 0 and 1 copy the model; steps 2.. average: e_k = beta e_{k-1} + (1 - beta) w_k
    expected = history[start - 1]
    for w in history[start:]:
        expected = beta * expected + (1 - beta) * w
    torch.testing.assert_close(ema_model.weight, expected)
    assert ema.step == 6 and not ema_model.weight.requires_grad


def test_ema_state_dict_round_trip():
    ema = EMA(0.99, 10)
    ema.step = 17
    other = EMA()
    other.load_state_dict(ema.state_dict())
    assert (other.beta, other.step_start_ema, other.step) == (0.99, 10, 17)


def test_works_under_distributed_data_parallel(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = DDP(UNet_conditional(c_in=1, c_out=1, num_classes=2, width=8))
        out = model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, -1]))
        out.mean().backward()
        assert out.shape == (2, 1, 8, 8)
    finally:
        dist.destroy_process_group()
