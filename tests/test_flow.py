"""Flow matching (flow.py) beside DDPM, and the training levers (EDM's noise levels, immiscible noise, Adam's beta2):
the path and its target, every sampler on an exact model, tiny runs of each objective that train, resume bit-exactly
and sample, and the combinations that do not apply, refused in one line."""
import itertools
import json
import math

import pytest
import torch

import ddpm
import ddpm_conditional
import evaluate
import flow
import sample
from files import UserError
from modules import UNet
from tools.exact import ExactDenoiser

TINY = ["--width", "8", "--image_size", "16", "--precision", "fp32", "--limit", "32", "--batch_size", "8",
        "--sample_every", "0", "--lr_schedule", "constant", "--warmup", "2"]


def test_the_path_runs_from_data_to_noise_and_the_target_is_its_velocity():
    d = flow.Flow(img_size=4, c_in=1)
    x0, eps = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 2 - 1, torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    x_t, same = d.noise_images(x0, t, eps)
    assert same is eps
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], eps[2])
    h = 1e-6  # d x_t / dt, by a finite difference
    slope = (d.noise_images(x0, t + h, eps)[0] - d.noise_images(x0, t - h, eps)[0]) / (2 * h)
    torch.testing.assert_close(d.target(x0, eps, t), slope)


def test_t_is_logit_normal():
    torch.manual_seed(0)
    t = flow.Flow(img_size=4).sample_timesteps(50_000)
    assert 0 < t.min() and t.max() < 1
    logit = (t / (1 - t)).log()
    assert abs(logit.mean().item()) < 0.02 and abs(logit.std().item() - 1) < 0.02


def samplers():
    return [(ddpm_conditional.Diffusion, s) for s in ddpm.SAMPLERS] + \
        [(ddpm_conditional.Flow, s) for s in flow.SAMPLERS]


@pytest.mark.parametrize("kind,sampler", samplers())
def test_every_sampler_of_either_objective_lands_on_the_data_with_the_exact_model(kind, sampler):
    """With the exact denoiser of a few images (evaluate.py --exact), each sample is one of the training images of
    its class: the samplers and the guidance add no error of their own."""
    images = torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    classes = torch.tensor([0, 0, 0, 1, 1, 1])
    d = kind(img_size=8, c_in=1)
    labels = torch.tensor([0, 1] * 4)
    torch.manual_seed(1)
    out = d.sample(ExactDenoiser(images, classes, d, num_classes=2), 8, labels, cfg_scale=2, sampler=sampler,
                   steps=25 if sampler == "heun" else 50, progress=False)
    distance = (out[:, None].float() - images[None].float()).abs().amax(dim=(2, 3, 4))  # sample x image
    nearest = distance.argmin(1)
    # the image itself: to the rounding of a level for flow, which ends at t = 0; DDPM's chains end at timestep 0,
    # where x keeps noise of std 0.01 (1.3 levels)
    assert distance.min(1).values.max() <= (1 if kind is ddpm_conditional.Flow else 4)
    assert torch.equal(classes[nearest], labels)


def test_guidance_interval_is_in_1000_t_for_flow():
    images = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    d = ddpm_conditional.Flow(img_size=8, c_in=1)
    model = ExactDenoiser(images, torch.tensor([0, 0, 1, 1]), d, num_classes=2)
    x, y = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    for t, guided in ((0.3, False), (0.7, True)):
        time = torch.full((2,), 1000 * t, dtype=torch.float64)
        cond = model(x, time, y)
        out = d.network_output(model, x, time, y, cfg_scale=3, guidance_interval=(500, 999))
        assert torch.allclose(out.double(), cond) != guided


# --------------------------------------------------------------------------- tiny runs of each objective

