"""Every mask a user can bring to `edit.py inpaint` (each mode Pillow opens, grey levels, other sizes, boxes thinner
than a pixel), read by one rule; and every flag of edit.py checked against the command and the run before the
work: refused in one line, nothing written."""
import argparse
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import edit
from ddpm import Diffusion
from edit import inpaint
from masks import box_mask, load_mask, mask_from_image, mask_source, open_mask
from modules import UNet, UNet_conditional
from files import UserError
from runs import run_main
from utils import open_image

REGION = np.zeros((8, 8), bool)
REGION[2:6, 5:] = True  # the part to fill: 12 of 64 pixels
RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # colours a mask read by its alpha must not matter


def with_alpha(colours: np.ndarray, alpha: np.ndarray, mode: str = "RGBA") -> Image.Image:
    return Image.fromarray(np.dstack([colours, alpha]).astype(np.uint8), mode)


def palette(indices: np.ndarray, colours: list[int], **info) -> Image.Image:
    im = Image.fromarray(indices.astype(np.uint8), "P")
    im.putpalette(colours)
    im.info.update(info)
    return im


def high_depth(values: np.ndarray, mode: str) -> Image.Image:
    im = Image.fromarray(values)
    assert im.mode == mode
    return im


WHITE = (REGION * 255).astype(np.uint8)
# name: (the mask as a user's program makes it, the file format it is saved in (None: tested in memory), reading)
MASKS = {
    "1-bit": (lambda: Image.fromarray(REGION), "PNG", "brightness"),
    "gray": (lambda: Image.fromarray(WHITE, "L"), "PNG", "brightness"),
    "gray, JPEG": (lambda: Image.fromarray(WHITE, "L"), "JPEG", "brightness"),
    "gray with alpha": (lambda: with_alpha(NOISE[..., 0], WHITE, "LA"), "PNG", "alpha"),
    "gray with an opaque alpha": (lambda: with_alpha(WHITE, np.full((8, 8), 255), "LA"), "PNG", "brightness"),
    "gray with a transparent colour": (lambda: Image.fromarray(WHITE, "L"), "PNG-tRNS", "alpha"),
    "palette": (lambda: palette(REGION, [0, 0, 0, 255, 255, 255]), "PNG", "brightness"),
    "palette, GIF": (lambda: palette(REGION, [0, 0, 0, 255, 255, 255]), "GIF", "brightness"),
    "palette with transparency": (lambda: palette(REGION, [255, 255, 255, 255, 255, 255], transparency=0), "PNG",
                                  "alpha"),
    "palette with transparency, GIF": (lambda: palette(REGION, [255, 255, 255, 0, 0, 0], transparency=0), "GIF",
                                       "alpha"),
    "palette with an unused transparent index": (lambda: palette(REGION, [0, 0, 0, 255, 255, 255, 9, 9, 9],
                                                                 transparency=2), "PNG", "brightness"),
    "palette with alpha": (lambda: with_alpha(NOISE, WHITE).convert("PA"), None, "alpha"),
    "RGB": (lambda: Image.fromarray(np.dstack([WHITE] * 3), "RGB"), "PNG", "brightness"),
    "RGB in bright yellow on blue": (lambda: Image.fromarray(np.where(REGION[..., None], [255, 255, 0], [0, 0, 255])
                                                             .astype(np.uint8), "RGB"), "PNG", "brightness"),
    "RGB with a transparent colour": (lambda: Image.fromarray(np.dstack([WHITE] * 3), "RGB"), "PNG-tRNS", "alpha"),
    "RGBA, alpha as the mask": (lambda: with_alpha(NOISE, WHITE), "PNG", "alpha"),
    "RGBA, a white layer over transparency": (lambda: with_alpha(np.dstack([WHITE] * 3), WHITE), "PNG", "alpha"),
    "RGBA, a black layer over transparency": (lambda: with_alpha(np.zeros((8, 8, 3)), WHITE), "PNG", "alpha"),
    "RGBA, opaque": (lambda: with_alpha(np.dstack([WHITE] * 3), np.full((8, 8), 255)), "PNG", "brightness"),
    "RGBA, premultiplied": (lambda: with_alpha(np.dstack([WHITE] * 3), WHITE).convert("RGBa"), None, "alpha"),
    "gray with alpha, premultiplied": (lambda: with_alpha(WHITE, np.full((8, 8), 255), "LA").convert("La"), None,
                                       "brightness"),
    "CMYK": (lambda: Image.fromarray(np.dstack([WHITE] * 3), "RGB").convert("CMYK"), "JPEG", "brightness"),
    "16-bit gray": (lambda: high_depth((REGION * 65535).astype(np.uint16), "I;16"), "PNG", "brightness"),
    "32-bit gray": (lambda: high_depth((REGION * 65535).astype(np.int32), "I"), "TIFF", "brightness"),
    "float gray in [0, 1]": (lambda: high_depth(REGION.astype(np.float32), "F"), "TIFF", "brightness"),
}


