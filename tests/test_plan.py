"""plan.py: the learning rate over the run's planned length, against closed forms and torch's own schedulers;
the plan from max_steps, max_epochs and max_time; a re-plan on resume; the power-function EMA."""

import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Timer

from conftest import ROOT, TINY
from diffusion_lit.callbacks.ema import EMA
from diffusion_lit.callbacks.posthoc_ema import gamma_of, profile
from diffusion_lit.cli import main
from diffusion_lit.errors import UserError
from diffusion_lit.plan import RunPlan, lr_factor, warmup_length


def test_warmup_is_steps_or_a_share_of_the_run():
    assert warmup_length(100, 1000) == 100 and warmup_length(0.05, 1000) == 50 and warmup_length(0, 1000) == 0
    assert [lr_factor(step, 100, 4) for step in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def torch_rates(make, steps: int) -> list[float]:
    """The rates a torch scheduler gives an optimizer of base rate 1, step by step."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = make(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_and_wsd_decays_match_torchs_schedulers():
    total, start = 100, 60  # no warm-up: the decay from step 60 to the end
    ours = [lr_factor(step, total, 0, "cosine", 0.6) for step in range(total)]
    theirs = torch_rates(lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.ConstantLR(o, 1.0, start),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, total - start)], [start]), total)  # fmt: skip
    assert ours == pytest.approx(theirs, abs=1e-12)
    ours = [lr_factor(step, total, 0, "wsd", 0.6) for step in range(total)]
    theirs = torch_rates(lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.ConstantLR(o, 1.0, start),
            torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.0, total - start)], [start]), total)  # fmt: skip
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_inverse_square_root_and_a_decay_that_would_start_inside_the_warm_up():
    # EDM2: 1 / sqrt(max(t / t_ref, 1)), t_ref at 10% of a run of 1,000 steps
    assert [lr_factor(s, 1000, 0, "inv_sqrt", 0.1) for s in (0, 99, 399, 899)] == pytest.approx([1, 1, 0.5, 1 / 3])
    # a warm-up of 50 steps with the cool-down asked from 0 of the run: the cool-down starts after the warm-up
    rates = [lr_factor(s, 100, 50, "wsd", 0.0) for s in range(100)]
    assert rates[49] == 1 and rates[50] == pytest.approx(1) and rates[75] == pytest.approx(0.5)
    assert rates[99] == pytest.approx(0.02)  # 1 - 49/50: the last step's rate, before the run ends at 0


def trainer(step: int, steps: float, timer=None) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, estimated_stepping_batches=steps, is_global_zero=True,
                           callbacks=[timer] if timer else [])  # fmt: skip


def test_the_plan_of_a_run_of_known_length_and_a_resume_with_a_larger_budget(capsys):
    plan = RunPlan(warmup=0.1, decay="wsd", decay_from=0.8)
    plan.on_train_start(trainer(0, 1000), None)
    assert plan.total == 1000 and plan.warmup_steps == 100
    assert "lit-ddpm: planned: 1,000 optimizer steps" in capsys.readouterr().err
    assert plan.factor(49) == pytest.approx(0.5) and plan.factor(900) == pytest.approx(0.5)
    resumed = RunPlan(warmup=0.1, decay="wsd", decay_from=0.8)
    resumed.load_state_dict(plan.state_dict())
    resumed.on_train_start(trainer(600, 2000), None)  # the same run given twice the steps
    assert resumed.total == 2000 and resumed.warmup_steps == 100  # no second, longer warm-up
    assert resumed.factor(900) == 1.0 and resumed.factor(1800) == pytest.approx(0.5)  # the cool-down moved
    assert "re-planned: 1,000 -> 2,000 optimizer steps; the warm-up stays 100 steps" in capsys.readouterr().err


def test_a_time_budget_is_planned_from_the_pace_and_re_estimated(monkeypatch):
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr("diffusion_lit.plan.time.monotonic", lambda: clock.now)
    timer = Timer(duration={"seconds": 100})
    monkeypatch.setattr(timer, "time_remaining", lambda stage: 100 - clock.now)
    plan = RunPlan(warmup=0.1, decay="wsd", decay_from=0.5, every=10)
    plan.on_train_start(trainer(0, math.inf, timer), None)
    assert plan.total is None and plan.factor(0) == 0.0  # a share of a length not known yet
    clock.now = 1.0  # 1 s a step
    plan.on_train_batch_end(trainer(1, math.inf, timer), None)
    assert plan.total == 100 and plan.warmup_steps is None  # 1 + 99 s left at 1 s a step
    clock.now = 20.0  # slower: 2 s a step for the next 9, the pace so far 20 / 10
    plan.on_train_batch_end(trainer(10, math.inf, timer), None)
    assert plan.total == 10 + 40 and plan.warmup_steps == 5  # past the warm-up (5 steps of 50): fixed
    plan.on_train_batch_end(trainer(11, math.inf, timer), None)
    assert plan.total == 50  # estimates every 10 steps only


def test_a_planned_rate_needs_a_length(capsys):
    plan = RunPlan(warmup=0.05)
    with pytest.raises(UserError, match="the learning rate is planned over the run, which has no length"):
        plan.on_train_start(trainer(0, math.inf), None)
    RunPlan(warmup=10).on_train_start(trainer(0, math.inf), None)  # a warm-up in steps, then constant: no plan
    with pytest.raises(UserError, match="lr_decay must be one of"):
        RunPlan(decay="linear")


def test_fit_follows_the_planned_rate_step_by_step(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rates = []
    monkeypatch.setattr("diffusion_lit.optim.torch.optim.lr_scheduler.LambdaLR.step",
                        record_rates(rates))  # fmt: skip
    main(["fit", "--config", f"{ROOT}/configs/demo.yaml", "--config", TINY, "--trainer.fast_dev_run", "false",
          "--trainer.max_steps", "12", "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0",
          "--trainer.logger", "false", "--model.warmup_steps", "0.25", "--model.lr_decay", "cosine",
          "--model.decay_from", "0.5", "--model.optimizer.init_args.lr", "1.0"])  # fmt: skip
    assert "lit-ddpm: planned: 12 optimizer steps" in capsys.readouterr().err
    expected = [lr_factor(step, 12, 3, "cosine", 0.5) for step in range(1, 13)]  # after each step
    assert rates == pytest.approx(expected)


def record_rates(rates: list[float]):
    real = torch.optim.lr_scheduler.LambdaLR.step

    def step(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.last_epoch > 0:
            rates.append(self.optimizer.param_groups[0]["lr"])

    return step


def test_the_power_function_ema_is_edm2s_average_of_the_run_so_far():
    """After T updates of a weight w_1..w_T, the average is sum_t p_T(t) w_t with the post-hoc EMA's profile."""
    sigma_rel, steps = 0.1, 40
    module = torch.nn.Linear(1, 1, bias=False)
    pl_module = SimpleNamespace(named_parameters=module.named_parameters, named_buffers=module.named_buffers,
                                named_modules=module.named_modules, device=torch.device("cpu"))  # fmt: skip
    ema = EMA(sigma_rel=sigma_rel)
    ema.setup(None, pl_module, "fit")
    values = torch.randn(steps, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for step, value in enumerate(values, start=1):
        module.weight.data.fill_(value)
        ema.on_train_batch_end(SimpleNamespace(global_step=step), pl_module)
    weights = profile(gamma_of(sigma_rel), steps, torch.arange(1, steps + 1))
    assert ema.average["weight"].item() == pytest.approx((weights * values).sum().item(), rel=1e-5)
