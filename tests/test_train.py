"""Specification of main_train.py and resume_train.py: the outputs of a run, exact resume with the stored settings,
atomic checkpoints, clear checkpoint errors, stopping on a non-finite loss, the lr schedule, the --demo preset, a
2-process DistributedDataParallel run, and one host-device synchronisation per training step.

Everything runs on the CPU with a tiny model (ResNet-18 FPN with random weights, one conv per tower, 32 channels,
small grids) on 3 synthetic images at 64x96 (2 train, 1 test image), batch 1: 2 iterations per epoch. One
CUDA-only test (skipped without a GPU) checks the host-device synchronisations.
"""
import argparse
import dataclasses
import math
import os
import re
import subprocess
import sys
import traceback
import warnings

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import compute_path
import engine
import main_train
import resume_train
import utils
from conftest import assert_same_training_state, parse_train
from checkpoint import CHECKPOINT_KEYS, latest_checkpoint, link_checkpoint, load_checkpoint, load_model, save_checkpoint
from errors import CheckpointError, NonFiniteLossError
from loss_log import loss_figure
from model import ModelConfig, build_model
from solo_head import SOLOHead

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ["--backbone", "resnet18", "--backbone-weights", "none", "--set", "stacked_convs=1",
              "seg_feat_channels=32", "num_grids=8,6,4,3,2"]
TINY = TINY_MODEL + ["--input-height", "64", "--batch-size", "1", "--log-every", "1", "--device", "cpu", "--hflip"]


@pytest.fixture(scope="module")
def data_dir(three_images):
    return three_images


def train_args(data_dir, run_dir, *extra):
    return parse_train(TINY + ["--data-dir", data_dir, "--output-dir", str(run_dir), *map(str, extra)])


def resume_command(*argv):
    """The main_train.py flags `python resume_train.py ARGV` runs main_train.py with (the script it runs is checked
    to be this repository's main_train.py)."""
    command = resume_train.main(*resume_train.get_args_parser().parse_known_args(list(argv)))
    assert command[0] == os.path.join(REPO, "main_train.py")
    return command[1:]


def resume(*argv):
    """What `python resume_train.py ARGV` runs: main_train.py with the command resume_train.py builds."""
    command = resume_command(*argv)
    return main_train.main(parse_train(command))


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """2 epochs in one go (one loader worker, so the flips come from worker RNGs): (run dir, summary)."""
    run_dir = tmp_path_factory.mktemp("straight")
    summary = main_train.main(train_args(data_dir, run_dir, "--epochs", 2, "--workers", 1))
    return run_dir, summary


def read_csv(path):
    with open(path) as f:
        return [line.rstrip("\n").split(",") for line in f]