@pytest.mark.parametrize("name", MASKS)
def test_every_mode_selects_the_region_by_one_rule(tmp_path, name):
    make, fmt, reading = MASKS[name]
    im = make()
    if fmt:  # as a user brings it: a file
        path = tmp_path / "mask.img"
        if fmt == "PNG-tRNS":  # black is the transparent colour
            im.save(path, "PNG", transparency=0 if im.mode == "L" else (0, 0, 0))
        else:
            im.save(path, fmt)
        im = open_mask(path)
    assert mask_source(im)[1] == reading, im.mode
    assert torch.equal(mask_from_image(im), torch.from_numpy(REGION).float()), (name, im.mode)


@pytest.mark.parametrize("make, filled", [
    # grey levels (a soft brush, anti-aliased edges): filled from half up, in every depth and in the alpha
    (lambda v: Image.fromarray(np.array([v], np.uint8), "L"), [0, 127, 128, 200, 255]),
    (lambda v: Image.fromarray(np.array([[[0, 0, 0, a] for a in v]], np.uint8), "RGBA"), [0, 127, 128, 200, 255]),
    (lambda v: Image.fromarray(np.array([v], np.float32) / 255), [0, 127, 127.5, 200, 255]),
    (lambda v: Image.fromarray((np.array([v], np.float64) * 257).astype(np.uint16)), [0, 127.4, 127.6, 200, 255]),
])
def test_grey_is_filled_from_half_up(make, filled):
    assert mask_from_image(make(filled)).tolist() == [[0, 0, 1, 1, 1]]


def test_a_mask_fully_transparent_or_opaque_reads_as_it_looks():
    clear = with_alpha(np.full((8, 8, 3), 255), np.zeros((8, 8)))
    assert mask_source(clear)[1] == "alpha" and not mask_from_image(clear).any()  # selects nothing: refused later
    opaque_black = with_alpha(np.zeros((8, 8, 3)), np.full((8, 8), 255))
    assert mask_source(opaque_black)[1] == "brightness" and not mask_from_image(opaque_black).any()


def test_a_mask_is_turned_as_the_images_are(tmp_path):
    """A photo's EXIF orientation: the mask is read upright, as utils.open_image reads the images."""
    im = Image.fromarray(np.where(REGION[:, :6], 255, 0).astype(np.uint8), "L")  # 6 wide, 8 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    im.save(tmp_path / "m.png", exif=exif)
    upright = open_image(tmp_path / "m.png", "L")
    assert upright.size == (8, 6) and open_mask(tmp_path / "m.png").size == (8, 6)
    assert torch.equal(mask_from_image(open_mask(tmp_path / "m.png")), mask_from_image(upright))


def test_a_box_covers_every_pixel_it_touches():
    assert torch.equal(box_mask([0.5, 0, 1, 1], 8)[0, 0], torch.tensor([[0.] * 4 + [1.] * 4] * 8))
    tiny = box_mask([0.5, 0.5, 0.501, 0.501], 8)  # a thousandth of the image
    assert tiny.sum() == 1 and tiny[0, 0, 4, 4] == 1
    assert box_mask([0.3, 0, 0.7, 1], 10)[0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]  # 0.7 * 10 is 7.0000001
    assert box_mask([0.26, 0.26, 0.74, 0.74], 8)[0, 0, 2].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]  # 2.08..5.92: 2..5


