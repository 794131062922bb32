"""--prediction v, --loss_weight min_snr and --ema_power: each against its formula, and end to end."""
import json

import pytest
import torch

import ddpm
import ddpm_conditional
import sample
from ddpm import SAMPLERS, Diffusion, loss_weight
from tools.exact import ExactDenoiser
from modules import EMA

TINY = ["--width", "8", "--image_size", "16", "--precision", "fp32", "--noise_steps", "100", "--sample_steps", "5"]


def test_min_snr_weight_is_its_formula_on_known_snrs():
    snr = torch.tensor([0.25, 5.0, 100.0])
    # eps: min(SNR, 5) / SNR; v: min(SNR, 5) / (SNR + 1)
    torch.testing.assert_close(loss_weight("min_snr", snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 0.05]))
    torch.testing.assert_close(loss_weight("min_snr", snr, 5.0, "v"), torch.tensor([0.2, 5 / 6, 5 / 101]))
    d = Diffusion(noise_steps=1000, img_size=8, c_in=1)
    t = torch.tensor([1, 500, 999])
    torch.testing.assert_close(d.snr(t), d.alpha_hat[t] / (1 - d.alpha_hat[t]))


def test_v_prediction_round_trips_eps_to_v_to_eps():
    d = Diffusion(img_size=8, c_in=3, prediction="v")
    x0, eps = torch.rand(6, 3, 8, 8, dtype=torch.float64) * 2 - 1, torch.randn(6, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([1, 2, 100, 500, 998, 999])
    alpha_hat = d.alpha_hat[t].double()[:, None, None, None]
    x_t = alpha_hat.sqrt() * x0 + (1 - alpha_hat).sqrt() * eps
    v = d.target(x0, eps, t)
    torch.testing.assert_close(d.eps_from_output(v, x_t, t), eps, rtol=0, atol=1e-12)
    assert Diffusion(img_size=8, c_in=3).eps_from_output(v, x_t, t) is v  # eps-prediction: the output itself


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_honours_v_prediction(sampler):
    """The exact denoiser answering in v, on a v-prediction Diffusion, draws what it draws answering in eps."""
    images = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    finals = []
    for prediction in ("eps", "v"):
        d = Diffusion(img_size=8, c_in=1, prediction=prediction)
        trajectory = []
        torch.manual_seed(2)  # the ancestral chain's noise
        d.sample(ExactDenoiser(images, None, d), 4, sampler=sampler, steps=20, noise=x_T, progress=False,
                 callback=lambda t, x: trajectory.append(x))
        finals.append(trajectory[-1])
    torch.testing.assert_close(finals[1], finals[0], rtol=0, atol=1e-6)


def test_guidance_is_the_same_in_v_and_in_eps():
    """Guidance mixes the two predictions linearly, and eps is affine in v at fixed x_t: the order does not matter."""
    images = torch.randint(0, 256, (4, 1, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    labels, x, t = torch.tensor([0, 0, 1, 1]), torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([400, 900])
    guided = []
    for prediction in ("eps", "v"):
        d = ddpm_conditional.Diffusion(img_size=8, c_in=1, prediction=prediction)
        model = ExactDenoiser(images, labels, d, num_classes=2)
        guided.append(d.predict_noise(model, x, t, torch.tensor([0, 1]), cfg_scale=3))
    torch.testing.assert_close(guided[1], guided[0], rtol=0, atol=1e-5, check_dtype=False)  # mixed in float32


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_loss_is_the_weighted_mse_of_the_target(in_tmp, prediction):
    args = ddpm.parse_args([*TINY, "--limit", "8", "--batch_size", "8", "--prediction", prediction,
                                                  "--loss_weight", "min_snr", "--snr_gamma", "2"])
    trainer = ddpm.Trainer(args)
    images, labels = next(iter(trainer.loader))
    torch.manual_seed(0)
    loss = trainer.loss(images, labels)

    d = trainer.diffusion
    torch.manual_seed(0)
    t = d.sample_timesteps(8)
    x_t, eps = d.noise_images(images, t)
    target = d.target(images, eps, t)
    per_image = ((trainer.model(x_t, t) - target) ** 2).mean(dim=(1, 2, 3))
    snr = d.alpha_hat[t] / (1 - d.alpha_hat[t])
    weight = snr.clamp(max=2) / (snr if prediction == "eps" else snr + 1)
    torch.testing.assert_close(loss, (weight * per_image).mean())


def test_power_ema_copies_first_then_follows_its_decay():
    model, gamma = torch.nn.Linear(1, 1, bias=False), 6.94
    ema_model, ema = EMA.copy_of(model), EMA(power=gamma)
    expected = None
    for step in range(1, 50):  # the model's weight at update `step` is `step`
        model.weight.data.fill_(float(step))
        ema.step_ema(ema_model, model)
        beta = (1 - 1 / step) ** (gamma + 1)
        expected = float(step) if expected is None else beta * expected + (1 - beta) * step
        assert ema_model.weight.item() == pytest.approx(expected, rel=1e-5)
    # the average trails the run by a fixed fraction of its length: here 49 steps, weight 49, average ~44
    assert 40 < ema_model.weight.item() < 46
    restored = EMA()
    restored.load_state_dict(ema.state_dict())
    assert (restored.power, restored.step, restored.decay()) == (gamma, 49, ema.decay())


def test_options_are_recorded_and_a_v_run_loads_as_v(in_tmp):
    ddpm_conditional.main([*TINY, "--limit", "20", "--batch_size", "10", "--epochs", "1", "--sample_every", "0",
                           "--prediction", "v", "--loss_weight", "min_snr", "--ema_power", "6.94"])
    run = in_tmp / "models" / "DDPM_conditional"
    config = json.loads((run / "run.json").read_text())
    assert config["diffusion_args"]["prediction"] == "v"
    assert (config["args"]["loss_weight"], config["args"]["ema_power"]) == ("min_snr", 6.94)
    _, diffusion = sample.load(run)
    assert diffusion.prediction == "v"
    state = torch.load(run / "resume.pt", weights_only=True)
    assert state["ema"]["power"] == 6.94


def test_the_conditional_digits_recipe_uses_the_options_and_recommends_guidance_at_high_noise(in_tmp):
    """`python ddpm_conditional.py`: v-prediction, Min-SNR, the power EMA, 40 epochs, and guidance 3.5 at the noisiest
    60% of the steps recorded as the run's sampling settings; the emoji guide at 2 (docs/emoji.md), every other recipe
    as the original did."""
    args = ddpm_conditional.parse_args([])
    assert (args.prediction, args.loss_weight, args.ema_power, args.epochs) == ("v", "min_snr", 6.94, 40)
    assert (args.cfg_scale, args.guidance_interval) == (3.5, [400, 999])
    assert ddpm_conditional.parse_args(["--noise_steps", "20"]).guidance_interval == [8, 19]  # the same noise levels
    assert ddpm_conditional.parse_args(["--guidance_interval", "0", "999"]).guidance_interval == [0, 999]
    unconditional = ddpm.parse_args([])
    assert (unconditional.prediction, unconditional.loss_weight, unconditional.epochs) == ("eps", "none", 60)
    for flags, scale in ((["--dataset", "emoji"], 2.0), (["--dataset", "mnist"], 3.0), (["--dataset_path", "data"], 3.0)):
        other = ddpm_conditional.parse_args(flags)
        assert (other.cfg_scale, other.guidance_interval) == (scale, None), flags
    ddpm_conditional.main([*TINY, "--limit", "20", "--batch_size", "10", "--epochs", "1", "--sample_every", "0"])
    config = json.loads((in_tmp / "models" / "DDPM_conditional" / "run.json").read_text())
    assert config["diffusion_args"]["prediction"] == "v"
    assert config["sampling"] == {"sampler": "dpmpp2m", "steps": 5, "cfg_scale": 3.5, "guidance_interval": [40, 99]}


def test_a_run_saved_before_the_options_existed_resumes_with_the_originals(in_tmp):
    """A digits run trained before --prediction, --loss_weight, --ema_power and the recipe's guidance existed was an
    eps run with the original's EMA and guidance: resuming it must not turn it into today's recipe."""
    flags = [*TINY, "--limit", "20", "--batch_size", "10", "--sample_every", "0", "--run_name", "old"]
    ddpm_conditional.main([*flags, "--epochs", "1", "--prediction", "eps", "--loss_weight", "none",
                           "--ema_power", "0", "--cfg_scale", "3", "--guidance_interval", "0", "99"])
    path = in_tmp / "models" / "old" / "resume.pt"
    state = torch.load(path, weights_only=True)
    for key in ("prediction", "loss_weight", "ema_power", "guidance_interval"):
        del state["args"][key]
    torch.save(state, path)
    args = ddpm_conditional.parse_args([*flags, "--epochs", "2", "--resume"])
    assert (args.prediction, args.loss_weight, args.ema_power, args.cfg_scale, args.guidance_interval) == \
        ("eps", "none", 0.0, 3.0, None)
    ddpm_conditional.main([*flags, "--epochs", "2", "--resume"])
    assert json.loads((in_tmp / "models" / "old" / "run.json").read_text())["diffusion_args"]["prediction"] == "eps"


def nearest_distance(trainer: ddpm.Trainer, real: torch.Tensor) -> float:
    """Mean distance from 64 DDIM-20 samples to their nearest training image, in [0, 1] pixel units."""
    torch.manual_seed(0)
    fake = trainer.diffusion.sample(trainer.model, 64, sampler="ddim", steps=20, progress=False).flatten(1) / 255.0
    return torch.cdist(fake.double(), real.flatten(1).double()).min(1).values.mean().item() / fake.shape[1] ** 0.5


def test_a_tiny_v_run_samples_as_well_as_an_eps_run(in_tmp):
    """The same tiny run (100 digits, 100 steps) in eps and in v. The v run must learn (its samples end far nearer
    the training images than an untrained model's) and sample at least as well as the eps run, within 25%.
    Measured on seeds 0 and 1: untrained 0.66-0.74, eps 0.50-0.58, v 0.18-0.19 (v learns faster in so few
    steps), so a v path that converts wrongly, or not at all, fails: a run that trains on eps whatever --prediction
    says ends as the eps run does, above half the untrained distance, and one whose samples read the v output as
    eps at 0.38-0.39, also above it."""
    distances = {}
    for prediction in (None, "eps", "v"):
        args = ddpm.parse_args([
            *TINY, "--limit", "100", "--batch_size", "20", "--epochs", "20" if prediction else "1", "--lr", "3e-3",
            "--warmup", "20", "--sample_every", "0", "--log_every", "1000", "--run_name", str(prediction),
            "--prediction", prediction or "eps"])
        trainer = ddpm.Trainer(args)
        if prediction:
            trainer.fit()
        real = torch.cat([images for images, _ in trainer.loader])
        distances[prediction] = nearest_distance(trainer, (real + 1) / 2)
    assert distances["v"] < 0.5 * distances[None], distances
    assert distances["v"] < 1.25 * distances["eps"], distances


def test_the_frontier_tool_trains_evaluates_reuses_and_reports(in_tmp, capsys, monkeypatch):
    """tools/frontier.py in miniature: two variants, one epoch each (64 digits), real runs and evaluations (each
    with a one-epoch judge: evaluate.py's judge training is most of an evaluation's time)."""
    from tools import frontier

    # its training and evaluation processes: one thread each, as under torchrun (test_distributed.py); two threads
    # on two busy cores wait on each other at every operation
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    readme = in_tmp / "docs" / "training.md"  # where the README's studies live
    readme.parent.mkdir()
    readme.write_text("<!-- frontier_tiny:start -->\n<!-- frontier_tiny:end -->\n")
    tiny = "--limit 64 --width 8 --image_size 16 --noise_steps 20 --sample_every 0 --cfg_scale 2"
    common = ["--name", "tiny", "--epochs", "1", "--precision", "fp32", "--n", "20", "--judge_epochs", "1",
              "--readme", str(readme)]
    v = ["--variant", f"v={tiny} --prediction v"]
    argv = [*common, "--variant", f"eps={tiny} --prediction eps", *v]
    frontier.main(argv)
    evaluations = [line for line in capsys.readouterr().out.splitlines() if "evaluate.py" in line]
    assert len(evaluations) == 2 and all(line.endswith("--judge_epochs 1") for line in evaluations)
    rows = json.loads((in_tmp / "results" / "frontier_tiny.json").read_text())
    assert [(r["variant"], r["steps"], r["precision"]) for r in rows] == [("eps", 1, "fp32"), ("v", 1, "fp32")]
    assert all(r["minutes"] > 0 and 0 <= r["accuracy"] <= 1 and r["floor"] > 0 for r in rows)
    v_run = in_tmp / "models" / rows[1]["run"]
    assert [json.loads((in_tmp / "models" / r["run"] / "run.json").read_text())["diffusion_args"]["prediction"]
            for r in rows] == ["eps", "v"]
    text = readme.read_text()
    # each run at its recommended settings: the guidance its training recorded
    assert "python -m tools.frontier --name tiny" in text and "| v | 1 | 0 | 1 |" in text
    assert [r["setting"] for r in rows] == ["dpmpp2m-15, cfg 2 at t 8..19"] * 2  # the recipe's interval, at T = 20
    assert "--judge_epochs 1 --readme docs/training.md" in text and "](../assets/frontier_tiny.png)" in text
    assert (in_tmp / "assets" / "frontier_tiny.png").is_file()
    best = min(rows, key=lambda r: r["fd"] / r["floor"])  # the lowest FD's samples, shown under the plot
    assert f"The lowest FD, {best['variant']} (seed 0, epochs 1)" in text and "](../assets/frontier_tiny_best.png)" in text
    assert (in_tmp / "assets" / "frontier_tiny_best.png").read_bytes() == \
        (in_tmp / "results" / best["run"] / "eval_samples.png").read_bytes()
    # a second call reuses every finished point: nothing is trained or evaluated again
    own_report = in_tmp / "results" / rows[1]["run"] / "eval.json"
    stamp = (v_run / "resume.pt").stat().st_mtime_ns, own_report.stat().st_mtime_ns
    frontier.main(argv)
    assert ((v_run / "resume.pt").stat().st_mtime_ns, own_report.stat().st_mtime_ns) == stamp
    # --block: the same runs, another block, results file and figure (nothing trained or evaluated again)
    readme.write_text(readme.read_text() + "<!-- other:start -->\n<!-- other:end -->\n")
    frontier.main([*argv, "--block", "other"])
    assert ((v_run / "resume.pt").stat().st_mtime_ns, own_report.stat().st_mtime_ns) == stamp
    assert (in_tmp / "results" / "other.json").is_file() and (in_tmp / "assets" / "other.png").is_file()
    assert "python -m tools.frontier --name tiny --block other " in readme.read_text()
    # one setting for every run (here the v run alone): evaluated again (not trained), into its own folder
    frontier.main([*common, *v, "--eval_flags", "--cfg_scale 4 --guidance_interval 5 19"])
    rows = json.loads((in_tmp / "results" / "frontier_tiny.json").read_text())
    assert [(r["variant"], r["setting"]) for r in rows] == [("v", "dpmpp2m-15, cfg 4 at t 5..19")]
    assert (own_report.parent / "cfg_scale_4_guidance_interval_5_19" / "eval.json").is_file()
    assert ((v_run / "resume.pt").stat().st_mtime_ns, own_report.stat().st_mtime_ns) == stamp
    assert "--eval_flags '--cfg_scale 4 --guidance_interval 5 19'" in readme.read_text()
    # a report from before the samples followed the data's class mix is stale: evaluated again, not trained
    stale = json.loads(own_report.read_text())
    del stale["samples_per_class"]
    own_report.write_text(json.dumps(stale))
    frontier.main([*common, *v])
    assert (v_run / "resume.pt").stat().st_mtime_ns == stamp[0]
    assert json.loads(own_report.read_text())["samples_per_class"] == [2] * 10
