import json

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ddpm_conditional
from conftest import write_images
from ddpm import SAMPLERS
from ddpm_conditional import Diffusion
from modules import UNet_conditional
from files import UserError

TINY = ["--width", "8", "--image_size", "16", "--precision", "fp32", "--noise_steps", "100", "--sample_steps", "4"]


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.batch_sizes = model, []
        self.num_classes = model.num_classes

    def forward(self, x, t, y=None):
        self.batch_sizes.append(x.shape[0])
        return self.model(x, t, y)


def tiny_model(num_classes=3):
    torch.manual_seed(0)
    model = UNet_conditional(c_in=1, c_out=1, num_classes=num_classes, width=8)
    with torch.no_grad():  # a random label embedding big enough that guidance visibly matters
        model.label_emb.weight.normal_(0, 3)
    return model


def test_guidance_is_the_lerp_of_two_separate_passes():
    model, d = tiny_model(), Diffusion(noise_steps=100, img_size=8, c_in=1)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([10, 40, 70, 99]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, None)
        for scale in (3.0, 0.5, 7.0):
            torch.testing.assert_close(d.predict_noise(model, x, t, y, scale), uncond + scale * (cond - uncond),
                                       atol=1e-5, rtol=1e-5)
        for scale in (0, 1):  # no guidance: the plain conditional prediction
            torch.testing.assert_close(d.predict_noise(model, x, t, y, scale), cond)


def test_guided_sampling_equals_two_pass_reference(device):
    model, d = tiny_model().to(device), Diffusion(noise_steps=100, img_size=8, c_in=1)
    y, x_T = torch.tensor([2, 0], device=device), torch.randn(2, 1, 8, 8, device=device)
    got = d.sample(model, 2, y, cfg_scale=3, sampler="ddim", steps=5, noise=x_T, progress=False)
    x = x_T.clone()
    kept = d.timesteps(5).tolist()
    with torch.no_grad():
        for i, j in zip(kept, kept[1:] + [0]):
            t = torch.full((2,), i, device=device)
            eps = torch.lerp(model(x, t, None), model(x, t, y), 3.0)
            x0 = (x - (1 - d.alpha_hat[i]).sqrt() * eps) / d.alpha_hat[i].sqrt()
            x = d.alpha_hat[j].sqrt() * x0 + (1 - d.alpha_hat[j]).sqrt() * eps
    expected = ((x.clamp(-1, 1) + 1) / 2 * 255).type(torch.uint8)
    assert (got.int() - expected.int()).abs().max() <= 1  # uint8 rounding at the edge


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("cfg_scale, batch", [(3, 8), (1, 4), (0, 4)])
def test_one_forward_pass_per_step(sampler, cfg_scale, batch):
    """A step is one network evaluation, guided or not: the sweeps count evaluations as steps."""
    model = CountingModel(tiny_model())
    d = Diffusion(noise_steps=100, img_size=8, c_in=1)
    d.sample(model, 4, torch.tensor([0, 1, 2, 0]), cfg_scale=cfg_scale, sampler=sampler, steps=6, progress=False)
    assert model.batch_sizes == [batch] * 6


