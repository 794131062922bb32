import json

import pytest
import torch

import ddpm
import ddpm_conditional
import evaluate
from conftest import write_images
from files import UserError
from tools.exact import ExactDenoiser
from utils import load_dataset


def test_frechet_distance_of_gaussians_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g)
    b = 1 + 2 * torch.randn(20000, 4, generator=g)  # mean 1, std 2 in each of 4 dimensions
    # ||mu_a - mu_b||^2 + sum (s_a - s_b)^2 = 4 * 1 + 4 * 1
    assert evaluate.frechet_distance(a, b) == pytest.approx(8.0, rel=0.05)
    assert evaluate.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_kid_is_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 8, generator=g), torch.randn(1000, 8, generator=g)
    assert abs(evaluate.kernel_inception_distance(a, b)) < 0.01
    assert evaluate.kernel_inception_distance(a, b + 1) > 0.1


@pytest.fixture(scope="module")
def digits_and_judge():
    """The test-sized judge: 3 epochs on the 4,500 training digits at 16x16."""
    x_train, y_train, x_held, y_held, _ = load_dataset("digits")
    x_train, x_held = evaluate.as_trained(x_train, 16), evaluate.as_trained(x_held, 16)
    judge, accuracy = evaluate.train_judge(x_train, y_train, x_held, y_held, epochs=3)
    return x_train, y_train, x_held, y_held, judge, accuracy


def test_judge_learns_the_digits(digits_and_judge):
    *_, accuracy = digits_and_judge
    assert accuracy >= 0.93  # the full 15-epoch judge reaches ~98-99%