def mask_args(**kwargs):
    return argparse.Namespace(**{"box": None, "mask": None, **kwargs})


def save(path, array, mode):
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


def test_a_mask_of_the_images_size_is_resized_as_they_are_and_of_the_runs_used_as_is(tmp_path):
    wide = np.zeros((16, 24), np.uint8)  # 24x16 images: resized to 12x8, centre-cropped to 8x8 (columns 2..9)
    wide[:, 16:] = 255  # the image's columns 16..23: at 12x8, columns 8..11, of which the crop keeps 8 and 9
    save(tmp_path / "wide.png", wide, "L")
    mask, how = load_mask(mask_args(mask=tmp_path / "wide.png"), [(24, 16)], [tmp_path / "a.png"], 8)
    assert mask.shape == (1, 1, 8, 8) and mask[0, 0, 0].tolist() == [0] * 6 + [1, 1]
    assert how.endswith("24x16, resized to 8x8 as the images are")
    save(tmp_path / "run_size.png", np.where(REGION, 255, 0), "L")
    for sizes in ([(24, 16)], [(24, 16), (40, 40)]):  # images of any sizes, even different ones
        mask, how = load_mask(mask_args(mask=tmp_path / "run_size.png"), sizes, [tmp_path / "a.png"] * 2, 8)
        assert torch.equal(mask[0, 0], torch.from_numpy(REGION).float()) and "resized" not in how


@pytest.mark.parametrize("sizes, message", [
    ([(20, 20)], "the mask .*m.png is 12x10 and .*a.png is 20x20: give a mask of the images' size \\(20x20\\) or of "
                 "the run's \\(8x8\\)"),
    ([(12, 10), (20, 20)], "the mask .*m.png is 12x10 and .*b.png is 20x20: images of different sizes take a mask "
                           "of the run's size \\(8x8\\)"),
])
def test_a_mask_of_another_size_is_refused_saying_both(tmp_path, sizes, message):
    save(tmp_path / "m.png", np.full((10, 12), 255), "L")
    with pytest.raises(UserError, match=message):
        load_mask(mask_args(mask=tmp_path / "m.png"), sizes, [tmp_path / "a.png", tmp_path / "b.png"], 8)


@pytest.mark.parametrize("array, mode, message", [
    (np.zeros((8, 8)), "L", "selects nothing to fill: it is black everywhere \\(its brightness under half\\)"),
    (np.zeros((8, 8, 4)), "RGBA", "selects nothing to fill: it is transparent everywhere \\(its alpha under half\\)"),
    (np.full((8, 8), 100), "L", "selects nothing to fill: it is black everywhere"),  # a grey under half
    (np.pad(np.full((16, 1), 255), ((0, 0), (0, 15))), "L", "what it selects is lost in resizing and cropping to "
                                                            "the run's 8x8"),  # a line one pixel wide, at 16x16
    (np.full((8, 8), 255), "L", "selects every pixel: it is white everywhere \\(its brightness at least half\\), so "
                                "nothing of the images would be kept, which is sampling"),
    (np.dstack([np.zeros((8, 8, 3)), np.full((8, 8), 200)]), "RGBA", "selects every pixel: it is opaque everywhere"),
])
def test_a_mask_that_selects_nothing_or_everything_is_refused(tmp_path, array, mode, message):
    save(tmp_path / "m.png", array, mode)
    size = array.shape[0]
    with pytest.raises(UserError, match=message):
        load_mask(mask_args(mask=tmp_path / "m.png"), [(size, size)], [tmp_path / "a.png"], 8)
    with pytest.raises(UserError, match="--box 0.01 0 1 1 touches every pixel of the run's 8x8 images"):
        load_mask(mask_args(box=[0.01, 0, 1, 1]), [(8, 8)], [], 8)


def test_a_mask_whose_kept_part_is_cropped_off_is_refused(tmp_path):
    wide = np.full((16, 24), 255)
    wide[:, :4] = 0  # kept: the left 4 columns of 24, which the centre crop to a square cuts off
    save(tmp_path / "m.png", wide, "L")
    with pytest.raises(UserError, match="selects every pixel: what it keeps is lost in resizing and cropping to the "
                                        "run's 8x8, so nothing of the images would be kept"):
        load_mask(mask_args(mask=tmp_path / "m.png"), [(24, 16)], [tmp_path / "a.png"], 8)


