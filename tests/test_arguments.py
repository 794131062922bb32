"""Every public argument checked, every promise in a message true, every output written where it was asked."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import ddpm
import ddpm_conditional
import evaluate
import sample
from conftest import write_images
from modules import UNet, UNet_conditional
from runs import run_main

TINY = ["--width", "8", "--image_size", "16", "--noise_steps", "20", "--batch_size", "8", "--device", "cpu",
        "--sample_every", "0"]


@pytest.mark.parametrize("main, argv, message", [
    (ddpm.main, ["--num_workers", "-1"], "--num_workers must be at least 0, got -1"),
    (ddpm.main, ["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (ddpm.main, ["--epochs", "2.5"], "--epochs must be a whole number, got '2.5'"),
    (ddpm.main, ["--lr", "nan"], "--lr must be a finite number, got nan"),
    (ddpm.main, ["--lr", "-1"], "--lr must be positive, got -1"),
    (ddpm.main, ["--weight_decay", "-0.1"], "--weight_decay must be at least 0, got -0.1"),
    (ddpm.main, ["--c_in", "2"], "--c_in invalid choice: 2"),
    (ddpm.main, ["--image_size", "x"], "--image_size must be a whole number, got 'x'"),
    (ddpm.main, ["--image_size", "20"], "--image_size 20 must be a positive multiple of 8"),
    (ddpm.main, ["--width", "6"], "--heads 4 does not divide the channels of every attention layer \\(6\\)"),
    (ddpm.main, ["--channel_mult", "2", "4"], "--channel_mult expected 3 arguments"),
    (ddpm.main, ["--attention", "3"], "--attention invalid choice: 3"),
    (ddpm.main, ["--heads", "0"], "--heads must be at least 1"),
    (ddpm.main, ["--n_samples", "0"], "--n_samples must be at least 1, got 0"),
    (ddpm.main, ["--sample_every", "-1"], "--sample_every must be at least 0"),
    (ddpm.main, ["--log_every", "0"], "--log_every must be at least 1"),
    (ddpm.main, ["--save_every", "-2"], "--save_every must be at least 0"),
    (ddpm.main, ["--warmup", "-5"], "--warmup must be at least 0"),
    (ddpm.main, ["--noise_steps", "1"], "--noise_steps must be at least 2"),
    (ddpm.main, ["--snr_gamma", "0"], "--snr_gamma must be positive"),
    (ddpm.main, ["--seed", "abc"], "--seed must be a whole number"),
    (ddpm.main, ["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (ddpm_conditional.main, ["--ema_power", "-1"], "--ema_power must be at least 0"),
    (ddpm_conditional.main, ["--ema_start", "-1"], "--ema_start must be at least 0"),
    (ddpm_conditional.main, ["--label_drop", "1"], "--label_drop must be in \\[0, 1\\)"),
    (ddpm_conditional.main, ["--cfg_scale", "inf"], "--cfg_scale must be a finite number"),
    (ddpm_conditional.main, ["--guidance_interval", "5"], "--guidance_interval expected 2 arguments"),
    (ddpm_conditional.main, ["--guidance_interval", "9", "5"], "--guidance_interval must be timesteps LO HI"),
    (ddpm_conditional.main, ["--num_classes", "0"], "--num_classes must be at least 1"),
    (sample.main, ["--run", "r", "--n", "0"], "--n must be at least 1, got 0"),
    (sample.main, ["--run", "r", "--steps", "-1"], "--steps must be at least 0"),
    (sample.main, ["--run", "r", "--eta", "-0.5"], "--eta must be at least 0"),
    (sample.main, ["--run", "r", "--image_size", "4"], "--image_size must be at least 8"),
    (sample.main, [], "the following arguments are required: --run"),
    (evaluate.main, ["--run", "r", "--n", "1"], "--n must be at least 2, got 1"),
    (evaluate.main, ["--run", "r", "--judge_epochs", "0"], "--judge_epochs must be at least 1"),
    (benchmark.main, ["--batch_size", "0"], "--batch_size must be at least 1"),
    (benchmark.main, ["--repeats", "-3"], "--repeats must be at least 1"),
])
def test_every_command_line_value_is_checked_in_one_line(in_tmp, capsys, main, argv, message):
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (in_tmp / "models").exists()


@pytest.fixture(scope="module")
def conditional():
    torch.manual_seed(0)
    model = UNet_conditional(c_in=1, c_out=1, num_classes=3, width=8)
    model.class_names = ["cat", "dog", "owl"]
    return model, ddpm_conditional.Diffusion(noise_steps=20, img_size=8, c_in=1)


@pytest.mark.parametrize("labels, n, message", [
    (None, 2, "a conditional model draws the classes it is given: pass labels"),
    ([1.5, 2.0], 2, "labels must be whole class indices, got \\[1.5, 2.0\\]"),
    ([True, False], 2, "labels must be whole class indices"),
    (["cat", "eel"], 2, "labels \\['eel'\\]: not class names of this model \\(cat, dog, owl\\)"),
    ([0, 1, 2], 2, "got 3 labels for n=2 images"),
    ([[0, 1], [1, 2]], 4, "labels must be one class per image \\(1-D\\), got shape \\(2, 2\\)"),
    ([0, 3], 2, "labels must be classes 0..2, or -1 for none"),
    ([0, -2], 2, "labels must be classes 0..2"),
    ({"a": 1}, 1, "labels must be class indices"),
    ([0], 0, "n must be a whole number of images, at least 1, got 0"),
    ([0, 0], 2.0, "n must be a whole number of images, at least 1, got 2.0"),
])
def test_the_sample_apis_labels_and_n_are_checked(conditional, labels, n, message):
    model, diffusion = conditional
    with pytest.raises(ValueError, match=message):
        diffusion.sample(model, n, labels, sampler="ddim", steps=2, progress=False)


def test_the_sample_api_takes_labels_as_users_write_them(conditional):
    model, diffusion = conditional
    draw = lambda labels, n=2, **kw: diffusion.sample(model, n, labels, sampler="ddim", steps=2, progress=False,
                                                      noise=torch.ones(n, 1, 8, 8), **kw)
    reference = draw(torch.tensor([2, 0]))
    for same in ([2, 0], (2, 0), np.array([2, 0]), torch.tensor([2.0, 0.0]), ["owl", "cat"], ["owl", 0]):
        assert torch.equal(draw(same), reference), same
    assert torch.equal(draw(1, n=3), draw([1, 1, 1], n=3))  # one label for every image
    for bad in (float("nan"), "3", None, True):
        with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
            draw([0, 1], cfg_scale=bad)
    with pytest.raises(ValueError, match=r"noise must have the shape of the n images, \(2, 1, 8, 8\)"):
        diffusion.sample(model, 2, [0, 1], sampler="ddim", steps=2, progress=False, noise=torch.ones(2, 1, 16, 16))
    plain = ddpm.Diffusion(noise_steps=20, img_size=8, c_in=1)
    with pytest.raises(TypeError, match="sample\\(\\) got labels, which ddpm.Diffusion does not take"):
        plain.sample(model, 2, labels=[0, 1], progress=False)
    with pytest.raises(ValueError, match="this model takes no labels: sample it with ddpm.Diffusion"):
        diffusion.sample(UNet(1, 1, width=8), 2, [0, 1], progress=False)


def test_a_loss_that_diverges_before_any_checkpoint_promises_none(in_tmp, capsys):
    """--lr 1e30: no checkpoint exists, so the message may not promise one, nor a --resume that would fail."""
    with pytest.raises(SystemExit):
        run_main(lambda: ddpm.main([*TINY, "--limit", "16", "--epochs", "1", "--lr", "1e30", "--log_every", "1"]))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the loss became non-finite at step")
    assert "no checkpoint was saved before it, so start again (--overwrite reuses the name DDPM_Unconditional)" in err
    assert "--resume" not in err and not (in_tmp / "models" / "DDPM_Unconditional" / "resume.pt").exists()
    ddpm.main([*TINY, "--limit", "16", "--epochs", "1", "--overwrite"])  # the way the message gives


def make_run(folder, c_in: int, conditional: bool = True):
    folder.mkdir(parents=True)
    model = (UNet_conditional(c_in=c_in, c_out=c_in, num_classes=2, width=8) if conditional
             else UNet(c_in, c_in, width=8))
    torch.save(model.state_dict(), folder / "ckpt.pt")
    (folder / "run.json").write_text(json.dumps({
        "model_args": dict(c_in=c_in, c_out=c_in, time_dim=256, width=8),
        "diffusion_args": dict(noise_steps=20, img_size=8, c_in=c_in), "class_names": ["a", "b"]}))


@pytest.mark.parametrize("c_in, mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_outputs_go_into_new_folders_in_the_runs_own_channels(in_tmp, c_in, mode):
    make_run(in_tmp / "run", c_in)
    sample.main(["--run", "run", "--n", "4", "--steps", "2", "--out", "samples/today/grid.png",
                 "--out_dir", "samples/today/each"])
    with Image.open(in_tmp / "samples" / "today" / "grid.png") as grid:
        assert grid.mode == mode
    files = sorted((in_tmp / "samples" / "today" / "each").glob("*.png"))
    assert len(files) == 4
    with Image.open(files[0]) as image:
        assert image.mode == mode and image.size == (8, 8)  # native size, no border


def test_an_output_that_cannot_be_written_is_refused_before_sampling(in_tmp, capsys, monkeypatch):
    make_run(in_tmp / "run", 1)
    (in_tmp / "taken").write_text("a file where a folder should be")
    monkeypatch.setattr(ddpm.Diffusion, "sample", lambda *a, **k: pytest.fail("sampled before checking the output"))
    for flags in (["--out", "taken/grid.png"], ["--out_dir", "taken/each"]):
        with pytest.raises(SystemExit):
            run_main(lambda: sample.main(["--run", "run", "--n", "2", *flags]))
        err = capsys.readouterr().err
        assert err.startswith("error: cannot write to 'taken") and err.count("\n") == 1, err


def test_a_grayscale_run_writes_grayscale_grids(in_tmp):
    write_images(in_tmp / "data" / "a", 8, mode="L")
    ddpm.main([*TINY[:-2], "--dataset_path", "data", "--epochs", "1", "--n_samples", "2", "--sample_steps", "2"])
    with Image.open(in_tmp / "results" / "DDPM_Unconditional" / "0.jpg") as grid:
        assert grid.mode == "L"


def test_evaluate_refuses_an_unwritable_report_or_readme_before_the_work(in_tmp, capsys, monkeypatch):
    make_run(in_tmp / "run", 1)
    monkeypatch.setattr(evaluate, "load_from_flags", lambda *a, **k: pytest.fail("loaded before checking the outputs"))
    (in_tmp / "taken").write_text("x")
    (in_tmp / "NOTES.md").write_text("no block here")
    for flags, message in ((["--out_dir", "taken"], "cannot write to 'taken'"),
                           (["--readme", "NOTES.md"], "NOTES.md has no '<!-- results:start -->'")):
        with pytest.raises(SystemExit):
            run_main(lambda: evaluate.main(["--run", "run", *flags]))
        assert message in capsys.readouterr().err