# ----------------------------------------------------------------------------------------------------
class TestTinyRun:
    def test_files_are_written(self, straight_run):
        run_dir, summary = straight_run
        assert sorted(os.listdir(run_dir)) == [".lock", "checkpoint.pth", "epoch_000.pth", "epoch_001.pth",
                                               "loss_curve.png", "losses.csv", "test_losses.csv"]
        assert summary["checkpoint"] == str(run_dir / "checkpoint.pth") and summary["epoch"] == 1
        # the rolling checkpoint is the newest epoch's file, not a second copy of it
        assert os.path.samefile(run_dir / "checkpoint.pth", run_dir / "epoch_001.pth")

    def test_losses_csv_has_a_row_per_logged_iteration(self, straight_run):
        run_dir, _ = straight_run
        rows = read_csv(run_dir / "losses.csv")
        assert rows[0] == ["iteration", "total_loss", "focal_loss", "dice_loss"]
        assert [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4]  # --log-every 1, 2 epochs of 2 iterations
        test_rows = read_csv(run_dir / "test_losses.csv")
        assert test_rows[0] == ["epoch", "total_loss", "focal_loss", "dice_loss"]
        assert [int(r[0]) for r in test_rows[1:]] == [0, 1]

    def test_checkpoint_has_the_contract_keys_and_finite_losses(self, straight_run):
        run_dir, summary = straight_run
        ckpt = torch.load(run_dir / "checkpoint.pth", map_location="cpu", weights_only=True)
        assert set(CHECKPOINT_KEYS) <= set(ckpt)
        assert ckpt["format"] == "solo-checkpoint-v1"
        assert (ckpt["epoch"], ckpt["iteration"]) == (1, 4)
        assert ckpt["model_cfg"]["num_grids"] == (8, 6, 4, 3, 2) and ckpt["model_cfg"]["backbone"] == "resnet18"
        assert ckpt["args"]["input_height"] == 64 and ckpt["args"]["num_grids"] == [8, 6, 4, 3, 2]
        assert ckpt["args"]["lr"] == pytest.approx(0.01 / 16)  # the scaling rule: one process, one image
        assert not any(k.startswith("module.") for k in ckpt["model"])
        assert ckpt["scaler"] is None  # no --amp
        assert set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"}
        train, test = np.array(ckpt["history"]["train"]), np.array(ckpt["history"]["test"])
        assert train.shape == (4, 4) and test.shape == (2, 4)
        assert np.isfinite(train).all() and np.isfinite(test).all()
        np.testing.assert_allclose(train[:, 1], train[:, 2] + 3 * train[:, 3], rtol=1e-5)  # total = focal + 3 dice
        assert summary["train_loss"] == ckpt["history"]["train"][-1][1:]

    def test_checkpoint_rebuilds_the_model(self, straight_run):
        run_dir, _ = straight_run
        path = run_dir / "checkpoint.pth"
        model = load_model(str(path), "cpu")
        assert not model.training
        ckpt = load_checkpoint(path)
        assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
        assert latest_checkpoint(str(run_dir)) in (str(path), str(run_dir / "epoch_001.pth"))

    def test_the_loss_curve_shows_the_three_losses_against_the_iteration(self, straight_run):
        history = load_checkpoint(straight_run[0] / "checkpoint.pth")["history"]
        fig = loss_figure(history)
        assert [ax.get_title() for ax in fig.axes] == ["total loss", "focal loss (category)", "dice loss (mask)"]
        train, test = np.array(history["train"]), np.array(history["test"])
        for k, ax in enumerate(fig.axes):
            assert ax.get_xlabel() == "iteration"
            (train_line, test_line) = ax.lines
            np.testing.assert_allclose(train_line.get_xydata(), train[:, [0, k + 1]])
            # the test losses at the iteration that ended their epoch (2 iterations per epoch)
            np.testing.assert_allclose(test_line.get_xydata(), np.stack([[2, 4], test[:, k + 1]], 1))


# ----------------------------------------------------------------------------------------------------
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(data_dir, straight_run, tmp_path):
    main_train.main(train_args(data_dir, tmp_path, "--epochs", 1, "--workers", 1))
    assert sorted(os.listdir(tmp_path))[:3] == [".lock", "checkpoint.pth", "epoch_000.pth"]
    summary = resume("--output-dir", str(tmp_path), "--epochs", "2")
    assert summary["epoch"] == 1

    straight = load_checkpoint(straight_run[0] / "checkpoint.pth")
    resumed = load_checkpoint(tmp_path / "checkpoint.pth")
    assert_same_training_state(straight, resumed)
    assert straight["scheduler"] == resumed["scheduler"]
    assert (resumed["epoch"], resumed["iteration"]) == (1, 4)
    for name in ("losses.csv", "test_losses.csv"):
        assert read_csv(straight_run[0] / name) == read_csv(tmp_path / name)


