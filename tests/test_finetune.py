"""Specification of fine-tuning, main_train.py --init-from FILE (finetune.py): a new run on other data starts from a
SOLO checkpoint's weights (one of our runs', or a converted published model's, backbone_weights 'checkpoint'). Its
architecture is the file's; every tensor whose name and shape fit is loaded; the category output is re-initialised
(normal std 0.01, the prior bias) when the classes differ; the run prints what it loaded; the backbone stays frozen
unless --set trainable_backbone=true; the run's own checkpoint resumes exactly without reading the file again; bad
input is one error naming the file.

Tiny models on the CPU, as tests/test_train.py's: a ResNet-18 FPN (random, trained) with one 32-channel conv per
tower, and a frozen ResNet-34 FPN for the converted model; 3 synthetic images at 64x96, batch 1.
"""
import dataclasses
import re
import shutil
import subprocess
import sys

import pytest
import torch

import main_train
from checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from conftest import assert_same_training_state, parse_train
from errors import CheckpointError
from finetune import CATE_OUT, load_init_weights
from model import ModelConfig, build_model
from solo_head import PRIOR_BIAS
from train_settings import DEMO
from test_train import REPO, TINY, TINY_MODEL, read_csv, resume, train_args

RUN = TINY[len(TINY_MODEL):]  # TINY's data and run flags; the model comes from the file
COURSE = ModelConfig().class_names  # the synthetic data's classes
TINY_CFG = dict(backbone="resnet18", backbone_weights="none", stacked_convs=1, seg_feat_channels=32,
                num_grids=(8, 6, 4, 3, 2))


@pytest.fixture(scope="module")
def data_dir(three_images):
    return three_images


@pytest.fixture(scope="module")
def our_run(data_dir, tmp_path_factory):
    """The checkpoint of a 1-epoch tiny run of ours on the course's classes."""
    run_dir = tmp_path_factory.mktemp("ours")
    main_train.main(train_args(data_dir, run_dir, "--epochs", 1, "--workers", 0))
    return run_dir / "checkpoint.pth"


def write_checkpoint(path, converted=False, seed=0, **cfg):
    """A hand-made SOLO checkpoint of the model ModelConfig(**TINY_CFG, **cfg) builds, every float tensor moved off
    its initial value (so that a loaded tensor differs from a built one); converted: as convert.py writes them (no
    training state)."""
    cfg = ModelConfig(**{**TINY_CFG, **cfg})
    torch.manual_seed(seed)
    state = build_model(cfg, load_backbone_weights=False).state_dict()
    generator = torch.Generator().manual_seed(seed)
    state = {k: v + 0.01 * (torch.rand(v.shape, generator=generator) - 0.5) if v.is_floating_point() else v
             for k, v in state.items()}
    ckpt = {"format": CHECKPOINT_FORMAT, "model": state, "model_cfg": dataclasses.asdict(cfg)}
    if converted:
        ckpt.update(optimizer=None, scheduler=None, converted_from=dict(file="hand-made", scheme="none"))
    torch.save(ckpt, path)
    return str(path)


def start(data_dir, path, *flags):
    """The model a run with --init-from path starts from, as main_train.train builds it, and its InitReport."""
    args = parse_train(RUN + ["--data-dir", data_dir, "--init-from", str(path), *flags])
    cfg = dataclasses.replace(ModelConfig.from_args(args), num_classes=len(COURSE) + 1, class_names=COURSE)
    model = build_model(cfg, load_backbone_weights=False)
    return model, load_init_weights(model, cfg, str(path))


def file_state(path):
    return load_checkpoint(path, keys=("model",))["model"]


# ----------------------------------------------------------------------------------------------------
def test_the_same_classes_load_every_tensor(data_dir, our_run):
    model, init_report = start(data_dir, our_run)
    stored = file_state(our_run)
    assert model.state_dict().keys() == stored.keys()
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    assert (init_report.not_loaded, init_report.unused) == ({}, [])
    assert str(init_report) == f"--init-from {our_run}: loaded {len(stored)} of the model's {len(stored)} tensors"


@pytest.mark.parametrize("cfg", [
    dict(num_classes=3, class_names=("cat", "dog"), init="xavier"),  # xavier: the build's own init has no prior
    dict(class_names=("cat", "dog", "bird")),
    dict(class_names=tuple(reversed(COURSE)))], ids=["fewer classes", "other names", "other order"])
