"""Specification of main_infer.py end to end, on a tiny random model (resnet18, no pretrained weights) and a tiny
synthetic dataset: test-split overlays, map.json and the PR plot; overlays of a folder of photos; clear errors.

The model's category bias is raised so that it detects things everywhere: the post-processing, the overlays
and the mAP code then all see detections (their values are meaningless, only their ranges are checked).
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main_infer
from checkpoint import load_checkpoint, save_checkpoint
from dataset import build_test_split, normalize_
from errors import CheckpointError
from imagefiles import photo_input
from model import SOLO, build_model
from synthetic import write_synthetic_dataset

INPUT_HEIGHT = 64  # a multiple of 32: 64 x 85 images padded to 64 x 96
TINY_MODEL = dict(backbone="resnet18", backbone_weights="none", stacked_convs=1, seg_feat_channels=32,
                  num_grids=[8, 6, 4, 3, 2])
KEYS = {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class", "num_images", "num_gt", "num_detections"}


def tiny_checkpoint(data_dir):
    """A checkpoint dict following the solo-checkpoint-v1 contract, for a random tiny model."""
    torch.manual_seed(0)
    model = build_model(TINY_MODEL)
    torch.nn.init.constant_(model.head.cate_out.bias, 2.0)  # sigmoid(2) = 0.88: every cell is a candidate
    args = dict(data_dir=str(data_dir), synthetic=0, input_height=INPUT_HEIGHT, seed=0)
    return {"format": "solo-checkpoint-v1", "model": model.state_dict(), "model_cfg": TINY_MODEL,
            "optimizer": {}, "scheduler": {}, "scaler": None, "epoch": 0, "iteration": 1,
            "history": {"train": [], "test": []}, "rng": {}, "args": args}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(data dir with 15 synthetic images -> 3 test images, checkpoint dir holding checkpoint.pth)."""
    root = tmp_path_factory.mktemp("infer")
    data_dir, ckpt_dir = root / "data", root / "checkpoints"
    write_synthetic_dataset(str(data_dir), num_images=15, seed=0, workers=1)
    ckpt_dir.mkdir()
    save_checkpoint(tiny_checkpoint(data_dir), str(ckpt_dir / "checkpoint.pth"))
    return data_dir, ckpt_dir


def parse(*argv):
    return main_infer.get_args_parser().parse_args(["--device", "cpu", "--workers", "0", *argv])


def test_test_split_overlays_map_json_and_pr_curve(setup, tmp_path):
    _, ckpt_dir = setup
    figures = tmp_path / "figures"
    # no --checkpoint: the newest in --checkpoint-dir; 3 test images, batches of 2, overlays of the first 2
    metrics = main_infer.main(parse("--checkpoint-dir", str(ckpt_dir), "--figures-dir", str(figures),
                                    "--batch-size", "2", "--num-figures", "2", "--plot-score-thresh", "0",
                                    "--workers", "2"))

    assert sorted(os.listdir(figures)) == ["infer_0.png", "infer_1.png", "map.json", "pr_curve.png",
                                           "segm_results.json"]
    assert metrics["overlays"] == [str(figures / "infer_0.png"), str(figures / "infer_1.png")]
    assert metrics["checkpoint"] == str(ckpt_dir / "checkpoint.pth")
    assert metrics["num_images"] == 3 and metrics["num_gt"] > 0 and metrics["num_detections"] > 0

    assert all(0 <= metrics[k] <= 1 for k in ("AP", "AP50", "AP75"))
    for m in metrics["per_class"].values():  # a number for each class with ground truth, nan for the others
        assert all(0 <= m[k] <= 1 if m["num_gt"] else math.isnan(m[k]) for k in ("AP", "AP50"))

    saved = json.load(open(figures / "map.json"))
    assert KEYS <= set(saved)
    assert set(saved["per_class"]) == {"vehicle", "person", "animal"}
    assert all(set(m) == {"AP", "AP50", "num_gt"} for m in saved["per_class"].values())
    assert saved["AP"] == pytest.approx(metrics["AP"], nan_ok=True)
    assert (saved["checkpoint"], saved["overlays"]) == (metrics["checkpoint"], metrics["overlays"])
    # the detections as a COCO results json: the test images' indices in the files as ids, labels as categories
    results = json.load(open(figures / "segm_results.json"))
    assert len(results) == metrics["num_detections"]
    assert {r["image_id"] for r in results} <= set(build_test_split(
        load_checkpoint(metrics["checkpoint"])["args"]).indices)
    assert {r["category_id"] for r in results} <= {1, 2, 3}


def test_amp_runs_the_network_in_bfloat16(setup, monkeypatch, tmp_path):
    _, ckpt_dir = setup
    seen = []
    infer = SOLO.infer

    def recording_infer(model, img, ori_size, cfg=None, scaled_size=None):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return infer(model, img, ori_size, cfg, scaled_size)

    monkeypatch.setattr(SOLO, "infer", recording_infer)
    metrics = main_infer.main(parse("--checkpoint", str(ckpt_dir / "checkpoint.pth"), "--num-figures", "0",
                                    "--figures-dir", str(tmp_path), "--amp"))
    assert seen and all(seen)
    assert metrics["num_detections"] > 0