def test_real_vs_real_is_near_the_floor_and_noise_is_far(digits_and_judge):
    x_train, _, x_held, _, judge, _ = digits_and_judge
    held = judge.embed(x_held)[0]
    floor = evaluate.frechet_distance(judge.embed(x_train[:500])[0], held)
    other_real = evaluate.frechet_distance(judge.embed(x_train[500:1000])[0], held)
    noise = torch.randint(0, 256, x_held.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noise_fd = evaluate.frechet_distance(judge.embed(noise)[0], held)
    assert other_real < 3 * floor  # two real-vs-real estimates agree (500 images each: a noisy estimate)
    assert noise_fd > 20 * max(floor, other_real)


def test_memorisation_check_flags_copies_of_training_images(digits_and_judge):
    x_train, _, x_held, *_ = digits_and_judge
    copies = evaluate.memorisation(x_train[:200], x_train, x_held)
    assert copies["memorising"] and copies["nn_ratio"] == pytest.approx(0, abs=1e-6)
    fresh = evaluate.memorisation(x_held[:200], x_train, x_held)
    assert not fresh["memorising"] and fresh["nn_ratio"] == pytest.approx(1, abs=0.15)


def test_nearest_pairs_put_each_samples_nearest_training_image_under_it(digits_and_judge):
    x_train, *_ = digits_and_judge
    g = torch.Generator().manual_seed(0)
    picked = torch.randperm(len(x_train), generator=g)[:12]
    noisy = (x_train[picked].int() + torch.randint(-20, 21, x_train[picked].shape, generator=g)).clamp(0, 255)
    pairs = evaluate.nearest_pairs(noisy.to(torch.uint8), x_train, per_row=10)
    assert pairs.shape == (24, *x_train.shape[1:])  # 10 samples, their 10 nearest, 2 samples, their 2 nearest
    assert torch.equal(pairs[:10], noisy[:10].to(torch.uint8)) and torch.equal(pairs[10:20], x_train[picked[:10]])
    assert torch.equal(pairs[22:], x_train[picked[10:]])


def test_class_entropy():
    assert evaluate.class_entropy(torch.arange(10).repeat(5), 10) == pytest.approx(1.0)
    assert evaluate.class_entropy(torch.zeros(50, dtype=torch.long), 10) == 0.0


def test_exact_denoiser_recovers_the_noise_and_its_samples_are_training_images():
    images = torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    labels = torch.tensor([0, 0, 0, 0, 0, 1])  # class 1 is a single image
    diffusion = ddpm_conditional.Diffusion(img_size=8, c_in=1)
    exact = ExactDenoiser(images, labels, diffusion, num_classes=2)
    t = torch.tensor([500, 900])
    x_t, eps = diffusion.noise_images(images[5:].float().expand(2, -1, -1, -1) / 127.5 - 1, t)
    # Given its class, the posterior of x_0 is that one image: the noise is recovered exactly.
    assert torch.allclose(exact(x_t, t, torch.tensor([1, 1])), eps, atol=1e-4)
    assert not torch.allclose(exact(x_t, t, torch.tensor([-1, -1]))[1], eps[1], atol=1e-2)  # all 6 images at t=900

    samples = diffusion.sample(exact, 6, labels=torch.tensor([0, 0, 0, 1, 1, 1]), cfg_scale=3, sampler="ddim",
                               steps=20, progress=False)
    distances = torch.cdist(samples.flatten(1).float(), images.flatten(1).float())
    assert distances.min(1).values.max() < 20  # each sample is a training image, up to uint8 rounding
    assert (labels[distances.argmin(1)] == torch.tensor([0, 0, 0, 1, 1, 1])).all()  # of the asked class


def test_sample_labels_follow_the_held_out_class_mix():
    balanced = torch.arange(10).repeat(50)  # the digits' held-out labels
    for n in (1, 7, 25, 1000):  # balanced data: the labels cycle through the classes, as before the mix
        assert torch.equal(evaluate.class_mix(balanced, n, 10), torch.arange(10).repeat(n // 10 + 1)[:n])
    emoji_like = torch.tensor([0] * 16 + [1] * 226 + [2] * 8)  # one big class, one very small
    labels = evaluate.class_mix(emoji_like, 1000, 3)
    assert torch.bincount(labels).tolist() == [64, 904, 32]  # the held-out shares, 16:226:8
    assert labels[:6].tolist() == [0, 1, 2, 0, 1, 2]  # the grid's first rows hold every class
    assert torch.bincount(evaluate.class_mix(torch.tensor([0] * 97 + [1] * 2 + [2]), 10, 3)).tolist() == [8, 1, 1]
    # a class without held-out images (a model with more classes than the data) still gets a sample at n >= K
    assert torch.bincount(evaluate.class_mix(torch.tensor([0, 0, 1]), 9, 4)).tolist() == [4, 3, 1, 1]
    assert len(evaluate.class_mix(emoji_like, 2, 3)) == 2


def test_fd_of_a_wrong_class_mix_is_not_the_floor(digits_and_judge):
    """Why the labels follow the data: real images in another class mix than the held-out ones score far above the
    floor, so uniform labels on an imbalanced dataset would count the mix as bad samples."""
    x_train, y_train, x_held, y_held, judge, _ = digits_and_judge
    held = torch.cat([torch.nonzero(y_held == c).flatten()[:50 if c == 0 else 5] for c in range(10)])  # 50% zeros
    held_feats = judge.embed(x_held[held])[0]
    uniform = torch.cat([torch.nonzero(y_train == c).flatten()[:50] for c in range(10)])
    mixed = torch.cat([torch.nonzero(y_train == c).flatten()[:450 if c == 0 else 50] for c in range(10)])
    fd_uniform = evaluate.frechet_distance(judge.embed(x_train[uniform])[0], held_feats)
    fd_mixed = evaluate.frechet_distance(judge.embed(x_train[mixed])[0], held_feats)
    assert fd_uniform > 3 * fd_mixed


def test_evaluate_samples_an_imbalanced_folder_in_its_class_mix(in_tmp):
    """A folder run of 30 + 10 images: 3 + 1 held out, so 3:1 of the samples (at least one of each class)."""
    write_images(in_tmp / "data" / "big", 30, seed=0)
    write_images(in_tmp / "data" / "small", 10, seed=1)
    ddpm_conditional.main(["--dataset_path", "data", "--width", "8", "--image_size", "16", "--noise_steps", "20",
                           "--epochs", "1", "--sample_every", "0", "--precision", "fp32"])
    report = evaluate.evaluate(evaluate.build_parser().parse_args(
        ["--run", "models/DDPM_conditional", "--n", "20", "--sampler", "ddim", "--steps", "5", "--judge_epochs", "1"]))
    assert report["samples_per_class"] == [15, 5]
    per_class = report["results"][0]["accuracy_per_class"]
    assert report["results"][0]["accuracy"] == pytest.approx((15 * per_class[0] + 5 * per_class[1]) / 20)
    assert (in_tmp / "results" / "DDPM_conditional" / "eval_samples.png").is_file()


def test_evaluate_end_to_end_writes_report_plots_and_readme(in_tmp, monkeypatch):
    monkeypatch.setattr(evaluate, "CFG_SWEEP", [1, 3.5])
    monkeypatch.setattr(evaluate, "STEPS_SWEEP", [("ddim", 5), ("dpmpp2m", 5), ("ddpm", 5), ("ddpm", None)])
    # the digits recipe: guidance 3.5 at the noisiest 60% of the steps, t = 8..19 of 20, every setting but the cfg sweep's
    ddpm_conditional.main(["--width", "8", "--image_size", "16", "--noise_steps", "20", "--limit", "64",
                           "--epochs", "1", "--sample_every", "0", "--precision", "fp32"])
    readme = in_tmp / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    report = evaluate.evaluate(evaluate.build_parser().parse_args(
        ["--run", "models/DDPM_conditional", "--n", "20", "--sampler", "ddim", "--steps", "5", "--sweep", "all", "--readme", str(readme),
         "--judge_epochs", "1", "--exact"]))
    saved = json.loads((in_tmp / "results" / "DDPM_conditional" / "eval.json").read_text())
    assert saved["results"][0]["accuracy"] == report["results"][0]["accuracy"]
    assert saved["samples_per_class"] == [2] * 10  # 64 stratified digits: a balanced held-out split
    names = [evaluate.setting_name(r) for r in saved["results"]]
    model_names = ["ddim-5 cfg 3.5", "ddim-5 cfg 1", "dpmpp2m-5 cfg 3.5", "ddpm-5 cfg 3.5", "ddpm-all cfg 3.5"]
    assert names == [f"{n} t 8-19" for n in model_names] + [f"{n} t 8-19 exact" for n in model_names]
    assert [r["nfe"] for r in saved["results"][:5]] == [5, 5, 5, 5, 19]  # network evaluations, guided or not
    # The exact denoiser reproduces training images, and the memorisation check sees it.
    assert all(r["memorising"] for r in saved["results"][5:])
    assert {"fd", "kid", "nn_ratio", "memorising", "seconds_per_image"} <= set(saved["results"][0])
    assert "off" in saved["inception_fid"]
    for f in ("sweep_cfg.png", "sweep_steps.png", "sweep_steps_grids.png", "eval_samples.png"):
        assert (in_tmp / "results" / "DDPM_conditional" / f).is_file()
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- results:end -->\ntail\n") and "| ddim-5 | 3.5 (t 8-19) |" in text
    assert "| ddim-5 (exact denoiser) | 3.5 (t 8-19) |" in text and "--sweep all --sampler ddim --steps 5 --guidance_interval 8 19 --exact" in text
    # the frontier: each sampler's accuracy, FD and time per image at each count of network evaluations
    frontier = text[text.index("| sampler | 5 | 19 |"):].splitlines()
    first = {r["sampler"]: r for r in saved["results"][:5] if r["steps"] == 5 and r["cfg_scale"] == 3.5}
    assert frontier[2].startswith(f"| ddpm | {100 * first['ddpm']['accuracy']:.1f}%, {first['ddpm']['fd']:.2f}, ")
    assert frontier[3].startswith("| ddim | ") and frontier[3].endswith(" s | - |")
    assert frontier[4].startswith("| dpmpp2m | ")
    assert (in_tmp / "assets" / "sweep_cfg.png").is_file()
    assert (in_tmp / "models" / "DDPM_conditional" / "judge.pt").is_file()  # cached for the next call
    assert (in_tmp / "results" / "DDPM_conditional" / "eval_nearest.png").is_file()
    # what training took, from resume.pt: 64 images in batches of 64, one epoch
    assert saved["training"]["steps"] == 1 and saved["training"]["minutes"] > 0
    assert saved["training"]["device"] == "cpu" and saved["training"]["precision"] == "fp32"
    assert "The run trained 1 steps in" in text and "(cpu, fp32)" in text

    args = ["--run", "models/DDPM_conditional", "--n", "20", "--sampler", "ddim", "--steps", "5", "--judge_epochs", "1"]
    interval = evaluate.evaluate(evaluate.build_parser().parse_args(args + ["--guidance_interval", "10", "19"]))
    assert evaluate.setting_name(interval["results"][0]) == "ddim-5 cfg 3.5 t 10-19"
    with pytest.raises(UserError, match="guidance_interval"):
        evaluate.evaluate(evaluate.build_parser().parse_args(args + ["--guidance_interval", "10", "20"]))
    # the unconditional model that label dropout trained, scored as an unconditional run is
    unguided = evaluate.evaluate(evaluate.build_parser().parse_args(args + ["--unconditional"]))
    assert evaluate.setting_name(unguided["results"][0]) == "ddim-5"
    assert 0 <= unguided["results"][0]["class_entropy"] <= 1 and "accuracy" not in unguided["results"][0]
    with pytest.raises(UserError, match="--unconditional asks for none"):
        evaluate.evaluate(evaluate.build_parser().parse_args(args + ["--unconditional", "--cfg_scale", "2"]))
    with pytest.raises(UserError, match="--steps must be at least 0, got -3"):
        evaluate.evaluate(evaluate.build_parser().parse_args(args + ["--steps", "-3"]))
    with pytest.raises(UserError, match="--steps 5000: models/DDPM_conditional has T = 20 noise levels, so a chain "
                                        "has at most 19 steps"):
        evaluate.evaluate(evaluate.build_parser().parse_args(args + ["--steps", "5000"]))


def test_evaluate_unconditional_run_has_no_guidance_and_reports_class_entropy(in_tmp, monkeypatch):
    monkeypatch.setattr(evaluate, "STEPS_SWEEP", [("ddim", 5), ("ddpm", 5)])
    ddpm.main(["--width", "8", "--image_size", "16", "--noise_steps", "20", "--limit", "64", "--epochs", "1",
               "--sample_every", "0", "--precision", "fp32"])
    readme = in_tmp / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    report = evaluate.evaluate(evaluate.build_parser().parse_args(
        ["--run", "models/DDPM_Unconditional", "--n", "20", "--sampler", "ddim", "--steps", "5", "--sweep", "all", "--readme", str(readme),
         "--judge_epochs", "1"]))
    assert [evaluate.setting_name(r) for r in report["results"]] == ["ddim-5", "ddpm-5", "ddpm-all"]
    assert all(r["cfg_scale"] is None and 0 <= r["class_entropy"] <= 1 for r in report["results"])
    assert "| ddim-5 | - |" in readme.read_text()
    assert "--readme README.md" in readme.read_text() and "](assets/eval_samples.png)" in readme.read_text()
    # a block of a page in docs/: figures prefixed with the block's name, in the one assets/ folder, linked from
    # the page's folder; the command names the page
    page = in_tmp / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text("<!-- results:start -->\nkept\n<!-- results:end -->\n<!-- other:start -->\n<!-- other:end -->\n")
    evaluate.evaluate(evaluate.build_parser().parse_args(
        ["--run", "models/DDPM_Unconditional", "--n", "20", "--sampler", "ddim", "--steps", "5", "--readme", str(page),
         "--readme_block", "other", "--judge_epochs", "1"]))
    text = page.read_text()
    assert "kept" in text and "--readme_block other --readme docs/page.md" in text
    assert "![eval_samples.png](../assets/other_eval_samples.png)" in text
    assert (in_tmp / "assets" / "other_eval_nearest.png").is_file()
    assert (in_tmp / "results" / "DDPM_Unconditional" / "sweep_steps.png").is_file()
    for flag, value in (("--cfg_scale", "3"), ("--unconditional", None)):
        with pytest.raises(UserError, match="is unconditional|unconditional run already"):
            evaluate.evaluate(evaluate.build_parser().parse_args(
                ["--run", "models/DDPM_Unconditional", flag, *([value] if value else [])]))