def test_guidance_interval_guides_inside_and_predicts_conditionally_outside():
    model, d = tiny_model(), Diffusion(noise_steps=100, img_size=8, c_in=1)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([10, 40, 70, 99]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        cond, guided = model(x, t, y), d.predict_noise(model, x, t, y, 3.0)
        got = d.predict_noise(model, x, t, y, 3.0, guidance_interval=(40, 70))
    torch.testing.assert_close(got[1:3], guided[1:3])
    torch.testing.assert_close(got[[0, 3]], cond[[0, 3]])


def test_guidance_interval_in_sampling():
    model, d = CountingModel(tiny_model()), Diffusion(noise_steps=100, img_size=8, c_in=1)
    y, x_T = torch.tensor([2, 0]), torch.randn(2, 1, 8, 8)

    def sample(**kw):  # the chain's last x, before the clamp to [-1, 1] (an untrained model saturates)
        trajectory = []
        d.sample(model, 2, y, cfg_scale=3, sampler="ddim", steps=6, noise=x_T, progress=False,
                 callback=lambda t, x: trajectory.append(x), **kw)
        return trajectory[-1]

    everywhere = sample()
    assert torch.equal(sample(guidance_interval=(0, 99)), everywhere)  # the whole chain: the original's guidance
    model.batch_sizes.clear()
    partly = sample(guidance_interval=(50, 99))
    # steps 99, 79, 60 are guided (2n), 40, 21, 1 are not (n): guidance costs nothing outside the interval
    assert model.batch_sizes == [4, 4, 4, 2, 2, 2]
    assert not torch.equal(partly, everywhere)
    with pytest.raises(ValueError, match="guidance_interval"):
        sample(guidance_interval=(50, 100))


def test_labels_are_checked():
    model, d = tiny_model(), Diffusion(noise_steps=10, img_size=8, c_in=1)
    with pytest.raises(ValueError, match=r"labels must be classes 0..2, or -1 for none"):
        d.sample(model, 2, torch.tensor([0, 3]), progress=False)
    with pytest.raises(ValueError, match=r"labels must be classes 0..2, or -1 for none"):
        d.sample(model, 2, torch.tensor([0, -2]), progress=False)
    with pytest.raises(ValueError, match="one label per image"):
        d.sample(model, 3, torch.tensor([0, 1]), progress=False)


def test_label_minus_one_samples_the_unconditional_model():
    """-1 is the label dropout trains with: sampling it gives the unconditional model, guided or not."""
    model, d = tiny_model(), Diffusion(noise_steps=100, img_size=8, c_in=1)
    x_T = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        eps = d.predict_noise(model, x_T, torch.tensor([99, 99]), torch.tensor([-1, -1]), cfg_scale=3)
        torch.testing.assert_close(eps, model(x_T, torch.tensor([99, 99])))
    trajectories = []
    for cfg_scale in (1, 3):
        steps = []
        d.sample(model, 2, [-1, -1], cfg_scale, sampler="ddim", steps=5, noise=x_T, progress=False,
                 callback=lambda t, x: steps.append(x))
        trajectories.append(steps[-1])
    torch.testing.assert_close(*trajectories)


def test_label_dropout_is_per_sample(in_tmp):
    args = ddpm_conditional.parse_args([*TINY, "--limit", "64"])
    trainer = ddpm_conditional.Trainer(args)
    seen = []
    trainer.net = lambda x, t, y: seen.append(y.clone()) or x
    labels = torch.arange(10).repeat(40)  # 400 per batch
    for _ in range(50):
        trainer.predict(torch.zeros(400, 1, 1, 1), torch.ones(400, dtype=torch.long), labels)
    dropped = torch.stack(seen) == -1
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # 20,000 draws: std 0.002
    assert dropped.any(dim=1).all() and not dropped.all(dim=1).any()  # every batch mixes both
    kept = ~dropped
    assert torch.equal(torch.stack(seen)[kept], labels.expand(50, -1)[kept])


def test_num_classes_must_match_the_data(in_tmp):
    args = ddpm_conditional.parse_args([*TINY, "--num_classes", "7"])
    with pytest.raises(UserError, match="--num_classes 7 does not match the 10 classes"):
        ddpm_conditional.Trainer(args)


def grid_size(path):
    with Image.open(path) as im:
        return im.size


def test_end_to_end_on_three_class_folders(in_tmp, device):
    for i, name in enumerate(["apple", "banana", "cherry"]):
        write_images(in_tmp / "fruit" / name, 4, size=20, seed=i)
    ddpm_conditional.main([*TINY, "--dataset_path", "fruit", "--batch_size", "4", "--epochs", "2",
                           "--sample_every", "1", "--n_samples", "5", "--ema_start", "1", "--device", device])
    run = in_tmp / "models" / "DDPM_conditional"
    assert {p.name for p in run.iterdir()} == {"ckpt.pt", "ema_ckpt.pt", "optim.pt", "resume.pt", "run.json"}
    for name in ("ckpt.pt", "ema_ckpt.pt"):
        model = UNet_conditional(c_in=3, c_out=3, num_classes=3, width=8, input_skip=True)
        model.load_state_dict(torch.load(run / name, weights_only=True), strict=True)
    config = json.loads((run / "run.json").read_text())
    assert config["class_names"] == ["apple", "banana", "cherry"] and config["num_classes"] == 3
    # rows = 3 classes, columns = 5 samples, 16-pixel images with 2-pixel gaps
    for name in ("0.jpg", "0_ema.jpg", "1.jpg", "1_ema.jpg"):
        assert grid_size(in_tmp / "results" / "DDPM_conditional" / name) == (6 * (5 * 18 + 2), 6 * (3 * 18 + 2))
    events = EventAccumulator(str(in_tmp / "runs" / "DDPM_conditional")).Reload()
    assert {"samples", "samples_ema"} <= set(events.Tags()["images"])


def test_grid_has_a_row_per_class_for_ten_classes(in_tmp):
    trainer = ddpm_conditional.Trainer(ddpm_conditional.parse_args(
        [*TINY, "--limit", "32", "--n_samples", "2", "--epochs", "1", "--sample_every", "1"]))
    grids = trainer.sample_grids()
    assert set(grids) == {"", "_ema"}
    assert grids["_ema"].shape == (20, 1, 16, 16)
    trainer.fit()
    # 2 columns, one row per class, enlarged 3x (the longer side towards 512 pixels)
    assert grid_size(in_tmp / "results" / "DDPM_conditional" / "0_ema.jpg") == (3 * (2 * 18 + 2), 3 * (10 * 18 + 2))


def test_grids_can_guide_in_an_interval(in_tmp):
    args = [*TINY, "--limit", "32", "--n_samples", "2", "--epochs", "1"]
    everywhere = ddpm_conditional.Trainer(ddpm_conditional.parse_args(args))
    torch.manual_seed(0)
    reference = everywhere.sample_grids()["_ema"]
    interval = ddpm_conditional.Trainer(ddpm_conditional.parse_args([*args, "--guidance_interval", "50", "99",
                                                                     "--run_name", "interval"]))
    interval.ema_model.load_state_dict(everywhere.ema_model.state_dict())
    torch.manual_seed(0)
    assert not torch.equal(interval.sample_grids()["_ema"], reference)
    with pytest.raises(UserError, match="guidance_interval"):
        ddpm_conditional.parse_args([*args, "--guidance_interval", "50", "100"])


def test_grids_of_many_classes_keep_ten_rows_and_say_what_they_cost(in_tmp, capsys):
    """120 classes would make a grid of 1,920 images (8 a class, model and EMA): more than the training costs."""
    for k in range(12):
        write_images(in_tmp / "many" / f"c{k:02d}", 1, size=16, seed=k)
    ddpm_conditional.main([*TINY, "--dataset_path", "many", "--batch_size", "4", "--epochs", "1",
                           "--sample_every", "1", "--n_samples", "2"])
    out = capsys.readouterr().out
    assert "sample grids: 10 of the 12 classes, a row each: c00, c01, c02, c04, c05, c06, c07, c09, c10, c11" in out
    assert "sample grids: 40 images in" in out  # 10 rows of 2, from the model and the EMA
    # 2 columns, 10 rows of 16-pixel images with 2-pixel gaps, enlarged 3x
    assert grid_size(in_tmp / "results" / "DDPM_conditional" / "0_ema.jpg") == (3 * (2 * 18 + 2), 3 * (10 * 18 + 2))
