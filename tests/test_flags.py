"""Every flag of sample.py checked against the run it is given, before any sampling: one the run or file cannot
honour, or that would change nothing, is refused in one line; one that departs from what the run learned is done
with a one-line warning. And the Python API's errors name its arguments, never the flags."""
import json
import math
import re

import pytest
import torch
from PIL import Image

import ddpm
import ddpm_conditional
import runs
import sample
from modules import UNet, UNet_conditional
from files import UserError
from runs import run_main


def network(conditional: bool, seed: int = 0):
    torch.manual_seed(seed)
    if conditional:
        return UNet_conditional(c_in=1, c_out=1, num_classes=3, width=8, input_skip=True)
    return UNet(1, 1, width=8, input_skip=True)


def write_run(folder, conditional: bool, ema: bool, sampling: dict | None = None):
    """A run folder laid out as training writes it: ckpt.pt (and ema_ckpt.pt), run.json at 8x8, T = 20."""
    folder.mkdir(parents=True)
    torch.save(network(conditional).state_dict(), folder / "ckpt.pt")
    if ema:
        torch.save(network(conditional, seed=1).state_dict(), folder / "ema_ckpt.pt")
    config = {"model_args": dict(c_in=1, c_out=1, time_dim=256, width=8, input_skip=True),
              "diffusion_args": dict(noise_steps=20, img_size=8, c_in=1),
              "sampling": sampling or dict(sampler="dpmpp2m", steps=4, **(dict(cfg_scale=3.0) if conditional else {})),
              "class_names": ["a", "b", "c"] if conditional else None}
    (folder / "run.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """cond: a conditional run with its EMA; plain: an unconditional one (no ema_ckpt.pt, as ddpm.py writes);
    ema_only: a folder with only ema_ckpt.pt; empty: a folder without weights; two files of several networks."""
    root = tmp_path_factory.mktemp("runs")
    write_run(root / "cond", conditional=True, ema=True)
    write_run(root / "plain", conditional=False, ema=False)
    (root / "ema_only").mkdir()
    torch.save(network(False).state_dict(), root / "ema_only" / "ema_ckpt.pt")
    (root / "empty").mkdir()
    plain = network(False).state_dict()
    torch.save({"model": plain, "optimizer": {"state": {}}, "epoch": 3}, root / "one_network.pt")  # a plain resume.pt
    torch.save({"model": plain, "ema_model": network(False, seed=1).state_dict()}, root / "two_networks.pt")
    return root


def refuse(runs_dir, tmp_path, capsys, monkeypatch, run: str, flags: list[str]) -> str:
    """Run sample.py and return its one `error:` line, after checking that it exited 2, sampled nothing and wrote
    no file."""
    monkeypatch.setattr(ddpm.Diffusion, "sample", lambda *a, **k: pytest.fail("sampled before the refusal"))
    out = tmp_path / "out"
    argv = ["--run", str(runs_dir / run), "--device", "cpu", *flags]
    if "--out" not in flags:
        argv += ["--out", str(out / "grid.png")]
    with pytest.raises(SystemExit) as e:
        run_main(lambda: sample.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    return err.strip()


@pytest.mark.parametrize("run, flags, message", [
    # --no_ema: only where the run or file holds a choice
    ("cond/ema_ckpt.pt", ["--no_ema"], r"--no_ema: '.*ema_ckpt.pt' holds one network, so there is no EMA to leave "
                                       r"out: give --run .*cond/ckpt.pt \(or --run .*cond --no_ema\)$"),
    ("cond/ckpt.pt", ["--no_ema"], r"--no_ema: '.*ckpt.pt' holds one network.*: drop --no_ema$"),
    ("one_network.pt", ["--no_ema", "--image_size", "8"], r"one_network.pt' holds one network"),
    ("plain", ["--no_ema"], r"--no_ema would change nothing: .*plain keeps no EMA weights \(no ema_ckpt.pt"),
    ("ema_only", ["--no_ema"], r"--no_ema: '.*ema_only' holds only EMA weights \(ema_ckpt.pt, no ckpt.pt\)"),
    # --run itself
    ("missing", [], r"'.*missing' does not exist: give a run folder \(models/<run>\) or a checkpoint file"),
    ("empty", [], r"'.*empty' holds no ckpt.pt: give a run folder"),
    # --image_size: a multiple of 8, before the file is read
    ("cond", ["--image_size", "20"], r"--image_size 20 must be a positive multiple of 8"),
    # --steps, --eta and --sampler
    ("cond", ["--steps", "20"], r"--steps 20: .*cond has T = 20 noise levels, so a chain has at most 19 steps"),
    ("cond", ["--sampler", "ddim", "--eta", "1.5"], r"--eta must be in \[0, 1\], got 1.5"),
    ("cond", ["--sampler", "dpmpp2m", "--eta", "0.5"], r"--eta is the ddim sampler's noise"),
    ("cond", ["--eta", "0.5"], r"--eta is the ddim sampler's noise, and .*cond recommends dpmpp2m"),
    # the conditional flags
    ("plain", ["--labels", "1"], r"unconditional run: --labels need a class-conditional one"),
    ("plain", ["--guidance_interval", "1", "5"], r"unconditional run: --guidance_interval need"),
    ("cond", ["--labels"], r"--labels expected at least one argument"),
    ("cond", ["--labels", "z"], r"--labels z: not a class of this run, whose classes are 0 a, 1 b, 2 c"),
    ("cond", ["--labels", "0", "1", "--n", "3"], r"--n 3 images do not split evenly over 2 labels"),
    ("cond", ["--guidance_interval", "5", "20"],
     r"--guidance_interval must be timesteps LO HI with 0 <= LO <= HI < 20"),
    ("cond", ["--cfg_scale", "1", "--guidance_interval", "5", "10"],
     r"--guidance_interval 5 10 would change nothing: the guidance scale is 1 \(given\)"),
    ("cond", ["--labels", "-1", "--cfg_scale", "2"], r"--cfg_scale would change nothing: --labels -1 draws only"),
    ("cond", ["--sampler", "ddim", "--steps", "2", "--guidance_interval", "5", "10"],
     r"--guidance_interval 5 10 would change nothing: the ddim sampler's 2 steps visit none of those timesteps "
     r"\(19, 1\)"),
    ("cond", ["--device", "nowhere"], r"unknown device 'nowhere'"),
    ("cond", ["--seed", "-1"], r"--seed must be at least 0, got -1"),
    # --out: a format PIL writes, for this run's channels
    ("cond", ["--out", "OUT/grid.xyz"], r"--out .*grid.xyz ends in '.xyz', which names no image format Pillow knows"),
    ("cond", ["--out", "OUT/grid"], r"--out .*grid has no extension to name the image format"),
    ("cond", ["--out", "OUT/grid.psd"], r"ends in '.psd', PSD, a format Pillow reads but does not write"),
    ("cond", ["--out", "OUT/grid.xbm"], r"Pillow cannot write 1-channel images as XBM"),
    ("cond", ["--out", "OUT"], r"--out .*OUT is a folder: give an image file's name"),
])
def test_a_flag_the_run_cannot_honour_is_refused_before_sampling(runs_dir, tmp_path, capsys, monkeypatch,
                                                                 run, flags, message):
    (tmp_path / "OUT").mkdir()
    flags = [f.replace("OUT", str(tmp_path / "OUT")) for f in flags]
    err = refuse(runs_dir, tmp_path, capsys, monkeypatch, run, flags)
    assert re.search(message, err), err
    assert not re.search(r"\w=", err), err  # the command line's words (--no_ema), not the API's (ema=False)


def test_a_warning_waits_until_no_flag_is_refused(runs_dir, tmp_path, capsys, monkeypatch):
    """--image_size other than the run's would warn; with a refused flag beside it, only the error is printed."""
    err = refuse(runs_dir, tmp_path, capsys, monkeypatch, "cond", ["--image_size", "16", "--steps", "50"])
    assert "--steps 50" in err and "warning" not in err


def test_another_image_size_than_the_runs_is_drawn_with_a_warning(runs_dir, tmp_path, capsys):
    """A UNet is convolutional: it draws 16x16 from a run that learned 8x8, but says that the run learned 8x8.
    The run's own size draws without a word."""
    argv = ["--run", str(runs_dir / "plain"), "--n", "1", "--steps", "1", "--device", "cpu"]
    sample.main([*argv, "--image_size", "16", "--out", str(tmp_path / "a.png"), "--out_dir", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "learned 8x8 images (run.json); --image_size 16 samples another size" in err, err
    with Image.open(tmp_path / "a" / "00000.png") as image:
        assert image.size == (16, 16)
    sample.main([*argv, "--image_size", "8", "--out", str(tmp_path / "b.png")])
    assert "warning" not in capsys.readouterr().err


def test_no_ema_chooses_where_the_file_holds_two_networks(runs_dir, tmp_path):
    """resume.pt and {"model": ..., "ema": ...} dicts hold a choice: --no_ema (ema=False) takes the other one."""
    model, _ = sample.load(runs_dir / "two_networks.pt", ema=False, device="cpu", image_size=8)
    torch.testing.assert_close(model.outc.weight, network(False).outc.weight)
    model, _ = sample.load(runs_dir / "two_networks.pt", device="cpu", image_size=8)
    torch.testing.assert_close(model.outc.weight, network(False, seed=1).outc.weight)
    sample.main(["--run", str(runs_dir / "two_networks.pt"), "--no_ema", "--image_size", "8", "--n", "1",
                 "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").is_file()
    sample.main(["--run", str(runs_dir / "cond"), "--no_ema", "--labels", "0", "--n", "1", "--steps", "1",
                 "--device", "cpu", "--out", str(tmp_path / "cond.png")])  # a run folder with both: ckpt.pt
    assert (tmp_path / "cond.png").is_file()


def test_a_runs_recommended_steps_beyond_its_chain_take_every_step(tmp_path, monkeypatch):
    """A run that recommends more steps than its T - 1 (the default of 50 on a short chain) samples all of them;
    only a --steps given beyond it is refused."""
    write_run(tmp_path / "short", conditional=False, ema=False, sampling=dict(sampler="ddim", steps=50))
    used = []
    monkeypatch.setattr(ddpm.Diffusion, "sample", lambda self, model, n, **kw: used.append(kw) or
                        torch.zeros(n, 1, 8, 8, dtype=torch.uint8))
    sample.main(["--run", str(tmp_path / "short"), "--n", "1", "--device", "cpu", "--out", str(tmp_path / "g.png")])
    assert used[-1]["sampler"] == "ddim" and used[-1]["steps"] == 19


# --------------------------------------------------------------------------- the Python API speaks Python

def api_error(call, kind=ValueError) -> str:
    with pytest.raises(kind) as e:
        call()
    message = str(e.value)
    assert "--" not in message, message  # no flag: the arguments of the call
    return message


@pytest.mark.parametrize("path, kwargs, message", [
    ("cond/ema_ckpt.pt", dict(ema=False), r"^ema=False: '.*ema_ckpt.pt' holds one network, so there is no EMA to "
                                          r"leave out: the run's other weights are '.*cond/ckpt.pt' \(or load the run "
                                          r"folder '.*cond' with ema=False\)$"),
    ("cond/ckpt.pt", dict(ema=False), r"holds one network.*: drop ema=False$"),
    ("ema_only", dict(ema=False), r"^ema=False: '.*ema_only' holds only EMA weights"),
    ("cond", dict(image_size=20),
     r"^image_size must be a positive multiple of 8 \(the UNet halves it 3 times\), got 20"),
    ("cond", dict(img_size=12.5), r"^img_size must be a positive multiple of 8 .* got 12.5"),
    ("cond", dict(image_size=True), r"^image_size must be .* got True"),
    ("cond", dict(image_size=16, img_size=24), r"^image_size=16 and img_size=24 are two names of one setting"),
    ("cond", dict(device="nowhere"), r"unknown device 'nowhere'"),
])
def test_load_names_its_arguments(runs_dir, path, kwargs, message):
    error = api_error(lambda: sample.load(runs_dir / path, **kwargs))
    assert re.search(message, error), error
    assert isinstance(sample.ArgumentError(error, ""), UserError)  # a ValueError, and a one-line error in scripts


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has the device")
def test_load_names_device_not_the_flag(runs_dir):
    assert "device=cpu" in api_error(lambda: sample.load(runs_dir / "cond", device="cuda"))


def test_a_path_is_named_what_it_is(runs_dir):
    """A missing run folder is not a 'checkpoint'; a folder handed to load_checkpoint is a folder."""
    error = api_error(lambda: sample.load(runs_dir / "no_such_run"), UserError)
    assert "checkpoint '" not in error and error.endswith("does not exist: give a run folder (models/<run>) or a "
                                                          "checkpoint file")
    assert "is a folder, not a checkpoint file" in api_error(lambda: runs.load_checkpoint(runs_dir / "cond"), UserError)
    missing = api_error(lambda: runs.load_checkpoint(runs_dir / "nothing.pt"), UserError)
    assert missing.endswith("nothing.pt' does not exist")


def test_recommended_refuses_a_path_that_does_not_exist(runs_dir):
    """Not the defaults for a typo: the run's settings are what it was asked for."""
    model, _ = sample.load(runs_dir / "cond", device="cpu")
    assert sample.recommended(runs_dir / "cond", model)["steps"] == 4
    assert "does not exist" in api_error(lambda: sample.recommended(runs_dir / "cnod", model), UserError)


def test_the_samplers_errors_name_their_arguments(runs_dir):
    model, diffusion = sample.load(runs_dir / "cond", device="cpu")
    plain_model, plain = sample.load(runs_dir / "plain", device="cpu")
    draw = lambda n=2, **kw: diffusion.sample(model, n, **{"labels": [0, 1], "progress": False, **kw})
    for call, message in [
        (lambda: draw(labels=None), "pass labels"),
        (lambda: draw(labels=[5, 5]), "labels must be classes 0..2"),
        (lambda: draw(labels=["zz", "a"]), "labels \\['zz'\\]: not class names"),
        (lambda: draw(labels=[0]), "got 1 labels for n=2"),
        (lambda: draw(steps=50, sampler="ddim"), "steps must be in \\[1, 19\\]"),
        (lambda: draw(sampler="ddim", eta=2.0), "eta must be in"),
        (lambda: draw(sampler="ddpm", eta=0.5), "eta is DDIM's noise"),
        (lambda: draw(sampler="euler"), "sampler must be one of"),
        (lambda: draw(guidance_interval=(5, 30)), "guidance_interval must be timesteps"),
        (lambda: draw(cfg_scale=math.nan), "cfg_scale must be a finite number"),
        (lambda: draw(n=0, labels=[]), "n must be a whole number of images"),
        (lambda: diffusion.sample(plain_model, 2, [0, 1], progress=False), "this model takes no labels"),
    ]:
        assert re.search(message, api_error(call)), message
    assert "sample() got labels" in api_error(lambda: plain.sample(model, 2, labels=[0, 1]), TypeError)
    assert "pass labels" in api_error(lambda: ddpm_conditional.class_labels(None, 2, model))