def test_other_classes_reinitialise_only_the_category_output(data_dir, tmp_path, cfg):
    path = write_checkpoint(tmp_path / "other_classes.pth", **cfg)
    model, init_report = start(data_dir, path)
    stored = file_state(path)
    state = model.state_dict()
    assert [k for k in state if k not in CATE_OUT and not torch.equal(state[k], stored[k])] == []
    weight, bias = state["head.cate_out.weight"], state["head.cate_out.bias"]
    assert weight.shape[0] == bias.shape[0] == len(COURSE)
    assert 0.008 < weight.std().item() < 0.012 and abs(weight.mean().item()) < 0.002  # normal(0, 0.01)
    assert torch.equal(bias, torch.full_like(bias, PRIOR_BIAS))  # each class starts at probability 0.01
    assert list(init_report.not_loaded) == list(CATE_OUT) and init_report.unused == []
    names = ModelConfig(**{**TINY_CFG, **cfg}).class_names
    classes = f"(the file's {len(names)}: {', '.join(names)}; the data's 3: {', '.join(COURSE)})"
    assert str(init_report).splitlines()[1:] == [
        f"  not loaded, re-initialised for the new classes {classes}: head.cate_out.weight, head.cate_out.bias"]


def test_what_is_not_loaded_is_named_and_grouped_by_module(data_dir, tmp_path):
    path = write_checkpoint(tmp_path / "headless.pth")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("backbone.fpn.")}
    ckpt["model"]["head.old_branch.weight"] = torch.zeros(3)
    ckpt["model"]["head.ins_out_list.0.weight"] = torch.zeros(5, 32, 1, 1)
    torch.save(ckpt, path)
    model, init_report = start(data_dir, path)
    fpn = sum(k.startswith("backbone.fpn.") for k in model.state_dict())
    assert fpn > 6  # more than a few: counted per module
    lines = str(init_report).splitlines()
    assert re.fullmatch(rf"--init-from {re.escape(path)}: loaded \d+ of the model's \d+ tensors", lines[0])
    assert lines[1:] == [
        f"  not loaded, not in the file (kept as built): backbone.fpn.* ({fpn})",
        "  not loaded, shape differs from the file's (kept as built): head.ins_out_list.0.weight",
        "  the file's tensors without a place in the model: head.old_branch.weight"]


def test_a_converted_model_starts_a_frozen_run_whose_checkpoint_is_its_own(data_dir, tmp_path, capsys):
    coco = tuple(f"coco class {k}" for k in range(1, 81))
    path = write_checkpoint(tmp_path / "converted.pth", converted=True, backbone="resnet34",
                            backbone_weights="checkpoint", num_classes=81, class_names=coco)
    run_dir = tmp_path / "run"
    summary = main_train.main(parse_train(RUN + ["--data-dir", data_dir, "--init-from", path, "--output-dir",
                                                 str(run_dir), "--epochs", "1", "--workers", "0"]))
    assert summary["epoch"] == 0
    assert ("not loaded, re-initialised for the new classes (the file's 80: coco class 1, coco class 2, coco class 3, "
            f"...; the data's 3: {', '.join(COURSE)}): head.cate_out.weight, "
            "head.cate_out.bias") in capsys.readouterr().out
    ckpt = load_checkpoint(run_dir / "checkpoint.pth")
    cfg = ckpt["model_cfg"]
    assert (cfg["backbone"], cfg["backbone_weights"], cfg["trainable_backbone"]) == ("resnet34", "checkpoint", False)
    assert (cfg["num_classes"], cfg["class_names"], cfg["stacked_convs"]) == (4, COURSE, 1)
    assert ckpt["args"]["init_from"] == path and ckpt["args"]["backbone"] == "resnet34"
    stored = file_state(path)
    backbone = [k for k in stored if k.startswith("backbone.")]
    assert backbone and all(torch.equal(ckpt["model"][k], stored[k]) for k in backbone)  # frozen: as loaded
    assert not torch.equal(ckpt["model"]["head.cate_convs.0.0.weight"], stored["head.cate_convs.0.0.weight"])

    # --set trainable_backbone=true fine-tunes the backbone too (layer2-layer4 and the FPN), from the file's weights
    model, init_report = start(data_dir, path, "--set", "trainable_backbone=true")
    assert any(p.requires_grad for p in model.backbone.body.layer4.parameters())
    assert not any(p.requires_grad for p in model.backbone.body.conv1.parameters())
    assert all(torch.equal(model.state_dict()[k], stored[k]) for k in backbone)