def test_an_adamw_cosine_run_resumes_exactly(data_dir, tmp_path):
    """The --demo preset's optimiser and schedule (settings, not flags: stored with the run): AdamW's moments and
    the cosine schedule over the run's epochs come back from the checkpoint, so the resumed run ends where an
    uninterrupted one does."""
    def run(folder, epochs):
        args = train_args(data_dir, folder, "--epochs", epochs, "--workers", 0, "--lr", 0.001)
        args.optimizer, args.schedule = "adamw", "cosine"
        return main_train.main(args)
    run(tmp_path / "straight", 2)
    args = train_args(data_dir, tmp_path / "resumed", "--epochs", 2, "--workers", 0, "--lr", 0.001)
    args.optimizer, args.schedule, args.epochs = "adamw", "cosine", 2
    main_train.main(args)  # 2 epochs planned: the cosine's length
    (tmp_path / "resumed" / "epoch_001.pth").unlink()
    os.replace(tmp_path / "resumed" / "epoch_000.pth", tmp_path / "resumed" / "checkpoint.pth")
    resume("--checkpoint", str(tmp_path / "resumed" / "checkpoint.pth"), "--overwrite")
    straight, resumed = (load_checkpoint(tmp_path / name / "checkpoint.pth") for name in ("straight", "resumed"))
    assert resumed["args"]["optimizer"] == "adamw" and resumed["args"]["schedule"] == "cosine"
    assert all(torch.equal(v, resumed["model"][k]) for k, v in straight["model"].items())
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])