def test_the_python_inpaint_checks_its_mask_and_thresholds_it_at_half():
    torch.manual_seed(0)
    model, d = UNet(1, 1, width=8, input_skip=True).eval(), Diffusion(noise_steps=20, img_size=8, c_in=1)
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    soft = torch.full((1, 1, 8, 8), 0.49)
    soft[..., 4:] = 0.5  # the right half at exactly half: generated; the rest just under: kept exactly
    filled = inpaint(d, model, images, soft, steps=2, progress=False)
    assert torch.equal(filled[..., :4], images[..., :4])
    for mask, message in ((soft * 255, "mask must be 0/1 \\(1 = generate\\), got values up to 127.5: divide by 255"),
                          (soft - 1, "mask must be 0/1 \\(1 = generate\\), got values down to -0.51"),
                          (torch.zeros(1, 1, 8, 8), "mask selects nothing to generate: no value is at least 0.5"),
                          (torch.stack([soft[0], torch.zeros(1, 8, 8)]), "mask selects nothing to generate for "
                                                                         "image\\(s\\) 1 of 2"),
                          (torch.full((1, 1, 8, 8), float("nan")), "mask must be 0/1 \\(1 = generate\\), got nan")):
        with pytest.raises(ValueError, match=message):
            inpaint(d, model, images, mask, steps=2, progress=False)
    assert inpaint(d, model, images, torch.ones(1, 1, 8, 8, dtype=torch.bool), steps=2, progress=False).shape \
        == images.shape  # everything: sampling, allowed in Python


# --------------------------------------------------------------------------- edit.py as a user runs it

def make_run(folder, conditional=True):
    """A tiny untrained run of 8x8 gray images and 20 noise steps: enough to run every command in a second."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    net = (UNet_conditional(c_in=1, c_out=1, num_classes=2, width=8, input_skip=True) if conditional
           else UNet(1, 1, width=8, input_skip=True))
    torch.save(net.state_dict(), folder / "ckpt.pt")
    (folder / "run.json").write_text(json.dumps({
        "model_args": dict(c_in=1, c_out=1, time_dim=256, width=8, input_skip=True),
        "diffusion_args": dict(noise_steps=20, img_size=8, c_in=1), "class_names": ["a", "b"]}))


@pytest.fixture
def user(in_tmp):
    """A folder as a user's: a conditional run, an unconditional one, two 16x16 images, one 24x24, masks."""
    make_run(in_tmp / "run")
    make_run(in_tmp / "plain", conditional=False)
    for name, files in (("ema", ("ckpt.pt", "ema_ckpt.pt")), ("only_ema", ("ema_ckpt.pt",))):
        (in_tmp / name).mkdir()
        for file in files:
            shutil.copy(in_tmp / "run" / "ckpt.pt", in_tmp / name / file)
    rng = np.random.default_rng(1)
    for name, side in (("mine/0.png", 16), ("mine/1.png", 16), ("big.png", 24)):
        (in_tmp / name).parent.mkdir(exist_ok=True)
        save(in_tmp / name, rng.integers(0, 256, (side, side)), "L")
    layer = np.zeros((16, 16, 4))
    layer[:, 10:] = 255  # the issue's mask: opaque white over the part to fill, transparent elsewhere
    save(in_tmp / "layer.png", layer, "RGBA")
    save(in_tmp / "black.png", np.zeros((16, 16)), "L")
    save(in_tmp / "small.png", np.zeros((4, 4)), "L")
    (in_tmp / "notes.png").write_text("not an image")
    return in_tmp


