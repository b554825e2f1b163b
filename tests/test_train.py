"""Specification of main_train.py and resume_train.py: outputs of a run, exact resume, atomic checkpoints, clear
checkpoint errors, stopping on a non-finite loss, the lr schedule, a 2-process DistributedDataParallel run, and the
performance flags (--channels-last, --compile, one host-device sync per training step).

Everything runs on the CPU with a tiny model (ResNet-18 FPN with random weights, one conv per tower, 32 channels,
small grids) on 10 synthetic images at 64x96 (8 train, 2 test images), batch 1, 2 iterations per epoch; the
--compile test uses the --demo model. One CUDA-only test (skipped without a GPU) checks the host-device syncs.
"""
import math
import os
import re
import subprocess
import sys
import time
import traceback
import warnings

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import main_train
import resume_train
from main_train import CHECKPOINT_KEYS, CheckpointError, NonFiniteLossError, latest_checkpoint, load_checkpoint
from solo_head import SOLOHead, build_model
from synthetic import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = ["--backbone", "resnet18", "--backbone-weights", "none", "--stacked-convs", "1",
              "--seg-feat-channels", "32", "--num-grids", "8", "6", "4", "3", "2"]
TINY = TINY_MODEL + ["--input-height", "64", "--batch-size", "1", "--log-every", "1", "--device", "cpu", "--hflip"]
TWO_ITERS = ["--limit-images", "2"]  # 2 train images of the 8, batch 1: 2 iterations per epoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(str(directory), num_images=10, seed=0)
    return str(directory)


