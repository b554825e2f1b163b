"""The users' day end to end, on the CPU: main_train.py -> per-epoch checkpoint -> resume_train.py -> main_infer.py
(overlays, mask mAP), and the overfit check: a small model trained on 8 synthetic images segments those same
images (mask AP50 >= 0.7), which holds only when targets, losses and post-processing agree with each other.
"""
import json
import math
import os

import torch

import main_infer
import main_train
import resume_train
from synthetic import write_synthetic_dataset

TINY = ["--backbone", "resnet18", "--backbone-weights", "none", "--stacked-convs", "1", "--seg-feat-channels", "32",
        "--num-grids", "8", "6", "4", "3", "2", "--input-height", "64", "--batch-size", "2", "--log-every", "1",
        "--device", "cpu", "--workers", "0"]
# The overfit check runs the demo's reduced model (README, "The demo") for a fixed number of iterations.
OVERFIT = ["--demo", "--data-dir", "{data}", "--synthetic", "0", "--limit-images", "8", "--batch-size", "8",
           "--epochs", "{epochs}", "--lr-steps", "{step}", "--warmup-iters", "10", "--no-test-loss", "--save-every", "{epochs}",
           "--log-every", "10", "--device", "cpu", "--workers", "0"]
OVERFIT_EPOCHS = 200  # iterations too: 8 images, batch 8


def test_train_checkpoint_resume_infer(tmp_path):
    data, ckpt, fig = tmp_path / "data", tmp_path / "checkpoints", tmp_path / "figures"
    write_synthetic_dataset(str(data), num_images=10, seed=1, workers=1)  # 8 train, 2 test images
    common = TINY + ["--data-dir", str(data), "--output-dir", str(ckpt), "--figures-dir", str(fig)]

    first = main_train.main(main_train.get_args_parser().parse_args(common + ["--epochs", "1"]))
    assert first["epoch"] == 0 and os.path.isfile(ckpt / "epoch_000.pth")

    # the session dies; resume_train carries on from the newest checkpoint with the stored settings
    second = resume_train.main(resume_train.get_args_parser().parse_args(["--output-dir", str(ckpt),
                                                                          "--epochs", "2"]))
    assert second["epoch"] == 1 and second["iteration"] == 8  # 2 epochs of 4 iterations
    checkpoint = main_train.load_checkpoint(str(ckpt / "checkpoint.pth"))
    iterations = [row[0] for row in checkpoint["history"]["train"]]
    assert iterations == list(range(1, 9))  # the loss history continues where it stopped
    assert all(math.isfinite(v) for row in checkpoint["history"]["train"] for v in row[1:])
    assert os.path.isfile(fig / "loss_curve.png")

    metrics = main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint-dir", str(ckpt), "--figures-dir", str(fig), "--device", "cpu", "--workers", "0",
         "--num-figures", "2"]))
    assert [os.path.basename(p) for p in metrics["overlays"]] == ["infer_0.png", "infer_1.png"]
    with open(fig / "map.json") as f:
        stored = json.load(f)
    for key in ("AP", "AP50", "AP75"):
        assert metrics[key] is None or math.isnan(metrics[key]) or 0 <= metrics[key] <= 1
        assert key in stored
    assert set(stored["per_class"]) == {"vehicle", "person", "animal"}
    assert os.path.isfile(metrics["pr_curve"])


def test_overfitting_8_images_segments_them(tmp_path):
    data, ckpt, fig = tmp_path / "data", tmp_path / "checkpoints", tmp_path / "figures"
    write_synthetic_dataset(str(data), num_images=10, seed=0, min_size=30, max_objects=4, workers=1)  # as --demo
    argv = [a.format(data=data, epochs=OVERFIT_EPOCHS, step=OVERFIT_EPOCHS * 3 // 4) for a in OVERFIT]
    args = main_train.parse_args(argv + ["--output-dir", str(ckpt), "--figures-dir", str(fig)])
    main_train.main(args)

    model = main_train.load_model(str(ckpt / "checkpoint.pth"))
    train_set, _ = main_train.build_datasets(str(data), 0, args.input_height)
    train_set.indices = train_set.indices[:8]  # the 8 images it trained on (--limit-images 8)
    with torch.inference_mode():
        coco_eval, _ = main_infer.evaluate_test_split(model, train_set, torch.device("cpu"), 8, 0, str(fig), 0, 0.3)
    metrics = main_infer.map_summary(coco_eval)
    assert metrics["AP50"] >= 0.7, metrics