def test_a_fine_tuning_run_resumes_exactly_without_reading_its_init_file_again(data_dir, tmp_path):
    path = write_checkpoint(tmp_path / "init.pth", num_classes=3, class_names=("cat", "dog"))
    runs = {}
    for name, epochs in (("straight", 2), ("interrupted", 1)):
        runs[name] = tmp_path / name
        main_train.main(parse_train(RUN + ["--data-dir", data_dir, "--init-from", path, "--output-dir",
                                           str(runs[name]), "--epochs", str(epochs), "--workers", "0"]))
    shutil.move(path, tmp_path / "moved.pth")  # a resumed run has its own weights
    assert resume("--output-dir", str(runs["interrupted"]), "--epochs", "2")["epoch"] == 1

    straight, resumed = (load_checkpoint(runs[name] / "checkpoint.pth") for name in ("straight", "interrupted"))
    assert_same_training_state(straight, resumed)
    assert resumed["model_cfg"] == straight["model_cfg"] and resumed["model_cfg"]["class_names"] == COURSE
    for name in ("losses.csv", "test_losses.csv"):
        assert read_csv(runs["straight"] / name) == read_csv(runs["interrupted"] / name)


def test_the_demo_preset_keeps_the_files_model_and_set_may_change_two_settings(our_run):
    args = parse_train(["--demo", "--init-from", str(our_run), "--set", "trainable_backbone=true", "cate_norm=mean"])
    assert (args.backbone, args.stacked_convs, args.seg_feat_channels, args.num_grids) == (
        "resnet18", 1, 32, [8, 6, 4, 3, 2])  # the file's, not the preset's (2 convs of 64 channels)
    # the preset's data and schedule
    assert (args.input_height, args.synthetic, args.lr) == (DEMO["input_height"], 600, DEMO["lr"])
    assert (args.trainable_backbone, args.cate_norm) == (True, "mean")
    # flags equal to the file's are accepted
    assert parse_train(TINY + ["--init-from", str(our_run)]).stacked_convs == 1


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--backbone", "resnet50"], "--backbone resnet50 (the file has resnet18)"),
    (["--arch", "solov2"], "--arch solov2 (the file has solo)"),
    (["--backbone-weights", "coco"], "--backbone-weights coco (the file has none)"),
    (["--set", "stacked_convs=2", "num_grids=8,6,4,3,1"],
     "--set stacked_convs=2 (the file has 1); --set num_grids=8,6,4,3,1 (the file has 8,6,4,3,2)")],
    ids=["backbone", "arch", "weights", "set"])
def test_flags_that_contradict_the_files_architecture_are_refused(our_run, flags, message):
    with pytest.raises(CheckpointError) as refused:
        parse_train(["--init-from", str(our_run), *flags])
    assert str(refused.value) == (
        f"--init-from {our_run}: the model's architecture is the file's, and the command line contradicts it: "
        f"{message}. Drop those flags (only --set trainable_backbone=... and --set cate_norm=... may differ from "
        f"the file)")


def test_bad_files_and_init_from_with_resume_are_one_error_naming_the_file(our_run, tmp_path):
    takes = "--init-from takes a SOLO checkpoint written by main_train.py or convert.py"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {tmp_path / 'nope.pth'}: no such file; {takes}")):
        parse_train(["--init-from", str(tmp_path / "nope.pth")])
    torch.save({"state_dict": {"conv.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {tmp_path / 'other.pth'} is not a SOLO checkpoint "
                                                        f"(format None, expected 'solo-checkpoint-v1'; its keys: "
                                                        f"['state_dict']); {takes}")):
        parse_train(["--init-from", str(tmp_path / "other.pth")])
    with pytest.raises(CheckpointError, match=re.escape(f"--init-from {our_run} and --resume {our_run}: a resumed run "
                                                        f"continues from its own checkpoint")):
        parse_train(["--resume", str(our_run), "--init-from", str(our_run)])
    empty = load_checkpoint(our_run)
    empty["model"] = {}
    torch.save(empty, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match=re.escape(f"--init-from {tmp_path / 'empty.pth'}: none of its tensors "
                                                        f"fits the model built from its model_cfg; {takes}")):
        start(str(tmp_path), tmp_path / "empty.pth")
    broken = load_checkpoint(our_run)
    broken["model"]["head.cate_out.bias"][0] = float("nan")
    torch.save(broken, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=re.escape(f"--init-from {tmp_path / 'nan.pth'} holds NaN or infinite "
                                                        f"weights (1 tensors, the first head.cate_out.bias)")):
        start(str(tmp_path), tmp_path / "nan.pth")
    # the script: one `error:` line, exit code 1, no traceback
    result = subprocess.run([sys.executable, "main_train.py", "--init-from", str(tmp_path / "other.pth")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'other.pth'} is not a SOLO "
                                                  f"checkpoint (format None, expected 'solo-checkpoint-v1'; its keys: "
                                                  f"['state_dict']); {takes}"]
