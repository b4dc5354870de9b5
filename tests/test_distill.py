"""`lit-ddpm distill`: a student of a trained checkpoint, trained with the consistency loss from the teacher's
weights, is an ordinary checkpoint that `sample` and `test` use with the consistency sampler by themselves."""

import json
from pathlib import Path

import numpy as np
import torch

from conftest import ONE_STEP, ROOT, TINY, StandInExtractor, one_line_error
from diffusion_lit.callbacks import InitFromTeacher
from diffusion_lit.cli import main
from diffusion_lit.diffusion.consistency import ConsistencyLoss
from diffusion_lit.loading import load_checkpoint

DEMO = ["--config", f"{ROOT}/configs/demo.yaml", "--config", TINY, *ONE_STEP, "--trainer.logger", "false"]


def distill(teacher: Path, *extra: str) -> Path:
    main(["distill", *DEMO, "--teacher", str(teacher), "--distill.steps", "3",  # over ONE_STEP's max_steps 1
          "--distill.lr", "3e-4", "--model.loss.init_args.steps_per_stage", "1", *extra])  # fmt: skip
    return Path("checkpoints/demo_distill/last.ckpt")


def test_a_student_is_a_checkpoint_that_says_what_it_is_and_samples_with_the_consistency_sampler(
    demo_checkpoint, capsys
):
    student = distill(demo_checkpoint)
    checkpoint = torch.load(student, weights_only=True)
    assert checkpoint["global_step"] == 3  # --distill.steps, not the trainer's max_steps
    assert checkpoint["hyper_parameters"]["optimizer"]["init_args"]["lr"] == 3e-4  # --distill.lr, not the config's
    assert checkpoint["hyper_parameters"]["warmup_steps"] == 100  # demo.yaml's distill.warmup_steps, not its 5%
    assert checkpoint["hyper_parameters"]["loss"]["class_path"].endswith("consistency.ConsistencyLoss")
    assert checkpoint["hyper_parameters"]["loss"]["init_args"]["steps_per_stage"] == 1
    assert checkpoint["callbacks"]["InitFromTeacher"]["teacher"] == str(demo_checkpoint)
    teacher = torch.load(demo_checkpoint, weights_only=True)["hyper_parameters"]
    assert checkpoint["hyper_parameters"]["unet"] == teacher["unet"]  # the teacher's network, whatever the config
    main(["sample", "--ckpt_path", str(student), "--num_samples", "4", "--output", "auto"])
    images = np.load("auto/samples.npz")["arr_0"]
    assert images.shape == (4, 28, 28, 1) and images.std() > 0
    assert load_checkpoint(str(student)).consistency_model == 4  # segments: auto draws with 4 steps
    main(["sample", "--ckpt_path", str(student), "--num_samples", "4", "--steps", "8", "--output", "eight"])
    assert not np.array_equal(np.load("eight/samples.npz")["arr_0"], images)  # --steps overrides the 4 of auto
    error = one_line_error(capsys, "sample", "--ckpt_path", str(student), "--num_samples", "4", "--steps", "2",
                           "--output", "two")  # fmt: skip
    assert "distilled in 4 segments" in error and "--model.loss.segments 1" in error and not Path("two").exists()


def test_a_student_written_before_segments_is_read_as_the_one_segment_student_it_was(demo_checkpoint):
    student = distill(demo_checkpoint)
    checkpoint = torch.load(student, weights_only=True)
    del checkpoint["hyper_parameters"]["loss"]["init_args"]["segments"]
    torch.save(checkpoint, "old.ckpt")
    assert load_checkpoint("old.ckpt").consistency_model == 1  # not today's default of 4
    assert load_checkpoint(str(student)).consistency_model == 4
    distill(demo_checkpoint, "--distill.steps", "4", "--ckpt_path", "old.ckpt")  # resumed, it goes on as it was
    resumed = torch.load(student, weights_only=True)
    assert resumed["global_step"] == 4 and resumed["hyper_parameters"]["loss"]["init_args"]["segments"] == 1


def test_test_scores_a_student_with_the_consistency_sampler(demo_checkpoint, monkeypatch, tmp_path):
    student = distill(demo_checkpoint)
    monkeypatch.setattr("diffusion_lit.callbacks.quality.load_inception", lambda *args, **kwargs: StandInExtractor())
    main(["test", "--config", f"{ROOT}/configs/demo.yaml", "--config", TINY, "--ckpt_path", str(student),
          "--evaluation.num_samples", "4", "--evaluation.reference", "test",
          "--evaluation.cache_dir", "cache"])  # fmt: skip
    (report,) = student.parent.glob("last-fid-*.json")
    assert json.loads(report.read_text())["sampling"]["sampler"] == "consistency" and "consistency4" in report.name


def test_the_student_starts_as_the_teacher_and_the_loss_gets_a_frozen_copy_of_it(demo_checkpoint, tmp_path):
    from lightning.pytorch import Trainer

    student = load_checkpoint(str(demo_checkpoint))
    student.criterion = ConsistencyLoss()
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)  # anything but the teacher
    callback = InitFromTeacher(str(demo_checkpoint))
    trainer = Trainer(logger=False)
    callback.setup(trainer, student, "fit")
    teacher = torch.load(demo_checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(value, teacher[name]) for name, value in student.state_dict().items())
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)  # training (or a resume) moves the student, not the teacher's copy
    copy = student.criterion.teacher
    assert not copy.training and not any(parameter.requires_grad for parameter in copy.parameters())
    assert all(torch.equal(value, teacher[f"unet.{name}"]) for name, value in copy.state_dict().items())
    student.to("meta")  # where a strategy puts the student, the copy follows once, at the start of fitting
    callback.on_fit_start(trainer, student)
    assert student.device.type == "meta" and all(p.device.type == "meta" for p in copy.parameters())


def test_a_conditional_teacher_makes_a_conditional_student(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cond = ["--config", f"{ROOT}/configs/mnist.yaml", "--config", f"{ROOT}/configs/cond.yaml", "--config", TINY,
            *ONE_STEP, "--trainer.logger", "false", "--data.init_args.data_dir", str(mnist_dir),
            "--config", f"{ROOT}/configs/ablation/mse_only.yaml"]  # fmt: skip
    main(["fit", *cond])
    main(["distill", *cond, "--teacher", "checkpoints/mnist_cond/last.ckpt", "--trainer.max_steps", "2"])
    student = "checkpoints/mnist_cond_distill/last.ckpt"
    assert load_checkpoint(student).num_classes == 10
    main(["sample", "--ckpt_path", student, "--num_samples", "4", "--class", "3", "--guidance", "2", "--output", "c"])
    assert np.load("c/samples.npz")["labels"].tolist() == [3, 3, 3, 3]


def test_distill_without_a_teacher_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "distill needs a teacher" in one_line_error(capsys, "distill", *DEMO)


def test_help_lists_distill(capsys):
    main(["--help"])
    assert any(line.strip().startswith("distill ") for line in capsys.readouterr().out.splitlines())
