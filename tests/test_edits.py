"""Beyond sampling: inpainting (RePaint), image-to-image (SDEdit), DDIM inversion and interpolation, on the exact
denoiser of a set of digits (a model without error) and on tiny models; edit.py and tools/measure_edits.py as a
user runs them."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_conditional
import edit
from ddpm import Diffusion
from edit import img2img, inpaint, interpolate, invert, repaint_path, slerp
from tools.exact import ExactDenoiser
from modules import UNet, UNet_conditional
from runs import run_main
from utils import load_dataset


def exact_digits(kind):
    """64 digits at 16x16, their labels, a conditional Diffusion or Flow (`kind`) and the exact model of them."""
    x, y, *_ = load_dataset("digits")
    images = torch.nn.functional.interpolate(x[:64].float(), size=16, mode="area").round().to(torch.uint8)
    d = kind(img_size=16, c_in=1)
    return images, y[:64], d, ExactDenoiser(images, y[:64], d, num_classes=10)


@pytest.fixture(scope="module")
def digits():
    return exact_digits(ddpm_conditional.Diffusion)


def right_half(size: int = 16) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 2:] = 1
    return mask


def test_inpainting_keeps_the_known_part_exactly_and_fills_the_rest_from_it(digits):
    """The exact denoiser of 64 digits, given 16 digits' left halves (and no label), must fill in their right
    halves: the known half nearly pins down which digit it is. Measured (30 steps): the right half within 5 grey
    levels of the digit's own for 12 of 16 with the ancestral chain, 14 with RePaint's resampling (3x every 5
    steps), 10 with DDIM."""
    images, labels, d, exact = digits
    matched = {}
    for sampler, resample in (("ddpm", 1), ("ddpm", 3), ("ddim", 1)):
        torch.manual_seed(0)
        filled = inpaint(d, exact, images[:16], right_half(), sampler=sampler, steps=30, jump=5, resample=resample,
                         progress=False, labels=-1, cfg_scale=1)
        assert filled.dtype == torch.uint8 and filled.shape == images[:16].shape
        assert torch.equal(filled[..., :8], images[:16, :, :, :8])  # the known part, exactly
        error = (filled[..., 8:].float() - images[:16, :, :, 8:].float()).abs().flatten(1).mean(1)
        matched[sampler, resample] = (error < 5).sum().item()
    assert matched["ddpm", 1] >= 10 and matched["ddpm", 3] >= 13 and matched["ddim", 1] >= 8, matched
    assert matched["ddpm", 3] > matched["ddpm", 1], matched  # resampling harmonises


def test_repaint_goes_back_up_jump_steps_resample_times_minus_one():
    assert repaint_path(4, 2, 1) == [0, 1, 2, 3, 4]
    assert repaint_path(4, 2, 3) == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4]  # at 2 (not at the end, 4): twice more
    assert len(repaint_path(50, 10, 5)) - 1 == 50 + 4 * 4 * 11  # 4 resampling points, each 4 x (1 up + 10 down)


def test_img2img_strength_0_returns_the_image_and_1_samples_from_the_noise(digits):
    images, labels, d, exact = digits
    z = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    for sampler, steps in (("dpmpp2m", 10), ("ddim", 10), ("ddpm", 10)):
        assert torch.equal(img2img(d, exact, images[:4], 0.0, sampler=sampler, steps=steps, labels=labels[:4]),
                           images[:4])
        torch.manual_seed(2)
        edited = img2img(d, exact, images[:4], 1.0, sampler=sampler, steps=steps, noise=z, labels=labels[:4],
                         progress=False)
        torch.manual_seed(2)
        sampled = d.sample(exact, 4, labels[:4], sampler=sampler, steps=steps, noise=z, progress=False)
        assert torch.equal(edited, sampled), sampler
    # in between: a low strength stays near the image, a high one may leave it
    near = img2img(d, exact, images[:4], 0.2, sampler="ddim", steps=20, labels=-1, cfg_scale=1, progress=False)
    assert (near.float() - images[:4].float()).abs().mean() < 2
    with pytest.raises(ValueError, match="strength must be in"):
        img2img(d, exact, images[:4], 1.5, labels=-1)


def test_ddim_inversion_then_decoding_gives_the_image_back(digits):
    """Measured on the exact denoiser: no grey level off at 20 DDIM steps or more, at 10 steps 1.4% of the
    pixels off by one level."""
    images, labels, d, exact = digits
    for steps, tolerance in ((10, 1), (50, 0)):
        x_T = invert(d, exact, images[:8], steps=steps, progress=False, labels=labels[:8], cfg_scale=1)
        back = d.sample(exact, 8, labels[:8], sampler="ddim", steps=steps, noise=x_T, progress=False, cfg_scale=1)
        assert (back.float() - images[:8].float()).abs().max() <= tolerance, steps
    assert x_T.dtype == torch.float32 and x_T.shape == (8, 1, 16, 16)


def test_interpolation_ends_on_the_two_samples(digits):
    images, labels, d, exact = digits
    a, b = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    frames = interpolate(d, exact, a, b, 5, sampler="ddim", steps=10, labels=3, progress=False)
    ends = d.sample(exact, 2, [3, 3], sampler="ddim", steps=10, noise=torch.stack([a, b]), progress=False)
    assert frames.shape == (5, 1, 16, 16) and torch.equal(frames[[0, -1]], ends)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    norms = path.flatten(1).norm(dim=1)  # along the great circle, not through the low-norm middle of a line
    assert norms.min() > 0.9 * min(a.norm(), b.norm())
    with pytest.raises(ValueError, match="deterministic sampler"):
        interpolate(d, exact, a, b, 5, sampler="ddpm", labels=3)


def test_every_edit_runs_on_a_tiny_unconditional_model():
    torch.manual_seed(0)
    model, d = UNet(1, 1, width=8, input_skip=True).eval(), Diffusion(noise_steps=50, img_size=8, c_in=1)
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    mask = torch.zeros(3, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1  # a box in the middle, one mask each
    filled = inpaint(d, model, images, mask, steps=5, jump=2, resample=2, progress=False)
    assert torch.equal(filled[mask.bool().expand_as(images).logical_not()], images[~mask.bool().expand_as(images)])
    assert img2img(d, model, images, 0.5, steps=5, progress=False).shape == images.shape
    assert invert(d, model, images, steps=5, progress=False).shape == images.shape
    with pytest.raises(ValueError, match="mask must be"):
        inpaint(d, model, images, torch.zeros(1, 1, 4, 4), steps=5)
    with pytest.raises(ValueError, match="images must be uint8"):
        img2img(d, model, images.float(), 0.5)


def make_run(folder, c_in=1, conditional=True):
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    net = (UNet_conditional(c_in=c_in, c_out=c_in, num_classes=2, width=8, input_skip=True) if conditional
           else UNet(c_in, c_in, width=8, input_skip=True))
    torch.save(net.state_dict(), folder / "ckpt.pt")
    (folder / "run.json").write_text(json.dumps({
        "model_args": dict(c_in=c_in, c_out=c_in, time_dim=256, width=8, input_skip=True),
        "diffusion_args": dict(noise_steps=20, img_size=8, c_in=c_in), "class_names": ["a", "b"]}))


def write(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_the_edit_commands_write_their_grids(in_tmp, capsys):
    make_run(in_tmp / "run")
    rng = np.random.default_rng(0)
    for k in range(2):
        write(in_tmp / "mine" / f"{k}.png", rng.integers(0, 256, (20, 20), dtype=np.uint8), "L")
    mask = np.zeros((20, 20), np.uint8)
    mask[:, 10:] = 255
    write(in_tmp / "mask.png", mask, "L")
    common = ["--run", "run", "--steps", "3"]
    edit.main(["inpaint", *common, "--images", "mine", "--box", "0.5", "0", "1", "1", "--labels", "b",
               "--out", "out/inpaint.png"])
    edit.main(["inpaint", *common, "--images", "mine/0.png", "--mask", "mask.png", "--resample", "2", "--jump", "1"])
    edit.main(["img2img", *common, "--images", "mine", "--strength", "0.5", "--labels", "0", "1"])
    edit.main(["invert", *common, "--images", "mine"])
    assert "decoded from x_T: mean absolute error" in capsys.readouterr().out
    edit.main(["interpolate", *common, "--seeds", "4", "5", "--frames", "3", "--labels", "a"])
    edit.main(["interpolate", *common, "--images", "mine/0.png", "mine/1.png", "--frames", "3"])
    sizes = {"out/inpaint.png": (2, 4), "edit_inpaint.png": (1, 4), "edit_img2img.png": (2, 2),
             "edit_invert.png": (2, 3), "edit_interpolate.png": (3, 1)}
    for name, (columns, rows) in sizes.items():
        with Image.open(in_tmp / name) as grid:
            assert grid.mode == "L"
            factor = grid.size[0] // (columns * 10 + 2)  # 8-pixel images, 2-pixel gaps, enlarged
            assert grid.size == (factor * (columns * 10 + 2) if columns > 1 else grid.size[0],
                                 factor * (rows * 10 + 2) if columns > 1 or rows > 1 else grid.size[1]), name


@pytest.mark.parametrize("argv, message", [
    (["img2img", "--images", "mine", "--strength", "1.5"], "strength must be in \\[0, 1\\], got 1.5"),
    (["inpaint", "--images", "mine", "--mask", "small.png"], "the mask small.png is 4x4 and mine/0.png is 20x20"),
    (["inpaint", "--images", "colour.png", "--box", "0", "0", "1", "1"], "is in colour and the run is grayscale"),
    (["inpaint", "--images", "mine", "--box", "0.5", "0", "0.2", "1"], "--box 0.5 0 0.2 1: give LEFT TOP RIGHT"),
    (["inpaint", "--images", "mine"], "one of the arguments --box --mask is required"),
    (["inpaint", "--images", "nowhere", "--box", "0", "0", "1", "1"], "'nowhere' does not exist"),
    (["interpolate", "--images", "mine/0.png"], "interpolate takes two end points"),
    (["img2img", "--images", "mine", "--strength", "0.5", "--labels", "c"], "--labels c: not a class of this run"),
])
def test_bad_input_to_the_edit_commands_is_one_line(in_tmp, capsys, argv, message):
    make_run(in_tmp / "run")
    rng = np.random.default_rng(0)
    write(in_tmp / "mine" / "0.png", rng.integers(0, 256, (20, 20), dtype=np.uint8), "L")
    write(in_tmp / "small.png", np.zeros((4, 4), np.uint8), "L")
    write(in_tmp / "colour.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
    with pytest.raises(SystemExit) as e:
        run_main(lambda: edit.main([argv[0], "--run", "run", "--steps", "2", *argv[1:]]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and re.search(message, err), err
    assert not list(in_tmp.glob("edit_*.png"))


def test_the_edits_measurements_run_and_fill_their_block(in_tmp, capsys):
    """tools/measure_edits.py in miniature: a tiny digits run, 20 inpaintings, two inversion round trips."""
    from tools import measure_edits

    ddpm_conditional.main(["--width", "8", "--noise_steps", "20", "--limit", "64", "--epochs", "1",
                           "--sample_every", "0", "--device", "cpu"])
    (in_tmp / "docs").mkdir()
    (in_tmp / "docs" / "editing.md").write_text("# x\n<!-- edits:start -->\nold\n<!-- edits:end -->\n")
    measure_edits.main(["--run", "models/DDPM_conditional", "--n", "20", "--steps", "4", "--jump", "2",
                        "--resample", "2", "--inversion_steps", "2", "4", "--judge_epochs", "1",
                        "--readme", "docs/editing.md"])
    block = (in_tmp / "docs" / "editing.md").read_text()
    assert "old" not in block and "--n 20 --steps 4 --jump 2 --resample 2" in block
    assert "`python -m tools.measure_edits --run models/DDPM_conditional --n 20" in block
    assert "--readme docs/editing.md`" in block
    for row in ("| real held-out digits (the judge's own accuracy) |", "| left halves alone, right half black |",
                "| inpainted, RePaint without resampling |", "| inpainted, RePaint resampling 2x every 2 steps |",
                "| 2 |", "| 4 |"):
        assert row in block, row