def train(script, argv):
    script.main([*TINY, *argv])


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_a_tiny_run_of_each_objective_trains_resumes_bit_exactly_and_samples(tmp_path, monkeypatch, objective):
    for folder, epoch_runs in (("a", [["--epochs", "2"]]), ("b", [["--epochs", "1"], ["--epochs", "2", "--resume"]])):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        for argv in epoch_runs:
            train(ddpm_conditional, ["--objective", objective, "--run_name", "r", *argv])
    a, b = (torch.load(tmp_path / f / "models" / "r" / "ema_ckpt.pt", weights_only=True) for f in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((tmp_path / "b" / "models" / "r" / "run.json").read_text())
    assert config["args"]["objective"] == objective
    assert config["diffusion_args"].get("objective", "ddpm") == objective
    model, diffusion = sample.load(tmp_path / "b" / "models" / "r")
    assert isinstance(diffusion, ddpm_conditional.Flow if objective == "flow" else ddpm_conditional.Diffusion)
    assert sample.recommended(tmp_path / "b" / "models" / "r", model)["sampler"] == \
        ("heun" if objective == "flow" else "dpmpp2m")
    for sampler in flow.SAMPLERS if objective == "flow" else ddpm.SAMPLERS:
        sample.main(["--run", str(tmp_path / "b" / "models" / "r"), "--sampler", sampler, "--steps", "3", "--n", "10",
                     "--out", str(tmp_path / f"{sampler}.png")])
        assert (tmp_path / f"{sampler}.png").is_file()


def test_an_unconditional_flow_run_samples_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(ddpm, ["--objective", "flow", "--epochs", "1"])
    model, diffusion = sample.load("models/DDPM_Unconditional")
    assert type(diffusion) is flow.Flow
    sample.main(["--run", "models/DDPM_Unconditional", "--n", "4", "--sampler", "euler", "--steps", "2"])
    assert (tmp_path / "samples.png").is_file()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny flow run and a tiny DDPM run."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        for objective in ("flow", "ddpm"):
            train(ddpm_conditional, ["--objective", objective, "--epochs", "1", "--run_name", objective])
    return root / "models"


def test_evaluate_scores_a_flow_run_at_its_sampler_and_sweeps_the_flow_samplers(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(runs.parent)  # where the run trained: evaluate.py reads its data from there
    monkeypatch.setattr(evaluate, "FLOW_SWEEP", [("euler", 3), ("heun", 2)])  # a short sweep, as --sweep steps runs it
    report = evaluate.evaluate(evaluate.build_parser().parse_args(
        ["--run", "models/flow", "--n", "20", "--judge_epochs", "1", "--sweep", "steps", "--exact",
         "--out_dir", str(tmp_path)]))
    settings = [(r["denoiser"], r["sampler"], r["steps"], r["nfe"]) for r in report["results"]]
    assert settings == [(denoiser, *s) for denoiser in ("model", "exact")
                        for s in (("heun", 8, 15), ("euler", 3, 3), ("heun", 2, 3))]  # the run's own setting first
    exact = [r for r in report["results"] if r["denoiser"] == "exact"]
    assert exact[0]["nn_ratio"] < 0.01  # at 8 Heun steps the exact velocity lands on training images: memorisation
    with pytest.raises(UserError, match="--sampler ddpm does not apply to models/flow, a flow-matching run"):
        evaluate.evaluate(evaluate.build_parser().parse_args(["--run", "models/flow", "--sampler", "ddpm"]))


@pytest.mark.parametrize("objective,argv,message", [
    ("flow", ["--sampler", "ddim"], "--sampler ddim does not apply to .*flow, a flow-matching run: use euler or heun"),
    ("flow", ["--steps", "0"], "--steps 0 \\(every step\\) is the DDPM chain's"),
    ("ddpm", ["--sampler", "heun"], "--sampler heun does not apply to .*ddpm, a DDPM run: use ddpm or ddim or dpmpp2m"),
])
def test_a_sampler_of_the_other_objective_is_refused_in_one_line(runs, tmp_path, objective, argv, message):
    with pytest.raises(UserError, match=message):
        sample.main(["--run", str(runs / objective), *argv, "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_the_samplers_refuse_the_other_objective_in_the_api():
    with pytest.raises(ValueError, match="sampler must be euler or heun for flow matching, which integrates an ODE, "
                                         "got 'ddim'"):
        flow.Flow(img_size=8).sample(UNet(c_in=3, c_out=3, width=8), 1, sampler="ddim")
    with pytest.raises(ValueError, match="sampler must be one of ddpm, ddim, dpmpp2m for a DDPM, got 'heun'"):
        ddpm.Diffusion(img_size=8).sample(UNet(c_in=3, c_out=3, width=8), 1, sampler="heun")


@pytest.mark.parametrize("argv", [["--prediction", "v"], ["--loss_weight", "edm"], ["--loss_weight", "min_snr"],
                                  ["--schedule", "cosine"], ["--noise_steps", "100"], ["--snr_gamma", "2.5"]])
def test_ddpm_options_given_to_a_flow_run_are_refused_in_one_line(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"{argv[0]} {argv[1]}: DDPM's, which flow matching does not use"):
        ddpm_conditional.parse_args(["--objective", "flow", *argv])
    assert not (tmp_path / "models").exists()


def test_a_flow_run_takes_the_velocity_whatever_the_recipe():
    args = ddpm_conditional.parse_args(["--objective", "flow"])  # the digits recipe says v and min_snr: for DDPM
    assert (args.prediction, args.loss_weight) == ("velocity", "none")


def test_the_objective_is_kept_on_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(ddpm_conditional, ["--objective", "flow", "--epochs", "1"])
    with pytest.raises(UserError, match="--objective ddpm \\(the run has flow\\)"):
        ddpm_conditional.parse_args([*TINY, "--resume", "--epochs", "2", "--objective", "ddpm"])
    assert ddpm_conditional.parse_args([*TINY, "--resume", "--epochs", "2"]).objective == "flow"


# --------------------------------------------------------------------------- the levers

def test_edm_noise_levels_are_log_normal_and_each_the_nearest_timestep():
    d = ddpm.Diffusion(img_size=8)
    torch.manual_seed(0)
    t = d.sample_timesteps(40_000, edm=True)
    assert 1 <= t.min() and t.max() <= 999
    log_sigma = -0.5 * d.snr(t).log()
    inside = (log_sigma > -0.5 * d.snr(torch.tensor(1)).log() + 0.05)  # clamped below sigma_1 ~ 0.01: 0.2%
    assert abs(log_sigma.mean().item() + 1.2) < 0.03 and abs(log_sigma[inside].std().item() - 1.2) < 0.05
    grid = -0.5 * d.snr(torch.arange(1, 1000)).log()
    torch.manual_seed(1)
    drawn = -1.2 + 1.2 * torch.randn(5)
    torch.manual_seed(1)
    assert torch.equal(d.sample_timesteps(5, edm=True), (grid[None] - drawn[:, None]).abs().argmin(1) + 1)


def test_edm_weight_is_lambda_sigma_on_the_x0_error():
    snr = torch.tensor([0.01, 1.0, 100.0], dtype=torch.float64)
    sigma2, sigma_data2 = 1 / snr, 0.25
    lam = (sigma2 + sigma_data2) / (sigma2 * sigma_data2)  # EDM's lambda(sigma), Karras et al. 2022
    # the x_0 error is the eps error / sqrt(SNR) and the v error / sqrt(SNR + 1): lambda times those squared
    torch.testing.assert_close(ddpm.loss_weight("edm", snr, 5.0, "eps"), lam / snr)
    torch.testing.assert_close(ddpm.loss_weight("edm", snr, 5.0, "v"), lam / (snr + 1))


def test_immiscible_noise_is_the_batch_noise_in_the_least_distant_pairing():
    images, eps = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    paired = ddpm.immiscible_noise(images, eps)
    order = [next(j for j in range(5) if torch.equal(paired[i], eps[j])) for i in range(5)]
    assert sorted(order) == list(range(5))  # the same noises, each once

    def total(perm):
        return sum((images[i] - eps[j]).flatten().norm().item() for i, j in enumerate(perm))
    assert math.isclose(total(order), min(total(p) for p in itertools.permutations(range(5))), rel_tol=1e-6)


@pytest.mark.parametrize("argv,expected", [([], dict(objective="ddpm", immiscible=False, adam_beta2=0.999)),
                                           (["--immiscible", "--adam_beta2", "0.99", "--loss_weight", "edm"],
                                            dict(objective="ddpm", immiscible=True, adam_beta2=0.99))])
def test_the_levers_are_flags_recorded_in_run_json_and_used(tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    trainer = ddpm_conditional.Trainer(ddpm_conditional.parse_args([*TINY, "--epochs", "1", *argv]))
    saved = json.loads((tmp_path / "models" / "DDPM_conditional" / "run.json").read_text())["args"]
    assert {k: saved[k] for k in expected} == expected
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, expected["adam_beta2"])
    called = []
    monkeypatch.setattr(ddpm, "immiscible_noise", lambda images, eps: called.append(1) or eps)
    images, labels = next(iter(trainer.loader))
    trainer.loss(images, labels)
    assert bool(called) == expected["immiscible"]