def test_the_optimiser_is_sgd_or_adamw_and_another_name_is_refused():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd, adamw = (utils.build_optimizer(params, name, 0.01) for name in ("sgd", "adamw"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="optimizer 'adam': expected one of sgd, adamw"):
        utils.build_optimizer(params, "adam", 0.01)


def test_the_lr_schedule_is_step_or_cosine_and_another_name_is_refused():
    """Only a hand-edited run can carry another schedule (there is no flag): it is refused when the scheduler is
    built, before any step, instead of running as the step schedule."""
    assert utils.lr_factor(25, 10, [2], 0, schedule="step") == pytest.approx(0.1)  # epoch 2: one decay
    assert utils.lr_factor(50, 10, [2], 0, schedule="cosine", total_iters=100) == pytest.approx(0.5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.01)
    with pytest.raises(ValueError, match="lr schedule 'linear': expected one of step, cosine"):
        utils.build_scheduler(optimizer, 10, [2], 5, schedule="linear", total_iters=100)

class TestResumeSettings:
    """--resume takes every setting from the checkpoint; RESUME_OVERRIDES may be given another value, any other
    flag that differs is refused (a value printed but not used would mislead)."""

    def test_the_run_folder_and_its_stored_settings(self, straight_run):
        args = parse_train(["--resume", str(straight_run[0])])
        assert args.resume in (str(straight_run[0] / "checkpoint.pth"), str(straight_run[0] / "epoch_001.pth"))
        assert args.output_dir == str(straight_run[0])
        assert (args.backbone, args.input_height, args.num_grids, args.lr) == ("resnet18", 64, [8, 6, 4, 3, 2],
                                                                              pytest.approx(0.01 / 16))

    def test_allowed_overrides_apply(self, straight_run, tmp_path):
        args = parse_train(["--resume", str(straight_run[0]), "--epochs", "5", "--data-dir", str(tmp_path),
                                      "--workers", "0"])
        assert (args.epochs, args.data_dir, args.workers) == (5, str(tmp_path), 0)

    def test_the_same_value_is_accepted_another_is_refused_naming_the_flag(self, straight_run):
        assert parse_train(["--resume", str(straight_run[0]), "--input-height", "64"]).input_height == 64
        with pytest.raises(CheckpointError, match=r"a resumed run keeps its settings; these differ: --lr \(the run "
                                                  r"has 0\.000625, the command line 0\.5\).*another --output-dir"):
            parse_train(["--resume", str(straight_run[0]), "--lr", "0.5"])

    def test_resume_train_builds_the_main_train_command(self):
        assert resume_command() == ["--resume", "checkpoints"]
        assert resume_command("--output-dir", "runs/a", "--epochs", "40") == ["--resume", "runs/a", "--epochs", "40"]
        assert resume_command("--checkpoint", "a/epoch_003.pth", "--output-dir", "b") == [
            "--resume", "a/epoch_003.pth", "--output-dir", "b"]

    def test_resume_without_a_checkpoint_is_one_clear_error_line(self, tmp_path):
        with pytest.raises(CheckpointError, match="no checkpoint in this folder"):
            parse_train(["--resume", str(tmp_path)])
        # resume_train.py becomes main_train.py, which exits non-zero with the message, no traceback
        result = subprocess.run([sys.executable, "resume_train.py", "--output-dir", str(tmp_path)], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert f"error: --resume {tmp_path}: no checkpoint in this folder" in result.stderr
        assert "Traceback" not in result.stderr


def test_test_only_prints_the_checkpoints_test_losses(straight_run, capsys):
    summary = main_train.main(parse_train(["--resume", str(straight_run[0]), "--test-only"]))
    stored = load_checkpoint(straight_run[0] / "checkpoint.pth")["history"]["test"][-1][1:]
    np.testing.assert_allclose(summary["test_loss"], stored, rtol=1e-5)
    assert "test losses of" in capsys.readouterr().out


def test_demo_preset_gives_settings_that_flags_and_set_override_and_help_shows_it(capsys):
    parse = main_train.get_args_parser().parse_args
    demo = parse(["--demo", "--epochs", "3", "--set", "stacked_convs=3"])
    assert (demo.backbone, demo.backbone_weights, demo.input_height, demo.synthetic) == ("resnet18", "none", 160, 600)
    assert (demo.seg_feat_channels, demo.num_grids, demo.synthetic_min_size) == (64, [16, 12, 10, 8, 6], 30)
    assert (demo.epochs, demo.stacked_convs, demo.output_dir) == (3, 3, "checkpoints/demo")  # the flags win
    assert (parse(["--demo"]).lr, parse(["--demo", "--arch", "solov2"]).lr) == (0.0015, 0.001)
    assert (demo.optimizer, demo.schedule, parse([]).optimizer, parse([]).schedule) == ("adamw", "cosine", "sgd",
                                                                                        "step")
    with pytest.raises(SystemExit):  # the preset's cosine has no steps
        parse(["--demo", "--lr-steps", "5"])
    assert "--lr-steps: this run's lr follows a cosine over its epochs" in capsys.readouterr().err
    assert parse(["--dem"]).backbone == "resnet18"  # argparse's abbreviation counts too
    plain = parse([])
    assert (plain.backbone, plain.input_height, plain.epochs, plain.stacked_convs) == ("resnet50", 800, 36, 7)
    assert (plain.synthetic_min_size, plain.lr) == (14, None)
    # --help ends with what the preset stands for
    with pytest.raises(SystemExit):
        parse(["--help"])
    shown = capsys.readouterr().out.split("--demo stands for ")[1]
    for words in ("--input-height 160", "--backbone resnet18", "stacked_convs=2", "num_grids=16,12,10,8,6",
                  "--arch solov2: --lr 0.001", "AdamW and a cosine lr", "at least 30 pixels"):
        assert words in " ".join(shown.split()), words


def test_at_most_30_flags():
    # torchvision's groups (data, model, optimisation, run); the model settings beyond --arch, --backbone and
    # --backbone-weights (and --init-from) go through --set; -h/--help is not counted, nor the hidden --hflip (the
    # older spelling of --augment hflip, not listed)
    flags = [a for a in main_train.get_args_parser()._actions if a.option_strings and "--help" not in a.option_strings
             and a.help != argparse.SUPPRESS]
    assert len(flags) <= 30, [a.option_strings[-1] for a in flags]
    assert "--hflip" not in main_train.get_args_parser().format_help()


@pytest.mark.parametrize("words, field, value", [
    (["--arch", "solov2"], "arch", "solov2"), (["--set", "arch=decoupled"], "arch", "decoupled"),
    (["--backbone", "resnet18"], "backbone", "resnet18"), (["--backbone-weights", "none"], "backbone_weights", "none"),
    (["--set", "trainable_backbone=true"], "trainable_backbone", True),
    (["--set", "seg_feat_channels=64"], "seg_feat_channels", 64), (["--set", "stacked_convs=4"], "stacked_convs", 4),
    (["--set", "num_grids=8,6,4,3,2"], "num_grids", (8, 6, 4, 3, 2)),
    (["--set", "mask_feat_channels=128"], "mask_feat_channels", 128), (["--set", "init=xavier"], "init", "xavier"),
    (["--set", "cate_norm=mean"], "cate_norm", "mean")])
def test_every_model_setting_reaches_the_model_config(words, field, value):
    args = parse_train(words)
    assert getattr(ModelConfig.from_args(args), field) == value
    assert getattr(ModelConfig.from_args(parse_train([])), field) == getattr(
        ModelConfig(), field)


def test_every_model_config_field_is_settable_but_the_classes():
    settable = {f.name for f in dataclasses.fields(ModelConfig)} - {"num_classes", "class_names"}
    help_text = main_train.get_args_parser().format_help()
    assert all(name in " ".join(help_text.split()) for name in settable - {"arch", "backbone", "backbone_weights"})


@pytest.mark.parametrize("words, message", [
    (["--set", "colour=red"], "--set colour=red: expected FIELD=VALUE with FIELD one of arch, backbone"),
    (["--set", "num_classes=5"], "--set num_classes=5: expected FIELD=VALUE .* \\(the classes come from the data\\)"),
    (["--set", "stacked_convs"], "--set stacked_convs: expected FIELD=VALUE"),
    (["--set", "stacked_convs=two"], "stacked_convs=two: stacked_convs takes integer values like stacked_convs=7"),
    (["--set", "num_grids=8,6,x"], "num_grids takes comma-separated integer values like num_grids=40,36,24,16,12"),
    (["--set", "trainable_backbone=maybe"], "trainable_backbone takes true or false values"),
    (["--set", "num_grids=8,6,4"], "num_grids \\[8, 6, 4\\] must be 5 grid sizes"),
    (["--set", "init=he"], "init 'he' must be one of \\('solo', 'xavier'\\)")])
def test_a_bad_model_setting_is_a_usage_error_naming_it(words, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_train(words)
    assert stopped.value.code == 2 and re.search(message, capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------------
def test_a_checkpoint_stores_each_tensor_contiguous_and_only_its_own_values(tmp_path):
    # torch.save keeps strides and a view's whole storage: a transposed weight, a channels_last momentum buffer
    # and a slice of a large tensor are stored as plain contiguous tensors of their own size
    big = torch.randn(1000, 1000)  # 4 MB
    state = {"transposed": torch.randn(3, 4).t(), "slice": big[::500, :2],
             "nhwc": torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)}
    save_checkpoint(state, str(tmp_path / "ckpt.pth"))
    stored = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert all(stored[k].is_contiguous() and torch.equal(stored[k], state[k]) for k in state)
    assert os.path.getsize(tmp_path / "ckpt.pth") < 100_000


def test_only_the_newest_keep_epochs_files_stay(data_dir, tmp_path):
    main_train.main(train_args(data_dir, tmp_path, "--epochs", 3, "--workers", 0, "--keep-epochs", 2))
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth")) == [
        "checkpoint.pth", "epoch_001.pth", "epoch_002.pth"]
    assert os.path.samefile(tmp_path / "checkpoint.pth", tmp_path / "epoch_002.pth")


def test_a_file_system_without_hard_links_gets_a_copy(tmp_path, monkeypatch):
    (tmp_path / "epoch_000.pth").write_bytes(b"PK checkpoint bytes")

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    link_checkpoint(str(tmp_path / "epoch_000.pth"), str(tmp_path / "checkpoint.pth"))
    assert (tmp_path / "checkpoint.pth").read_bytes() == b"PK checkpoint bytes"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "epoch_000.pth"]


class TestAtomicWrite:
    def test_a_crash_during_save_keeps_the_previous_checkpoint(self, straight_run, tmp_path, monkeypatch):
        path = tmp_path / "checkpoint.pth"
        path.write_bytes((straight_run[0] / "checkpoint.pth").read_bytes())
        before = path.read_bytes()

        def crashing_save(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError("disk full")

        monkeypatch.setattr(torch, "save", crashing_save)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint({"model": {}}, str(path))
        assert path.read_bytes() == before
        assert os.listdir(tmp_path) == ["checkpoint.pth"]  # the temporary file is gone
        assert load_checkpoint(path)["epoch"] == 1

    def test_latest_checkpoint_skips_partial_files(self, straight_run, tmp_path):
        good = tmp_path / "epoch_001.pth"
        good.write_bytes((straight_run[0] / "epoch_001.pth").read_bytes())
        full = good.read_bytes()
        os.utime(good, (1, 1))  # older than the partial files below
        (tmp_path / ".checkpoint.pth.abc123.tmp").write_bytes(full[: len(full) // 2])  # a save killed midway
        (tmp_path / "epoch_002.pth").write_bytes(full[: len(full) // 2])  # a truncated copy
        (tmp_path / "notes.pth").write_bytes(full)  # not a checkpoint name
        assert latest_checkpoint(str(tmp_path)) == str(good)
        assert latest_checkpoint(str(tmp_path / "missing")) is None

    def test_a_crash_while_training_saves_keeps_the_last_good_checkpoint(self, straight_run, tmp_path, monkeypatch):
        run = tmp_path / "run"
        run.mkdir()
        for name in ("epoch_000.pth", "epoch_001.pth"):
            (run / name).write_bytes((straight_run[0] / name).read_bytes())
        os.link(run / "epoch_001.pth", run / "checkpoint.pth")
        before = (run / "checkpoint.pth").read_bytes()
        real_save = torch.save

        def crashing_save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            f.truncate(100)  # the bytes written so far
            raise KeyboardInterrupt  # e.g. Ctrl-C or a lost Colab session in the middle of the save

        args = parse_train(["--resume", str(run), "--epochs", "3"])
        monkeypatch.setattr(torch, "save", crashing_save)
        with pytest.raises(KeyboardInterrupt):
            main_train.main(args)
        assert (run / "checkpoint.pth").read_bytes() == before
        assert not (run / "epoch_002.pth").exists()
        assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
        assert load_checkpoint(latest_checkpoint(str(run)))["epoch"] == 1


# ----------------------------------------------------------------------------------------------------
class TestBadCheckpoints:
    @pytest.fixture
    def good(self, straight_run):
        return straight_run[0] / "checkpoint.pth"

    def test_missing_file(self, tmp_path):
        with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nope.pth")) + ".*no such file"):
            load_checkpoint(tmp_path / "nope.pth")

    def test_truncated_file(self, tmp_path, good):
        path = tmp_path / "truncated.pth"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*cannot be read.*truncated"):
            load_checkpoint(path)

    def test_random_bytes(self, tmp_path):
        path = tmp_path / "random.pth"
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*cannot be read"):
            load_checkpoint(path)

    @pytest.mark.parametrize("obj", [{"weights": torch.zeros(3)}, [torch.zeros(3)]], ids=["dict", "list"])
    def test_not_a_solo_checkpoint(self, tmp_path, obj):
        path = tmp_path / "other.pth"
        torch.save(obj, path)
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*not a SOLO checkpoint"):
            load_checkpoint(path)

    def test_incomplete_solo_checkpoint(self, tmp_path, good):
        ckpt = load_checkpoint(good)
        del ckpt["optimizer"], ckpt["rng"]
        path = tmp_path / "incomplete.pth"
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + r".*lacks \['optimizer', 'rng'\]"):
            load_checkpoint(path)
        assert load_model(str(path)) is not None  # inference needs only the model and its settings

    def test_state_dict_of_another_model_shape(self, tmp_path, good):
        ckpt = load_checkpoint(good)
        other_cfg = dict(ckpt["model_cfg"], num_grids=[10, 6, 4, 3, 2])
        ckpt["model"] = build_model(other_cfg).state_dict()
        path = tmp_path / "other_shape.pth"
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError,
                           match=re.escape(str(path)) + r".*does not fit.*head\.ins_out_list\.0\.weight: "
                                                        r"checkpoint \(100, 32, 1, 1\), model \(64, 32, 1, 1\)"):
            load_model(str(path))
        # resuming from it fails the same way, before any training
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*does not fit"):
            main_train.main(parse_train(["--resume", str(path), "--epochs", "3"]))

    @pytest.mark.parametrize("edit, message", [
        (dict(num_grids=[8, 6]), r"num_grids \[8, 6\] must be 5 grid sizes"),
        (dict(backbone="vgg16"), r"backbone 'vgg16' is not one of"),
        (dict(colour="red"), r"unexpected keyword argument 'colour'"),
    ], ids=["grids", "backbone", "unknown key"])
    def test_hand_edited_model_settings_name_the_file(self, tmp_path, good, edit, message):
        ckpt = load_checkpoint(good)
        ckpt["model_cfg"] = dict(ckpt["model_cfg"], **edit)
        path = tmp_path / "edited.pth"
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": its model settings are not valid.*"
                                                  + message):
            load_model(str(path))


# ----------------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real_loss = SOLOHead.loss
    calls = []

    def loss_turning_nan(self, *args):
        cate_loss, mask_loss, total_loss = real_loss(self, *args)
        if self.training:
            calls.append(1)
            if len(calls) == 4:  # the second iteration of epoch 1
                nan = total_loss * float("nan")
                return nan, nan, nan
        return cate_loss, mask_loss, total_loss

    monkeypatch.setattr(SOLOHead, "loss", loss_turning_nan)
    with pytest.raises(NonFiniteLossError,
                       match=r"non-finite loss at epoch 1, iteration 4 \(step 2 of the epoch\): total nan, "
                             r"focal nan, dice nan\. Stopped; the newest checkpoint in .* is the last good one"):
        main_train.main(train_args(data_dir, tmp_path, "--epochs", 3, "--workers", 0))
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth")) == ["checkpoint.pth", "epoch_000.pth"]
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 2)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------------
class TestLrSchedule:
    def make(self, lr_steps=(27, 33), warmup_iters=500, iters_per_epoch=1000):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9)
        return optimizer, utils.build_scheduler(optimizer, iters_per_epoch, lr_steps, warmup_iters)

    def test_lr_scales_with_the_total_batch(self):
        assert utils.scaled_lr(2) == pytest.approx(0.01 / 8)  # handout 7.1
        assert utils.scaled_lr(2, world_size=8) == pytest.approx(0.01)
        assert parse_train([]).lr is None  # so the rule applies by default

    def test_warm_up_from_a_third_to_the_full_lr(self):
        optimizer, scheduler = self.make()
        lrs = []
        for _ in range(501):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert lrs[0] == pytest.approx(0.01 / 3)
        assert lrs[250] == pytest.approx(0.01 * 2 / 3)  # linear: half way from 1/3 to 1
        assert lrs[500] == pytest.approx(0.01)
        assert all(a < b for a, b in zip(lrs[:500], lrs[1:501]))

    def test_divided_by_ten_at_epochs_27_and_33(self):
        _, scheduler = self.make(iters_per_epoch=1000)
        factor = scheduler.lr_lambdas[0]
        assert factor(26_999) == pytest.approx(1.0)
        assert factor(27_000) == pytest.approx(0.1)
        assert factor(32_999) == pytest.approx(0.1)
        assert factor(33_000) == pytest.approx(0.01)
        assert factor(35_999) == pytest.approx(0.01)

    def test_steps_and_warm_up_are_flags(self):
        args = parse_train(["--lr-steps", "2", "--warmup-iters", "0"])
        _, scheduler = self.make(args.lr_steps, args.warmup_iters, iters_per_epoch=10)
        factor = scheduler.lr_lambdas[0]
        assert [factor(i) for i in (0, 19, 20, 100)] == pytest.approx([1.0, 1.0, 0.1, 0.1])

    def test_cosine_from_the_full_lr_to_zero_over_the_run(self):
        """The --demo preset's schedule: the warm-up, then half a cosine from the lr to 0 at the run's last
        iteration (lr_steps play no part)."""
        factor = lambda i: utils.lr_factor(i, 10, [2], 5, schedule="cosine", total_iters=100)  # noqa: E731
        assert factor(0) == pytest.approx(1 / 3) and factor(5) == pytest.approx(math.cos(math.pi * 0.05) / 2 + 0.5)
        assert factor(50) == pytest.approx(0.5) and factor(100) == pytest.approx(0.0) and factor(120) == 0.0
        assert all(factor(i) > factor(i + 1) for i in range(5, 100))

    def test_state_dict_resumes_the_schedule(self):
        optimizer, scheduler = self.make(iters_per_epoch=100)
        for _ in range(300):
            optimizer.step()
            scheduler.step()
        state = scheduler.state_dict()
        optimizer2, scheduler2 = self.make(iters_per_epoch=100)
        scheduler2.load_state_dict(state)
        optimizer.step(), scheduler.step(), optimizer2.step(), scheduler2.step()
        assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 / 3 * (1 - 301 / 500) + 301 / 500))


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["solo", pytest.param("decoupled", marks=pytest.mark.slow),
                                  pytest.param("solov2", marks=pytest.mark.slow)])
