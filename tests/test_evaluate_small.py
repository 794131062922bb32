"""evaluate.py on folders of any size, every figure with the images it rests on, and every flag checked against the run
before the work (#34). Tiny runs, trained once for the module; 20 samples of 5 steps; a one-epoch judge."""
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import ddpm
import ddpm_conditional
import evaluate
from conftest import write_images
from runs import run_main
from tools import report

TINY = ["--width", "8", "--image_size", "16", "--noise_steps", "20", "--epochs", "1", "--sample_every", "0",
        "--precision", "fp32", "--device", "cpu", "--batch_size", "64"]
EVAL = ["--n", "20", "--sampler", "ddim", "--steps", "5", "--judge_epochs", "1", "--device", "cpu"]
FOLDERS = {  # images per class sub-folder
    "one_each": [1, 1, 1],  # every image held out: nothing to train the judge on
    "lone_trained": [2, 1],  # one class left to train it on
    "two_each": [2, 2],
    "twelve_each": [12, 12, 12],  # the folder: 3 images held out in all
    "one_unseen": [5, 5, 1],  # a class whose only image is held out: the judge never sees it
    "many": [2] * 300,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder of runs (models/NAME) and their data (data/NAME), as evaluate.py finds them from where they trained."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        for name, sizes in FOLDERS.items():
            for c, k in enumerate(sizes):
                write_images(root / "data" / name / f"c{c:03d}", k, size=16, seed=c)
            ddpm_conditional.main([*TINY, "--dataset_path", f"data/{name}", "--run_name", name])
        ddpm_conditional.main([*TINY, "--dataset_path", "data/one_unseen", "--run_name", "no_drop",
                               "--label_drop", "0"])  # no unconditional model
        ddpm.main([*TINY, "--dataset_path", "data/twelve_each", "--run_name", "unconditional"])  # no EMA weights
        write_images(root / "data" / "flat", 12, size=16)
        ddpm.main([*TINY, "--dataset_path", "data/flat", "--run_name", "flat"])
    return root


@pytest.fixture
def at_runs(runs, monkeypatch, tmp_path):
    monkeypatch.chdir(runs)
    return tmp_path  # where each test's reports go


def no_work(monkeypatch, *stages: str) -> None:
    """Fail the test if evaluate.py reaches these stages: load (the model), real_images, train_judge, generate."""
    for stage in stages:
        monkeypatch.setattr(evaluate, stage, lambda *a, stage=stage, **k: pytest.fail(f"{stage} before the refusal"))


def refused(capsys, argv: list[str]) -> str:
    """evaluate.py's refusal: exit status 2 and one line on stderr (after any progress bar); returns it."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: evaluate.main(argv))
    err = capsys.readouterr().err
    line = err.split("\r")[-1]
    assert exit_info.value.code == 2 and err.count("\n") == 1 and line.startswith("error: "), err
    return line


def evaluated(capsys, out: str, run: str, *flags: str) -> tuple[dict, str]:
    report = evaluate.evaluate(evaluate.build_parser().parse_args(["--run", f"models/{run}", *EVAL, "--out_dir", out,
                                                                   *flags]))
    assert json.loads((Path(out) / "eval.json").read_text())["figures"] == report["figures"]
    return report, capsys.readouterr().out


def test_too_few_images_give_no_figure_and_no_crash():
    one, many = torch.randn(1, 8), torch.randn(50, 8)
    assert math.isnan(evaluate.frechet_distance(one, many))  # no covariance of one image
    assert math.isnan(evaluate.kernel_inception_distance(one, many))
    assert report.shown(-0.0078, ".4f", kid=True) == "~0" and report.shown(0.0134, ".4f", kid=True) == "0.0134"
    assert report.shown(None, ".2f") == "n/a" and report.shown(0.992, ".1f", percent=True) == "99.2%"
    figures = evaluate.rests_on(20, 3, 33, 20, [], 3, True, False)
    assert figures["judge_accuracy"] == {"held_out": 3, "minimum": evaluate.MIN_ACCURACY_IMAGES, "reliable": False,
                                         "why": "3 held-out images, needs >= 100"}
    assert figures["fd"]["why"] == f"20 generated and 3 held-out images, needs >= {evaluate.MIN_FD_IMAGES}"
    enough = evaluate.rests_on(1000, 500, 4500, 1000, [], 10, False, True)
    assert all(f["reliable"] for k, f in enough.items() if k != "inception_fid")  # the digits at the default n
    assert enough["class_entropy"]["minimum"] == 100 and not enough["inception_fid"]["reliable"]
    assert "not the samples' n" in evaluate.rests_on(1000, 500, 300, 300, [], 10, False, False)["floor_fd"]["why"]


def test_a_cached_judge_of_other_epochs_or_classes_is_trained_again(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (8, 1, 16, 16), generator=g, dtype=torch.uint8), torch.tensor([0, 1] * 4)
    assert evaluate.cached_judge(tmp_path, x, y, x[:2], y[:2], 1, 2)[0].epochs == 1
    stamp = (tmp_path / "judge.pt").stat().st_mtime_ns
    assert evaluate.cached_judge(tmp_path, x, y, x[:2], y[:2], None, 2)[0].epochs == 1  # no --judge_epochs: cached
    assert (tmp_path / "judge.pt").stat().st_mtime_ns == stamp
    assert evaluate.cached_judge(tmp_path, x, y, x[:2], y[:2], 2, 2)[0].epochs == 2  # --judge_epochs 2: trained again
    judge, _ = evaluate.cached_judge(tmp_path, x, y, x[:2], y[:2], None, 3)  # a class more: trained again
    assert judge.head[1].out_features == 3 and judge.epochs == evaluate.JUDGE_EPOCHS


def test_folders_whose_classes_hold_one_image_are_refused_before_the_judge(at_runs, capsys, monkeypatch):
    no_work(monkeypatch, "train_judge", "generate")
    for run in ("one_each", "lone_trained"):
        assert "the judge needs training images of 2 classes or more" in refused(
            capsys, ["--run", f"models/{run}", *EVAL, "--out_dir", str(at_runs)])


def test_a_flat_folder_is_refused_before_the_model_is_loaded(at_runs, capsys, monkeypatch):
    no_work(monkeypatch, "load_from_flags", "real_images", "train_judge", "generate")
    line = refused(capsys, ["--run", "models/flat", *EVAL, "--out_dir", str(at_runs)])
    assert "at least 2 classes" in line and "trained on one (flat)" in line


def test_every_figure_says_how_many_images_it_rests_on(at_runs, capsys):
    """The issue's folder: 12 images per class, 3 held out in all. Every figure is kept, marked unreliable with its
    counts in the table, eval.json and the README block; no negative KID is printed."""
    readme = at_runs / "R.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    report, out = evaluated(capsys, str(at_runs), "twelve_each", "--readme", str(readme))
    assert "judge accuracy on the 3 held-out real images: " in out
    assert "(unreliable: 3 held-out images, needs >= 100)" in out
    assert "real-vs-real floor (20 training images against the 3 held-out): FD " in out
    assert "each setting: 20 generated images, against the 3 held-out real images" in out
    row = next(line for line in out.splitlines() if line.startswith("ddim-5 cfg"))
    assert re.search(r"acc +[\d.]+%\?  FD +[\d.]+\?  KID +(~0|[\d.]+)\?  NN ratio [\d.]+\?", row), row
    assert not re.search(r"KID +-", out)
    assert report["figures"]["fd"] == {"generated": 20, "held_out": 3, "minimum": evaluate.MIN_FD_IMAGES,
                                       "reliable": False, "why": "20 generated and 3 held-out images, needs >= 256"}
    assert report["held_out"] == 3 and report["train"] == 33 and report["figures"]["floor_fd"]["training"] == 20
    text = readme.read_text()
    assert "Judge accuracy on the 3 held-out real images: **" in text and "(unreliable: 3 held-out images" in text
    assert "Each setting: 20 generated images" in text and "? unreliable: accuracy: 20 generated images" in text
    assert re.search(r"\| ddim-5 \| 3 \| [\d.]+%\? \| [\d.]+\? \| (~0|[\d.]+)\? \|", text)


@pytest.mark.parametrize("run", ["two_each", "many"])
def test_folders_of_two_images_per_class_and_of_hundreds_of_classes_are_evaluated(at_runs, capsys, run):
    """Two classes of 2 images: 2 held out, 2 to train on. 300 classes of 2 with 20 samples: 280 classes drawn none
    (no accuracy of theirs), a grid of the 20 in class order."""
    report, out = evaluated(capsys, str(at_runs), run)
    classes = len(FOLDERS[run])
    assert report["held_out"] == report["train"] == classes and sum(report["samples_per_class"]) == 20
    per_class = report["results"][0]["accuracy_per_class"]
    assert [c for c, a in enumerate(per_class) if a is not None] == [c for c, k in
                                                                     enumerate(report["samples_per_class"]) if k]
    assert report["figures"]["judge_accuracy"]["reliable"] == (classes >= evaluate.MIN_ACCURACY_IMAGES)
    assert report["results"][0]["fd"] is not None and report["floor"]["fd"] is not None
    assert (at_runs / "eval_samples.png").is_file() and (at_runs / "eval_nearest.png").is_file()


def test_a_class_the_judge_never_saw_is_named_and_exact_is_refused_for_it(at_runs, capsys, monkeypatch):
    report, out = evaluated(capsys, str(at_runs), "one_unseen", "--exact", "--unconditional")
    assert "the judge never saw 1 of the 3 classes (no training image)" in out
    assert report["classes_without_training_images"] == ["c002"] and len(report["results"]) == 2  # model, exact
    no_work(monkeypatch, "train_judge", "generate")
    line = refused(capsys, ["--run", "models/one_unseen", *EVAL, "--out_dir", str(at_runs), "--exact"])
    assert "--exact draws each class from its training images, and 1 class(es) asked for have none (c002)" in line


@pytest.mark.parametrize("run, flags, message", [
    ("no_drop", ["--unconditional"], "trained with --label_drop 0: drop --unconditional"),
    ("no_drop", ["--cfg_scale", "2"], "trained with --label_drop 0: give --cfg_scale 1"),
    ("no_drop", ["--sweep", "cfg"], "--sweep cfg sweeps the guidance scale, and models/no_drop trained with "
                                    "--label_drop 0"),
    ("unconditional", ["--sweep", "cfg"], "models/unconditional is unconditional"),
    ("twelve_each", ["--sweep", "cfg", "--unconditional"], "--unconditional asks for no class"),
    ("unconditional", ["--no_ema"], "models/unconditional has no ema_ckpt.pt"),
    ("twelve_each/ckpt.pt", [], "is a file: give its run folder"),
    ("twelve_each", ["--readme_block", "other"], "--readme_block other names a block of the --readme file")])
def test_flags_the_run_cannot_honour_are_refused_before_the_work(at_runs, capsys, monkeypatch, run, flags, message):
    no_work(monkeypatch, "real_images", "train_judge", "generate")
    assert message in refused(capsys, ["--run", f"models/{run}", *EVAL, "--out_dir", str(at_runs), *flags])


def test_files_and_packages_the_flags_need_are_checked_before_the_work(runs, tmp_path, capsys, monkeypatch):
    """Standard FID's weights and packages, and the README's assets/ folder: refused before the model is loaded."""
    monkeypatch.chdir(tmp_path)
    no_work(monkeypatch, "load_from_flags", "real_images", "train_judge", "generate")
    argv = ["--run", str(runs / "models" / "twelve_each"), *EVAL]
    assert "--inception_weights 'missing.pth' does not exist" in refused(capsys, argv + ["--inception_weights",
                                                                                          "missing.pth"])
    (tmp_path / "weights.pth").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    assert "pip install torchmetrics torch-fidelity" in refused(capsys, argv + ["--inception_weights", "weights.pth"])
    (tmp_path / "R.md").write_text("<!-- results:start -->\n<!-- results:end -->\n")
    (tmp_path / "assets").write_text("a file where the figures' folder goes")
    assert "cannot write to 'assets'" in refused(capsys, argv + ["--readme", "R.md"])


def test_a_sweep_is_cut_to_what_the_run_can_do(at_runs, capsys, monkeypatch):
    """--sweep all of an unconditional run sweeps the steps alone; steps past the run's T are left out, with a note."""
    monkeypatch.setattr(evaluate, "STEPS_SWEEP", [("ddim", 5), ("ddim", 50)])
    report, out = evaluated(capsys, str(at_runs), "unconditional", "--sweep", "all", "--n", "10")
    assert "note: --sweep all sweeps the samplers and steps only: models/unconditional is unconditional" in out
    assert "note: --sweep all leaves out 50 steps: this run has 20 noise steps, so at most 19" in out
    assert [evaluate.setting_name(r) for r in report["results"]] == ["ddim-5", "ddpm-all"]
    assert report["ema"] is False and report["figures"]["class_entropy"]["minimum"] == 30


def test_a_run_without_label_dropout_is_scored_unguided(at_runs, capsys):
    """--cfg_scale 1, or <= 0 (treated as 1), asks nothing of the unconditional model that --label_drop 0 left out."""
    report, _ = evaluated(capsys, str(at_runs), "no_drop", "--cfg_scale", "0", "--n", "6")
    assert report["results"][0]["cfg_scale"] == 0


def test_the_minimums_the_docs_state_are_evaluates():
    """docs/results.md's table of minimums is written by hand: it must say what evaluate.py applies."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    rows = {cells[0]: cells[2] for cells in (line.strip("|").split("|") for line in text.splitlines()
                                              if line.startswith("| ")) for cells in [[c.strip() for c in cells]]}
    assert rows["judge accuracy"] == rows["accuracy"] == str(evaluate.MIN_ACCURACY_IMAGES)
    assert rows["FD"] == f"{evaluate.MIN_FD_IMAGES} each" and rows["KID"] == f"{evaluate.MIN_KID_IMAGES} each"
    assert rows["NN ratio"] == f"{evaluate.MIN_NN_IMAGES} each"
    assert rows["class entropy"] == f"{evaluate.MIN_ENTROPY_IMAGES_PER_CLASS} per class"
    assert rows["Inception FID"] == f"{evaluate.MIN_INCEPTION_IMAGES:,} each"


def test_a_guidance_interval_that_changes_nothing_is_refused_as_sample_py_refuses_it(at_runs, capsys, monkeypatch):
    """Guidance 1 does not guide: an interval for it would be ignored while 1000 samples are drawn and scored."""
    no_work(monkeypatch, "real_images", "train_judge", "generate")
    argv = ["--run", "models/twelve_each", *EVAL, "--cfg_scale", "1", "--guidance_interval", "5", "10"]
    assert "--guidance_interval 5 10 would change nothing: the guidance scale is 1 (given)" in refused(capsys, argv)