def train_args(data_dir, run_dir, *extra):
    return main_train.get_args_parser().parse_args(
        TINY + TWO_ITERS + ["--data-dir", data_dir, "--output-dir", str(run_dir / "ckpt"),
                            "--figures-dir", str(run_dir / "fig"), *map(str, extra)])


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
        ckpt = run_dir / "ckpt"
        assert sorted(os.listdir(ckpt)) == ["checkpoint.pth", "epoch_000.pth", "epoch_001.pth", "losses.csv",
                                            "test_losses.csv"]
        assert summary["checkpoint"] == str(ckpt / "checkpoint.pth") and summary["epoch"] == 1
        with open(run_dir / "fig" / "loss_curve.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    def test_losses_csv_has_a_row_per_logged_iteration(self, straight_run):
        run_dir, _ = straight_run
        rows = read_csv(run_dir / "ckpt" / "losses.csv")
        assert rows[0] == ["iteration", "total_loss", "focal_loss", "dice_loss"]
        assert [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4]  # --log-every 1, 2 epochs of 2 iterations
        test_rows = read_csv(run_dir / "ckpt" / "test_losses.csv")
        assert test_rows[0] == ["epoch", "total_loss", "focal_loss", "dice_loss"]
        assert [int(r[0]) for r in test_rows[1:]] == [0, 1]

    def test_checkpoint_has_the_contract_keys_and_finite_losses(self, straight_run):
        run_dir, summary = straight_run
        ckpt = torch.load(run_dir / "ckpt" / "checkpoint.pth", map_location="cpu", weights_only=True)
        assert set(CHECKPOINT_KEYS) <= set(ckpt)
        assert ckpt["format"] == "solo-checkpoint-v1"
        assert (ckpt["epoch"], ckpt["iteration"]) == (1, 4)
        assert ckpt["model_cfg"]["num_grids"] == [8, 6, 4, 3, 2] and ckpt["model_cfg"]["backbone"] == "resnet18"
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
        path = run_dir / "ckpt" / "checkpoint.pth"
        model = main_train.load_model(str(path), "cpu")
        assert not model.training
        ckpt = load_checkpoint(path)
        assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
        assert latest_checkpoint(str(run_dir / "ckpt")) == str(path)


# ----------------------------------------------------------------------------------------------------
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(data_dir, straight_run, tmp_path):
    main_train.main(train_args(data_dir, tmp_path, "--epochs", 1, "--workers", 1))
    assert sorted(os.listdir(tmp_path / "ckpt"))[:2] == ["checkpoint.pth", "epoch_000.pth"]
    summary = resume_train.main(resume_train.get_args_parser().parse_args(
        ["--output-dir", str(tmp_path / "ckpt"), "--epochs", "2"]))
    assert summary["epoch"] == 1

    straight = load_checkpoint(straight_run[0] / "ckpt" / "checkpoint.pth")
    resumed = load_checkpoint(tmp_path / "ckpt" / "checkpoint.pth")
    assert straight["model"].keys() == resumed["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert straight["scheduler"] == resumed["scheduler"]
    assert straight["history"] == resumed["history"]
    assert (resumed["epoch"], resumed["iteration"]) == (1, 4)
    for name in ("losses.csv", "test_losses.csv"):
        assert read_csv(straight_run[0] / "ckpt" / name) == read_csv(tmp_path / "ckpt" / name)


def test_device_preprocessing_trains_exactly_as_the_workers_preprocessing(data_dir, tmp_path):
    # --device-preprocess (the CUDA default): raw uint8 items, each batch preprocessed by dataset.preprocess_batch;
    # on the CPU the same tensors, so the same flips (--hflip), losses and weights
    runs = {}
    for flag in ("--device-preprocess", "--no-device-preprocess"):
        run_dir = tmp_path / flag
        main_train.main(train_args(data_dir, run_dir, "--epochs", 1, "--workers", 0, flag))
        runs[flag] = load_checkpoint(run_dir / "ckpt" / "checkpoint.pth")
    raw, plain = runs["--device-preprocess"], runs["--no-device-preprocess"]
    assert raw["args"]["device_preprocess"] and not plain["args"]["device_preprocess"]
    assert raw["history"] == plain["history"]
    for key, value in plain["model"].items():
        assert torch.equal(value, raw["model"][key]), key


def test_resume_keeps_or_overrides_the_speed_flags(straight_run):
    ckpt_dir = str(straight_run[0] / "ckpt")
    kept = resume_train.resume_args(resume_train.get_args_parser().parse_args(["--output-dir", ckpt_dir]))
    # the default --device-preprocess is stored undecided, so a resume on another device decides again
    assert kept.device_preprocess is None and not kept.channels_last and not kept.compile
    changed = resume_train.resume_args(resume_train.get_args_parser().parse_args(
        ["--output-dir", ckpt_dir, "--no-device-preprocess", "--channels-last", "--compile"]))
    assert changed.device_preprocess is False and changed.channels_last and changed.compile


def test_save_every_n_epochs_and_after_the_last(data_dir, tmp_path):
    main_train.main(train_args(data_dir, tmp_path, "--epochs", 3, "--save-every", 2, "--workers", 0,
                               "--no-test-loss"))
    # 0-based epochs: epoch 1 completes the 2nd epoch; epoch 2 is the last
    assert sorted(n for n in os.listdir(tmp_path / "ckpt") if n.endswith(".pth")) == [
        "checkpoint.pth", "epoch_001.pth", "epoch_002.pth"]
    with pytest.raises(ValueError, match="--save-every must be >= 1"):
        main_train.main(train_args(data_dir, tmp_path / "zero", "--save-every", 0))


def test_demo_preset_gives_defaults_that_flags_override():
    demo = main_train.parse_args(["--demo", "--epochs", "3"])
    assert (demo.backbone, demo.backbone_weights, demo.input_height, demo.synthetic) == ("resnet18", "none", 128, 600)
    assert demo.epochs == 3 and demo.output_dir == "checkpoints/demo"
    assert main_train.parse_args(["--dem"]).backbone == "resnet18"  # argparse's abbreviation counts too
    plain = main_train.parse_args([])
    assert (plain.backbone, plain.input_height, plain.epochs) == ("resnet50", 800, 36)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume in"):
        resume_train.main(resume_train.get_args_parser().parse_args(["--output-dir", str(tmp_path)]))
    # the script exits non-zero with the message, no traceback
    result = subprocess.run([sys.executable, "resume_train.py", "--output-dir", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "error: no checkpoint to resume in" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------
def test_a_checkpoint_stores_each_tensor_contiguous_and_only_its_own_values(tmp_path):
    # torch.save keeps strides and a view's whole storage: a transposed weight, a channels_last momentum buffer
    # and a slice of a large tensor are stored as plain contiguous tensors of their own size
    big = torch.randn(1000, 1000)  # 4 MB
    state = {"transposed": torch.randn(3, 4).t(), "slice": big[::500, :2],
             "nhwc": torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)}
    main_train.save_checkpoint(state, str(tmp_path / "ckpt.pth"))
    stored = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert all(stored[k].is_contiguous() and torch.equal(stored[k], state[k]) for k in state)
    assert os.path.getsize(tmp_path / "ckpt.pth") < 100_000


class TestAtomicWrite:
    def test_a_crash_during_save_keeps_the_previous_checkpoint(self, straight_run, tmp_path, monkeypatch):
        path = tmp_path / "checkpoint.pth"
        path.write_bytes((straight_run[0] / "ckpt" / "checkpoint.pth").read_bytes())
        before = path.read_bytes()

        def crashing_save(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError("disk full")

        monkeypatch.setattr(torch, "save", crashing_save)
        with pytest.raises(OSError, match="disk full"):
            main_train.save_checkpoint({"model": {}}, str(path))
        assert path.read_bytes() == before
        assert os.listdir(tmp_path) == ["checkpoint.pth"]  # the temporary file is gone
        assert load_checkpoint(path)["epoch"] == 1

    def test_latest_checkpoint_skips_partial_files(self, straight_run, tmp_path):
        good = tmp_path / "epoch_001.pth"
        good.write_bytes((straight_run[0] / "ckpt" / "epoch_001.pth").read_bytes())
        full = good.read_bytes()
        os.utime(good, (1, 1))  # older than the partial files below
        (tmp_path / ".checkpoint.pth.abc123.tmp").write_bytes(full[: len(full) // 2])  # a save killed midway
        (tmp_path / "epoch_002.pth").write_bytes(full[: len(full) // 2])  # a truncated copy
        (tmp_path / "notes.pth").write_bytes(full)  # not a checkpoint name
        assert latest_checkpoint(str(tmp_path)) == str(good)
        assert latest_checkpoint(str(tmp_path / "missing")) is None

    def test_a_crash_while_training_saves_keeps_the_last_good_checkpoint(self, data_dir, straight_run, tmp_path,
                                                                        monkeypatch):
        run = tmp_path / "ckpt"
        run.mkdir()
        for name in ("checkpoint.pth", "epoch_000.pth", "epoch_001.pth"):
            (run / name).write_bytes((straight_run[0] / "ckpt" / name).read_bytes())
        before = (run / "checkpoint.pth").read_bytes()
        real_save = torch.save

        def crashing_save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            f.truncate(100)  # the bytes written so far
            raise KeyboardInterrupt  # e.g. Ctrl-C or a lost Colab session in the middle of the save

        monkeypatch.setattr(torch, "save", crashing_save)
        args = resume_train.resume_args(resume_train.get_args_parser().parse_args(
            ["--output-dir", str(run), "--epochs", "3", "--figures-dir", str(tmp_path / "fig")]))
        with pytest.raises(KeyboardInterrupt):
            main_train.main(args)
        assert (run / "checkpoint.pth").read_bytes() == before
        assert not (run / "epoch_002.pth").exists()
        assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
        assert load_checkpoint(latest_checkpoint(str(run)))["epoch"] == 1


# ----------------------------------------------------------------------------------------------------
class TestBadCheckpoints:
    @pytest.fixture
    def good_bytes(self, straight_run):
        return (straight_run[0] / "ckpt" / "checkpoint.pth").read_bytes()

    def test_missing_file(self, tmp_path):
        with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nope.pth")) + ".*no such file"):
            load_checkpoint(tmp_path / "nope.pth")

    def test_truncated_file(self, tmp_path, good_bytes):
        path = tmp_path / "truncated.pth"
        path.write_bytes(good_bytes[: len(good_bytes) // 3])
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

    def test_incomplete_solo_checkpoint(self, tmp_path, straight_run):
        ckpt = load_checkpoint(straight_run[0] / "ckpt" / "checkpoint.pth")
        del ckpt["optimizer"], ckpt["rng"]
        path = tmp_path / "incomplete.pth"
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + r".*lacks \['optimizer', 'rng'\]"):
            load_checkpoint(path)
        assert main_train.load_model(str(path)) is not None  # inference needs only the model and its settings

    def test_state_dict_of_another_model_shape(self, tmp_path, straight_run):
        ckpt = load_checkpoint(straight_run[0] / "ckpt" / "checkpoint.pth")
        other_cfg = dict(ckpt["model_cfg"], num_grids=[10, 6, 4, 3, 2])
        ckpt["model"] = build_model(other_cfg).state_dict()
        path = tmp_path / "other_shape.pth"
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError,
                           match=re.escape(str(path)) + r".*does not fit.*head\.ins_out_list\.0\.weight: "
                                                        r"checkpoint \(100, 32, 1, 1\), model \(64, 32, 1, 1\)"):
            main_train.load_model(str(path))
        # resuming from it fails the same way, before any training
        args = resume_train.resume_args(resume_train.get_args_parser().parse_args(
            ["--checkpoint", str(path), "--epochs", "3"]))
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*does not fit"):
            main_train.main(args)


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
                             r"focal nan, dice nan.*last good checkpoint"):
        main_train.main(train_args(data_dir, tmp_path, "--epochs", 3, "--workers", 0))
    run = tmp_path / "ckpt"
    assert sorted(n for n in os.listdir(run) if n.endswith(".pth")) == ["checkpoint.pth", "epoch_000.pth"]
    ckpt = load_checkpoint(run / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 2)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------------
class TestLrSchedule:
    def make(self, *flags, iters_per_epoch=1000):
        args = main_train.get_args_parser().parse_args(list(flags))
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01, momentum=0.9)
        return optimizer, main_train.build_scheduler(optimizer, iters_per_epoch, args)

    def test_lr_scales_with_the_total_batch(self):
        assert main_train.scaled_lr(2) == pytest.approx(0.01 / 8)  # handout 7.1
        assert main_train.scaled_lr(2, world_size=8) == pytest.approx(0.01)
        assert main_train.get_args_parser().parse_args([]).lr is None  # so the rule applies by default

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

    def test_every_value_is_a_flag(self):
        _, scheduler = self.make("--lr-steps", "2", "--lr-gamma", "0.5", "--warmup-iters", "0",
                                 iters_per_epoch=10)
        factor = scheduler.lr_lambdas[0]
        assert [factor(i) for i in (0, 19, 20, 100)] == [1.0, 1.0, 0.5, 0.5]

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
def test_two_process_distributed_run(data_dir, tmp_path):
    """torchrun --nproc_per_node=2 on the CPU (gloo): 4 train images, one per process and iteration."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_train.py",
               *TINY, "--limit-images", "4", "--data-dir", data_dir, "--output-dir", str(tmp_path / "ckpt"),
               "--figures-dir", str(tmp_path / "fig"), "--epochs", "1", "--workers", "0"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "ckpt" / "checkpoint.pth")
    assert ckpt["world_size"] == 2
    assert (ckpt["epoch"], ckpt["iteration"]) == (0, 2)  # 4 images / (2 processes x 1 image)
    assert ckpt["args"]["lr"] == pytest.approx(0.01 * 2 / 16)  # total batch 2
    assert len(ckpt["history"]["train"]) == 2 and len(ckpt["history"]["test"]) == 1
    assert math.isfinite(ckpt["history"]["test"][0][1])
    assert os.path.isfile(tmp_path / "fig" / "loss_curve.png")


# ----------------------------------------------------------------------------------------------------
# Performance flags: --channels-last, --compile, and when the training step waits for the device
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


def assert_close_state(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


class TestChannelsLast:
    def test_a_channels_last_run_saves_the_usual_layout_and_resumes_to_the_plain_result(self, data_dir,
                                                                                         straight_run, tmp_path):
        main_train.main(train_args(data_dir, tmp_path, "--epochs", 1, "--workers", 1, "--channels-last"))
        path = tmp_path / "ckpt" / "checkpoint.pth"
        ckpt = load_checkpoint(path)
        # the file holds contiguous tensors, as a run without the flag writes them (torch.save keeps strides)
        conv_weight = ckpt["model"]["backbone.body.conv1.weight"]  # (64, 3, 7, 7)
        assert conv_weight.is_contiguous() and not conv_weight.is_contiguous(memory_format=torch.channels_last)
        assert all(t.is_contiguous() for t in all_tensors([ckpt["model"], ckpt["optimizer"]]))
        # ... and loads into a model built without the flag
        model = main_train.load_model(str(path), "cpu")
        assert all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())

        # resuming (with the stored --channels-last) ends where the plain 2-epoch run ends, to float rounding
        resume_train.main(resume_train.get_args_parser().parse_args(
            ["--output-dir", str(tmp_path / "ckpt"), "--epochs", "2"]))
        resumed = load_checkpoint(path)
        plain = load_checkpoint(straight_run[0] / "ckpt" / "checkpoint.pth")
        assert resumed["args"]["channels_last"] and not plain["args"]["channels_last"]
        assert (resumed["epoch"], resumed["iteration"]) == (1, 4)
        assert_close_state(resumed["model"], plain["model"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(resumed["history"]["train"], plain["history"]["train"], rtol=1e-4)

    def test_momentum_buffers_take_their_parameters_layout(self):
        param = torch.nn.Parameter(torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last))
        optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
        stored = torch.randn(4, 3, 5, 5)  # contiguous, as a checkpoint holds it
        optimizer.load_state_dict({"state": {0: {"momentum_buffer": stored}},
                                   "param_groups": optimizer.state_dict()["param_groups"]})
        main_train.match_parameter_layout(optimizer)
        buffer = optimizer.state[param]["momentum_buffer"]
        assert buffer.stride() == param.stride()
        assert torch.equal(buffer, stored)


@pytest.mark.slow
def test_compiled_run_computes_the_eager_losses_and_saves_a_plain_checkpoint(data_dir, tmp_path):
    """--compile (the --demo model at 64x96, 2 iterations). Marked slow: 1.5 to 2 minutes on 2 CPU cores, nearly all
    compiling (20 s once torch's compile cache in /tmp holds the kernels); `-m "not slow"` leaves it out."""
    def demo_args(run_dir, *extra):
        return main_train.parse_args(
            ["--demo", "--data-dir", data_dir, "--synthetic", "0", "--input-height", "64", "--batch-size", "2",
             "--limit-images", "4", "--max-iters", "2", "--log-every", "1", "--workers", "0", "--no-test-loss",
             "--output-dir", str(run_dir / "ckpt"), "--figures-dir", str(run_dir / "fig"), *extra])

    main_train.main(demo_args(tmp_path / "eager"))
    start = time.perf_counter()
    main_train.main(demo_args(tmp_path / "compiled", "--compile"))
    print(f"compiled run: {time.perf_counter() - start:.0f} s")

    eager = load_checkpoint(tmp_path / "eager" / "ckpt" / "checkpoint.pth")
    compiled = load_checkpoint(tmp_path / "compiled" / "ckpt" / "checkpoint.pth")
    assert compiled["args"]["compile"] and compiled["iteration"] == 2
    # compiling changes the speed, not the numbers (up to the order of float sums in fused kernels)
    np.testing.assert_allclose(compiled["history"]["train"], eager["history"]["train"], rtol=1e-4)
    # the state dict has the module's own keys (no "_orig_mod." of a torch.compile wrapper) ...
    assert compiled["model"].keys() == eager["model"].keys()
    assert_close_state(compiled["model"], eager["model"], rtol=1e-4, atol=1e-6)
    # ... so the checkpoint loads into an uncompiled model, as main_infer.py builds it
    model = main_train.load_model(str(tmp_path / "compiled" / "ckpt" / "checkpoint.pth"))
    assert model._compiled_call_impl is None
    assert all(torch.equal(v, compiled["model"][k]) for k, v in model.state_dict().items())


def test_the_losses_are_read_once_per_step_after_the_optimizer_step(data_dir, tmp_path, monkeypatch):
    """Reading a loss from the GPU waits for the GPU. The step reads its losses once, after backward and the
    optimizer step have been queued, so the GPU is never idle while the host waits (the CUDA test below checks
    the synchronisations themselves)."""
    events = []
    real_read = main_train.read_losses

    def recording_read(losses, distributed):
        events.append("read losses")
        return real_read(losses, distributed)

    monkeypatch.setattr(main_train, "read_losses", recording_read)
    handle = register_optimizer_step_post_hook(lambda *_: events.append("optimizer step"))
    try:
        main_train.main(train_args(data_dir, tmp_path, "--epochs", 1, "--workers", 0, "--no-test-loss"))
    finally:
        handle.remove()
    assert events == ["optimizer step", "read losses"] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_step_synchronises_only_to_read_the_losses(data_dir, tmp_path, monkeypatch):
    """On CUDA, with --amp --channels-last: inside train_one_epoch the host waits for the device only in
    read_losses, once per iteration, apart from SOLOHead.target and SOLOHead.loss (solo_head.py's business: data-
    dependent shapes). torch.cuda.set_sync_debug_mode warns at every synchronising call; the warning is shown while
    the call is on the stack, so the stack says where it came from."""
    syncs = []  # the function names on the stack of each synchronising call made inside train_one_epoch

    def record(message, category, filename, lineno, file=None, line=None):
        names = [frame.name for frame in traceback.extract_stack()]
        if "synchroniz" in str(message) and "train_one_epoch" in names:
            syncs.append(names)

    real_train_one_epoch = main_train.train_one_epoch

    def train_one_epoch_watched(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return real_train_one_epoch(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(main_train, "train_one_epoch", train_one_epoch_watched)
    args = train_args(data_dir, tmp_path, "--epochs", 1, "--workers", 1, "--device", "cuda", "--amp",
                      "--channels-last", "--no-test-loss")
    main_train.main(args)
    ours = [names for names in syncs if not {"target", "loss"} & set(names)]
    callers = [names[names.index("train_one_epoch") + 1] for names in ours]  # the function train_one_epoch called
    # float16 (a GPU without bfloat16) adds the GradScaler's read of its inf check, in optimizer_step
    scaled = main_train.autocast_settings(torch.device("cuda"), True)[1]
    allowed = {"read_losses", "optimizer_step"} if scaled else {"read_losses"}
    assert callers.count("read_losses") == 2 and set(callers) <= allowed, ours
    ckpt = torch.load(tmp_path / "ckpt" / "checkpoint.pth", weights_only=True)  # no map_location: as saved
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in all_tensors(ckpt))
