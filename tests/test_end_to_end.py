"""The users' day end to end, on the CPU, through the scripts themselves: main_train.py -> per-epoch checkpoints ->
resume_train.py's command -> main_infer.py (overlays, mask mAP), and the mAP it reports is a real one.

The data holds 8 synthetic scenes, each copied 25 times (200 images); the 80/20 split puts copies of the same
scenes into the train and the test split, so the test split's mAP measures how well the --demo model learnt the 8
scenes: above the floor only when targets, losses and post-processing agree with each other (an overfit check).
"""
import json
import math
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

import main_infer
import main_train
import resume_train
from conftest import parse_train
from checkpoint import load_checkpoint
from datafiles import write_dataset
from dataset import BuildDataset
from synthetic import write_synthetic_dataset

SCENES, COPIES = 8, 25  # 160 train / 40 test images: 20 iterations of batch 8 per epoch
EPOCHS = 10  # 200 iterations
DEMO = ["--demo", "--synthetic", "0", "--epochs", str(EPOCHS), "--warmup-iters", "10", "--workers", "1",
        "--keep-epochs", "1"]


def copied_scenes(folder, tmp_path):
    """A dataset of SCENES synthetic scenes (objects of 30 px or more, as --demo), each COPIES times."""
    source = BuildDataset(write_synthetic_dataset(str(tmp_path / "scenes"), num_images=SCENES, seed=0, min_size=30,
                                                  workers=1), input_height=128)
    scenes = [[t.numpy() for t in source.get_raw(i)] for i in range(SCENES)]  # image, labels, masks, boxes
    scenes = [(image, masks, labels, boxes) for image, labels, masks, boxes in scenes]  # write_dataset's order
    write_dataset(str(folder), (scenes[i % SCENES] for i in range(SCENES * COPIES)), SCENES * COPIES, 300, 400)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run folder, the two summaries): main_train.py for half the epochs (the session dies there), then
    resume_train.py's command to the end."""
    tmp_path = tmp_path_factory.mktemp("end_to_end")
    data, run = tmp_path / "data", tmp_path / "run"
    copied_scenes(data, tmp_path)
    common = DEMO + ["--data-dir", str(data), "--output-dir", str(run)]
    first = main_train.main(parse_train(common + ["--epochs", str(EPOCHS // 2)]))
    command = resume_train.main(*resume_train.get_args_parser().parse_known_args(["--output-dir", str(run), "--epochs",
                                                                                  str(EPOCHS)]))
    second = main_train.main(parse_train(command[1:]))
    return run, first, second


def infer(run, figures, *flags):
    return main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint-dir", str(run), "--figures-dir", str(figures), "--device", "cpu", "--workers", "1", *flags]))


@pytest.mark.slow
def test_train_resume_infer_reports_a_real_map(trained, tmp_path):
    run, first, second = trained
    fig = tmp_path / "figures"
    assert first["epoch"] == EPOCHS // 2 - 1
    assert second["epoch"] == EPOCHS - 1 and second["iteration"] == EPOCHS * 20
    checkpoint = load_checkpoint(str(run / "checkpoint.pth"))
    iterations = [row[0] for row in checkpoint["history"]["train"]]
    assert iterations == list(range(10, EPOCHS * 20 + 1, 10))  # --log-every 10; the history continues
    train = np.array(checkpoint["history"]["train"])
    assert np.isfinite(train).all() and train[-1, 1] < 0.5 * train[0, 1]  # the total loss fell
    assert sorted(n for n in os.listdir(run) if n.endswith(".pth")) == ["checkpoint.pth", f"epoch_{EPOCHS - 1:03d}.pth"]

    metrics = infer(run, fig, "--num-figures", "2")
    assert [os.path.basename(p) for p in metrics["overlays"]] == ["infer_0.png", "infer_1.png"]
    assert metrics["num_images"] == SCENES * COPIES // 5
    # an untrained model scores about 0; the AdamW demo preset's run reaches AP50 0.70, AP 0.19 here (shape-only
    # scenes, the cosine stretched to the resumed run's longer --epochs)
    assert metrics["AP50"] >= 0.6 and metrics["AP"] >= 0.15, metrics
    with open(fig / "map.json") as f:
        stored = json.load(f)
    assert stored["AP50"] == metrics["AP50"] and set(stored["per_class"]) == {"vehicle", "person", "animal"}
    assert all(math.isfinite(m["AP"]) for m in metrics["per_class"].values() if m["num_gt"])


def matched_detections(reference, other, min_score):
    """For each detection of `reference` (a COCO results list) scoring at least min_score: (mask IoU, score
    difference) of the best-overlapping detection of `other` in the same image and class, or None."""
    out = []
    for det in (d for d in reference if d["score"] >= min_score):
        same = [d for d in other if d["image_id"] == det["image_id"] and d["category_id"] == det["category_id"]]
        if not same:
            out.append(None)
            continue
        ious = mask_utils.iou([d["segmentation"] for d in same], [det["segmentation"]], [0])[:, 0]
        best = int(np.argmax(ious))
        out.append((float(ious[best]), abs(same[best]["score"] - det["score"])))
    return out


@pytest.mark.slow
def test_bfloat16_inference_keeps_the_float32_detections(trained, tmp_path):
    """The network under bfloat16 autocast + channels_last (--amp on, the path a CPU with native bfloat16 takes by
    itself; only slower elsewhere) against float32 on the trained model: the tolerance docs/performance.md states.
    Every float32 detection scoring 0.3 or more has a bfloat16 one of its class with mask IoU 0.9 or more, 95 % of
    them score within 0.02 of it (Matrix NMS decays the lower of two overlapping masks, so two near-equal scores
    that swap places can move one score further), and the mAP moves by less than 0.02."""
    run, _, _ = trained
    full = infer(run, tmp_path / "float32", "--num-figures", "0", "--amp", "off", "--channels-last", "off")
    half = infer(run, tmp_path / "bfloat16", "--num-figures", "0", "--amp", "on", "--channels-last", "on")
    for key in ("AP", "AP50", "AP75"):
        assert abs(full[key] - half[key]) < 0.02, (key, full[key], half[key])
    with open(full["results_json"]) as f, open(half["results_json"]) as g:
        matches = matched_detections(json.load(f), json.load(g), min_score=0.3)
    assert len(matches) >= 40 and None not in matches
    ious, score_changes = np.array(matches).T
    assert ious.min() >= 0.9 and np.percentile(score_changes, 95) <= 0.02, (ious.min(), sorted(score_changes)[-5:])