def test_the_issues_layer_fills_only_where_it_is_opaque_and_says_how_much(user, capsys, monkeypatch):
    grids = []
    save_images = edit.save_images
    monkeypatch.setattr(edit, "save_images", lambda images, *a, **k: (grids.append(images), save_images(images, *a,
                                                                                                          **k)))
    edit.main(["inpaint", "--run", "run", "--images", "mine", "--mask", "layer.png", "--steps", "3"])
    out = capsys.readouterr().out
    assert ("inpaint: 37.5% of each image will be generated, 24 of 64 pixels (the alpha of layer.png, filled where "
            "opaque; 16x16, resized to 8x8 as the images are)\n") in out
    inputs, kept, mask, filled = grids[0].split(2)  # rows: input, what is kept, the mask, the result
    assert mask[..., :5].eq(0).all() and mask[..., 5:].eq(255).all()  # columns 10..15 of 16: 5..7 of 8
    assert torch.equal(filled[..., :5], inputs[..., :5])  # the known pixels come back exactly
    assert (user / "edit_inpaint.png").is_file()
    edit.main(["inpaint", "--run", "run", "--images", "mine/0.png", "--box", "0.5", "0.5", "0.501", "0.501",
               "--steps", "2", "--resample", "2", "--jump", "1", "--out", "tiny.png"])
    assert ("inpaint: 1.6% of each image will be generated, 1 of 64 pixels (--box 0.5 0.5 0.501 0.501, every pixel "
            "it touches)") in capsys.readouterr().out


def test_img2img_says_how_far_it_goes(user, capsys):
    edit.main(["img2img", "--run", "run", "--images", "mine/0.png", "--strength", "0.5", "--steps", "4"])
    assert re.search("^img2img: strength 0.5 noises each image to t = 10 of 19, then [1-3] of the 4 dpmpp2m steps "
                     "denoise it$", capsys.readouterr().out, re.M)
    edit.main(["img2img", "--run", "run", "--images", "mine/0.png", "--strength", "0.01", "--steps", "4"])
    assert re.search("^img2img: strength 0.01 reaches none of the 4 dpmpp2m steps \\(the lowest at t = [0-9]+\\): "
                     "the images come back unchanged$", capsys.readouterr().out, re.M)


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the run was loaded before the flags were checked")