def test_two_process_distributed_run(data_dir, tmp_path, arch):
    """torchrun --nproc_per_node=2 on the CPU (gloo): 2 train images, one per process and iteration; DDP without
    a search for unused parameters, so every parameter of every head must be in each step's graph."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_train.py",
               *TINY, "--data-dir", data_dir, "--output-dir", str(tmp_path), "--epochs", "2", "--workers", "0",
               "--arch", arch, "--set", "mask_feat_channels=32"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["world_size"] == 2 and ckpt["model_cfg"]["arch"] == arch
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 2)  # 2 images / (2 processes x 1 image) per epoch
    assert ckpt["args"]["lr"] == pytest.approx(0.01 * 2 / 16)  # total batch 2
    assert len(ckpt["history"]["train"]) == 2 and len(ckpt["history"]["test"]) == 2
    assert math.isfinite(ckpt["history"]["test"][0][1])
    assert os.path.isfile(tmp_path / "loss_curve.png")


# ----------------------------------------------------------------------------------------------------
# When the training step waits for the device
# ----------------------------------------------------------------------------------------------------
def all_tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from all_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from all_tensors(value)


def test_the_losses_are_read_once_per_step_after_the_optimizer_step(data_dir, tmp_path, monkeypatch):
    """Reading a loss from the GPU waits for the GPU. The step reads its losses once, after backward and the
    optimizer step have been queued, so the GPU is never idle while the host waits (the CUDA test below checks
    the synchronisations themselves)."""
    events = []
    real_read = engine.read_losses

    def recording_read(losses):
        events.append("read losses")
        return real_read(losses)

    monkeypatch.setattr(engine, "read_losses", recording_read)
    handle = register_optimizer_step_post_hook(lambda *_: events.append("optimizer step"))
    try:
        main_train.main(train_args(data_dir, tmp_path, "--epochs", 1, "--workers", 0))
    finally:
        handle.remove()
    assert events == ["optimizer step", "read losses"] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_synchronises_only_to_read_the_losses(data_dir, tmp_path, monkeypatch):
    """On CUDA, with --amp: inside train_one_epoch the host waits for the device only in read_losses, once per
    iteration, apart from SOLOHead.target and SOLOHead.loss (solo_head.py's business: data-dependent shapes).
    torch.cuda.set_sync_debug_mode warns at every synchronising call; the warning is shown while the call is on
    the stack, so the stack says where it came from."""
    syncs = []  # the function names on the stack of each synchronising call made inside train_one_epoch

    def record(message, category, filename, lineno, file=None, line=None):
        names = [frame.name for frame in traceback.extract_stack()]
        if "synchroniz" in str(message) and "train_one_epoch" in names:
            syncs.append(names)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            main_train.main(train_args(data_dir, tmp_path, "--epochs", 1, "--workers", 1, "--device", "cuda",
                                       "--amp"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ours = [names for names in syncs if not {"target", "loss"} & set(names)]
    callers = [names[names.index("train_one_epoch") + 1] for names in ours]  # the function train_one_epoch called
    # float16 (a GPU without bfloat16) adds the GradScaler's read of its inf check, in train_step
    scaled = compute_path.autocast_settings(torch.device("cuda"), True)[1]
    allowed = {"read_losses", "train_step"} if scaled else {"read_losses"}
    assert callers.count("read_losses") == 2 and set(callers) <= allowed, ours
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)  # no map_location: as saved
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in all_tensors(ckpt))