def test_ground_truth_as_predictions_scores_one(setup, monkeypatch, tmp_path):
    # the mAP ground truth is dataset.get_raw of the test Subset's own indices, in the 300 x 400 frame: an oracle
    # that answers each test image with exactly that ground truth must get AP = 1
    _, ckpt_dir = setup
    test_set = build_test_split(load_checkpoint(str(ckpt_dir / "checkpoint.pth"))["args"])
    assert len(test_set) == 3 and test_set.dataset.ori_size == (300, 400)
    assert test_set.dataset.input_size == (INPUT_HEIGHT, 96)
    inputs = [test_set[k][0] for k in range(len(test_set))]  # (3, 64, 96) each
    raw = [test_set.dataset.get_raw(i) for i in test_set.indices]

    def oracle(model, img, ori_size, cfg=None, scaled_size=None):
        assert [tuple(size) for size in ori_size] == [(300, 400)] * len(img)  # one size per image
        scores_list, labels_list, masks_list = [], [], []
        for x in img:
            k = min(range(len(inputs)), key=lambda k: (x - inputs[k]).abs().max())  # workers differ by ~1e-6
            _, labels, masks, _ = raw[k]
            scores_list.append(torch.linspace(1, 0.5, len(labels)))
            labels_list.append(labels)
            masks_list.append(masks.float())
        return scores_list, labels_list, masks_list

    monkeypatch.setattr(SOLO, "infer", oracle)
    metrics = main_infer.main(parse("--checkpoint", str(ckpt_dir / "checkpoint.pth"), "--num-figures", "0",
                                    "--figures-dir", str(tmp_path)))
    assert metrics["num_gt"] == metrics["num_detections"] == sum(len(r[1]) for r in raw)
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == pytest.approx(1.0)
    for m in metrics["per_class"].values():
        assert m["AP"] == pytest.approx(1.0) if m["num_gt"] else math.isnan(m["AP"])
    assert metrics["overlays"] == []


def test_own_photos_of_any_size(setup, tmp_path):
    _, ckpt_dir = setup
    photos, figures = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(photos / "wide.png")
    Image.fromarray(rng.integers(0, 256, (150, 90), dtype=np.uint8)).save(photos / "tall.JPG")  # grey JPEG
    (photos / "notes.txt").write_text("not an image")

    result = main_infer.main(parse("--checkpoint", str(ckpt_dir / "checkpoint.pth"), "--images", str(photos),
                                   "--figures-dir", str(figures), "--plot-score-thresh", "0"))
    assert sorted(os.listdir(figures)) == ["tall_JPG_infer.png", "wide_png_infer.png"]
    assert sorted(result["overlays"]) == [str(figures / "tall_JPG_infer.png"), str(figures / "wide_png_infer.png")]
    assert result["skipped"] == []


def test_photo_preprocessing_matches_the_dataset_frame():
    # height -> the input height, width int(H * w / h), padded right/bottom with zeros to multiples of 32
    photo = np.full((3, 150, 90), 128, dtype=np.uint8)
    img = photo_input(photo, 64)
    assert img.shape == (1, 3, 64, 64) and img.dtype == np.float32  # 64 x int(64 * 90 / 150) = 64 x 38, padded
    assert (img[..., 38:] == 0).all() and (img[..., :38] != 0).all()
    wide = photo_input(np.zeros((3, 300, 400), dtype=np.uint8), 96)
    assert wide.shape == (1, 3, 96, 128)  # 96 x 128 exactly, as BuildDataset makes 300 x 400 images
    # the normalisation is the dataset's: a grey photo at the input size gives the dataset's values
    grey = np.full((3, 96, 128), 100, dtype=np.uint8)
    np.testing.assert_allclose(photo_input(grey, 96)[0], normalize_(torch.from_numpy(grey).float() / 255).numpy(),
                               atol=1e-6)


def test_empty_photo_folder_is_a_clear_error(setup, tmp_path):
    _, ckpt_dir = setup
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no photos here")
    with pytest.raises(FileNotFoundError, match=r"no JPEG/PNG images.*empty"):
        main_infer.main(parse("--checkpoint", str(ckpt_dir / "checkpoint.pth"),
                              "--images", str(tmp_path / "empty"), "--figures-dir", str(tmp_path / "out")))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "epoch_007.pth"
    with pytest.raises(CheckpointError, match=str(missing)):
        main_infer.main(parse("--checkpoint", str(missing), "--figures-dir", str(tmp_path)))


def test_no_checkpoint_in_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint found in .*empty_dir.*--checkpoint"):
        main_infer.main(parse("--checkpoint-dir", str(tmp_path / "empty_dir"), "--figures-dir", str(tmp_path)))