# (argv after the command and --run, the one-line message, refused before the run is loaded)
REFUSED = [
    # inpaint: the mask
    (["inpaint", "--images", "mine", "--mask", "missing.png"], "--mask missing.png: no such file", True),
    (["inpaint", "--images", "mine", "--mask", "mine"], "--mask mine: a folder: give one image", True),
    (["inpaint", "--images", "mine", "--mask", "notes.png"], "--mask notes.png is not a readable image", True),
    (["inpaint", "--images", "mine", "--mask", "black.png"], "the mask black.png selects nothing to fill", False),
    (["inpaint", "--images", "mine", "--mask", "small.png"], "the mask small.png is 4x4 and mine/0.png is 16x16",
     False),
    (["inpaint", "--images", "mine", "big.png", "--mask", "layer.png"], "big.png is 24x24: images of different "
                                                                        "sizes take a mask of the run's size", False),
    (["inpaint", "--images", "mine", "--box", "0", "0", "1", "1"], "--box 0 0 1 1 touches every pixel", False),
    # inpaint: the sampler and RePaint's flags
    (["inpaint", "--images", "mine", "--box", "0", "0", "1", "0.5", "--sampler", "dpmpp2m"],
     "--sampler dpmpp2m: inpainting takes ddpm or ddim", True),
    (["inpaint", "--images", "mine", "--box", "0", "0", "1", "0.5", "--jump", "2"],
     "--jump 2: RePaint jumps back only when it resamples", True),
    (["inpaint", "--images", "mine", "--box", "0", "0", "1", "0.5", "--resample", "3", "--steps", "4"],
     "--resample 3: the chain jumps back every --jump 10 steps .* give a --jump below --steps", False),
    (["inpaint", "--images", "mine", "--box", "0", "0", "1", "0.5", "--steps", "30"],
     "--steps 30: this run has 20 noise steps: give at most 19", False),
    # img2img, invert, interpolate
    (["img2img", "--images", "mine", "--strength", "1.5"], "--strength must be in \\[0, 1\\], got 1.5: 0 keeps the "
                                                            "images, 1 samples afresh", True),
    (["invert", "--images", "mine", "--sampler", "ddpm"], "--sampler ddpm: invert runs DDIM both ways", True),
    (["invert", "--images", "mine", "--seed", "3"], "--seed: invert draws no noise", True),
    (["interpolate", "--seed", "3"], "--seed: interpolate draws no noise .* --seeds", True),
    (["interpolate", "--images", "mine", "--seeds", "1", "2"], "--seeds with --images", True),
    (["interpolate", "--sampler", "ddpm"], "--sampler ddpm: interpolation decodes with a deterministic sampler",
     True),
    (["interpolate", "--images", "mine", "--sampler", "dpmpp2m"], "--sampler dpmpp2m with --images", True),
    (["interpolate", "--seeds", "3", "3"], "--seeds 3 3: the two ends are one x_T", True),
    (["interpolate", "--images", "mine/0.png", "mine/0.png"], "--images gives mine/0.png twice", True),
    (["interpolate", "--images", "mine", "big.png"], "interpolate takes two end points: --images A B, or --seeds A B: 3 given", True),
    (["interpolate", "--labels", "a", "b"], "--labels: give one label \\(interpolate keeps one class", False),
    # the run
    # (sample.load_from_flags checks these, for every script; loading, cheap, comes before the work)
    (["invert", "--images", "mine", "--no_ema"], "--no_ema .*change nothing.* run keeps no EMA weights", True),
    (["invert", "--images", "mine", "--no_ema", "--run", "run/ckpt.pt"], "--no_ema: .*run/ckpt.pt.* holds one "
                                                                         "network.*drop --no_ema", False),
    (["invert", "--images", "mine", "--no_ema", "--run", "ema/ema_ckpt.pt"], "--no_ema: .*ema/ema_ckpt.pt.* holds "
                                                                             "one network.* give --run ema/ckpt.pt",
     False),
    (["invert", "--images", "mine", "--no_ema", "--run", "only_ema"], "--no_ema: .*only_ema.* holds only EMA weights",
     False),
    (["invert", "--images", "mine", "--image_size", "12"], "--image_size 12 must be a (positive )?multiple of 8",
     False),
    (["invert", "--images", "mine", "--run", "nowhere"], "nowhere.* does not exist", False),
    (["invert", "--images", "mine", "--run", "plain", "--guidance_interval", "0", "5"],
     "plain is an unconditional run: --guidance_interval need a class-conditional one", False),
    (["img2img", "--images", "mine", "--strength", "0.5", "--guidance_interval", "0", "30"],
     "--guidance_interval 0 30: give timesteps LO <= HI of this run's 0..19", False),
    (["invert", "--images", "mine", "--guidance_interval", "0", "5"],
     "--guidance_interval: invert is unguided \\(cfg_scale 1\\) unless --cfg_scale is given", False),
    # the output
    (["invert", "--images", "mine", "--out", "grid.xyz"], "--out grid.xyz ends in '.xyz', which names no image format Pillow knows",
     True),
    (["invert", "--images", "mine", "--out", "grid"], "--out grid has no extension", True),
    (["invert", "--images", "mine", "--out", "mine/1.png"], "--out mine/1.png is one of the inputs", True),
    (["invert", "--images", "mine", "--out", "grid.xbm"], "Pillow cannot write 1-channel images as XBM", False),
]


@pytest.mark.parametrize("argv, message, early", REFUSED, ids=[m[:40] for _, m, _ in REFUSED])
def test_each_flag_the_run_cannot_honour_is_refused_in_one_line(user, capsys, monkeypatch, argv, message, early):
    if early:
        monkeypatch.setattr(edit.sample, "load", refuse_to_load)
    run = [] if "--run" in argv else ["--run", "run"]
    with pytest.raises(SystemExit) as e:
        run_main(lambda: edit.main([argv[0], *run, *argv[1:]]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err
    assert not list(user.glob("edit_*")) and not list(user.glob("grid*"))  # nothing written


def test_an_image_size_other_than_the_runs_is_a_warning(user, capsys):
    edit.main(["invert", "--run", "run", "--images", "mine/0.png", "--image_size", "16", "--steps", "2"])
    assert "warning: run learned 8x8 images (run.json); --image_size 16 " in capsys.readouterr().err
