"""Specification of your own data: COCO-format json + image folder (cocofiles.py, dataset.COCODataset), through
training, evaluation with the json's own ids (pycocotools) and the standard results json.

Small hand-written jsons over a few generated PNG/JPEG images, the course files converted by to_coco.py, and a
tiny 5-class synthetic COCO set trained for a few iterations on the CPU.
"""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import main_infer
import main_train
import solo_head
from conftest import parse_train
from checkpoint import load_checkpoint, load_model
from coco_eval import evaluate_masks, map_summary, save_results_json
from cocofiles import det_annotations
from datafiles import split_indices
from dataset import BuildDataLoader, BuildDataset, COCODataset, build_datasets, course_to_coco, split_dataset
from engine import evaluate_map
from errors import CheckpointError, DataError
from model import SOLO, build_model
from solo_head import POSTPROCESS_MAP, SOLOHead
from synthetic import CLASS_NAMES_5, write_synthetic_coco

CATEGORIES = [dict(id=1, name="cat"), dict(id=2, name="dog")]
CATEGORY_IDS = (3, 7, 12, 20, 41)  # the 5-class run's: ids of any values
SQUARE = [[10, 10, 30, 10, 30, 30, 10, 30]]  # one polygon: the square x, y in 10..30
TINY = ["--backbone", "resnet18", "--backbone-weights", "none", "--set", "stacked_convs=1",
        "seg_feat_channels=32", "num_grids=8,6,4,3,2", "--input-height", "64", "--batch-size", "2", "--log-every", "1",
        "--device", "cpu", "--workers", "0"]


def write_image(folder, name, height, width, mode="RGB", seed=0, **save):
    """A random image file; returns its json entry (the id is set by the caller)."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode in ("L", "P") else (height, width, len(mode))
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(os.path.join(folder, name), **save)
    return dict(file_name=name, height=height, width=width)


def write_json(path, images, annotations, categories=CATEGORIES):
    with open(path, "w") as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return str(path)


def ann(ann_id, image_id, segmentation, category_id=1, **extra):
    return dict(id=ann_id, image_id=image_id, category_id=category_id, segmentation=segmentation, **extra)


def uncompressed_rle(mask):
    """COCO's uncompressed RLE of an (H, W) mask: run lengths of the column-major pixels, zeros first."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return dict(size=list(mask.shape), counts=([0] if flat[0] else []) + runs)


@pytest.fixture
def folder(tmp_path):
    """A folder with 40x50 image a.png (id 1) and a json path beside it."""
    entry = write_image(tmp_path, "a.png", 40, 50)
    return tmp_path, dict(entry, id=1)


def dataset_of(tmp_path, images, annotations, categories=CATEGORIES, **kwargs):
    return COCODataset(write_json(tmp_path / "data.json", images, annotations, categories), tmp_path,
                       input_height=64, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Same tensors as the course path
# ----------------------------------------------------------------------------------------------------
def test_course_files_as_coco_give_the_same_items_and_split(synthetic_paths, tmp_path):
    train_json, val_json = course_to_coco(synthetic_paths, tmp_path / "coco")
    images = str(tmp_path / "coco" / "images")
    course = BuildDataset(synthetic_paths, input_height=64)
    course_train, course_test = split_dataset(course)
    coco_train, coco_test = build_datasets(train_data=(train_json, images), val_data=(val_json, images),
                                           input_height=64)
    for course_split, coco_split in ((course_train, coco_train), (course_test, coco_test)):
        assert [coco_split.dataset.image_id(i) for i in coco_split.indices] == course_split.indices
        for k in range(len(course_split)):
            for a, b in zip(course_split[k], coco_split[k]):  # img, label, mask, bbox: bit for bit
                assert a.dtype == b.dtype and torch.equal(a, b)
    assert coco_train.dataset.class_names == course.class_names
    # the course data's ground truth for mAP is the same either way: images, categories and masks
    ours, theirs = coco_test.dataset.coco_gt(range(len(coco_test))), course.coco_gt(course_test.indices)
    assert ours.getImgIds() == theirs.getImgIds() and ours.getCatIds() == theirs.getCatIds()
    for image_id in ours.getImgIds():
        a, b = (gt.loadAnns(gt.getAnnIds(imgIds=[image_id])) for gt in (ours, theirs))
        assert [x["category_id"] for x in a] == [y["category_id"] for y in b]
        assert all((ours.annToMask(x) == theirs.annToMask(y)).all() for x, y in zip(a, b))


def test_synthetic_coco_with_three_classes_has_the_course_format_scenes(synthetic_paths, tmp_path):
    train_json, val_json = write_synthetic_coco(tmp_path, num_images=12, seed=0, workers=1, num_classes=3,
                                                image_format="png")
    coco = COCODataset(val_json, tmp_path / "images")
    course = BuildDataset(synthetic_paths)
    for k, index in enumerate(split_indices(12)[1]):
        for a, b in zip(course.get_raw(index), coco.get_raw(k)):
            assert torch.equal(a, b)


def test_five_class_synthetic_coco_set(tmp_path):
    train_json, val_json = write_synthetic_coco(tmp_path, num_images=30, seed=0, workers=1)
    train = COCODataset(train_json, tmp_path / "images")
    assert train.class_names == CLASS_NAMES_5 and len(train) == 24
    labels = torch.cat([train.get_raw(i)[1] for i in range(len(train))])
    assert set(labels.tolist()) == {1, 2, 3, 4, 5}  # every class is drawn
    assert all(name.endswith(".jpg") for name in os.listdir(tmp_path / "images"))


# ----------------------------------------------------------------------------------------------------
# Segmentations, boxes, crowd regions, category ids
# ----------------------------------------------------------------------------------------------------
def test_polygons_and_both_rle_forms_decode_to_the_same_masks(folder):
    tmp_path, image = folder
    two_squares = SQUARE + [[35, 5, 45, 5, 45, 15, 35, 15]]  # one object in two parts
    expected = mask_util.decode(mask_util.merge(mask_util.frPyObjects(two_squares, 40, 50)))  # (40, 50)
    by_hand = np.zeros((40, 50), np.uint8)
    by_hand[10:30, 10:30] = by_hand[5:15, 35:45] = 1  # the two squares' pixels
    assert (expected & by_hand).sum() / (expected | by_hand).sum() > 0.85  # pycocotools rasterises the edges
    compressed = mask_util.encode(np.asfortranarray(expected))
    anns = [ann(1, 1, two_squares), ann(2, 1, uncompressed_rle(expected)),
            ann(3, 1, dict(size=[40, 50], counts=compressed["counts"].decode()))]
    _, labels, masks, boxes = dataset_of(tmp_path, [image], anns).get_raw(0)
    assert masks.shape == (3, 40, 50) and masks.dtype == torch.uint8
    for mask in masks:
        np.testing.assert_array_equal(mask.numpy(), expected)
    # no bbox in the json: the tight box of the mask (pixel-edge: x2 = last column + 1)
    rows, cols = np.flatnonzero(expected.any(1)), np.flatnonzero(expected.any(0))
    assert boxes[0].tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def test_boxes_come_from_the_json_clipped_to_the_image(folder):
    tmp_path, image = folder
    anns = [ann(1, 1, SQUARE, bbox=[8.5, 9, 22, 21.5]), ann(2, 1, SQUARE, bbox=[-5, 30, 100, 20])]
    _, _, _, boxes = dataset_of(tmp_path, [image], anns).get_raw(0)
    assert boxes.tolist() == [[8.5, 9, 30.5, 30.5], [0, 30, 50, 40]]


def positive_cells(dataset):
    """The category targets (all levels, flattened) of a dataset's first item, from a tiny SOLO head."""
    img, label, mask, bbox = dataset[0]
    head = SOLOHead(num_classes=3, in_channels=32, seg_feat_channels=32, stacked_convs=1, num_grids=(8, 6, 4, 3, 2))
    sizes = [(2 * img.shape[1] // s, 2 * img.shape[2] // s) for s in (8, 8, 16, 32, 32)]
    preds = [torch.zeros(1, s * s, *size) for s, size in zip(head.seg_num_grids, sizes)]
    _, _, cate = head.target(preds, [bbox], [label], [mask])
    return torch.cat([c.flatten() for c in cate[0]])


def test_crowd_regions_are_no_target_and_ignored_by_evaluation_as_coco_does(folder):
    tmp_path, image = folder
    crowd = np.zeros((40, 50), np.uint8)
    crowd[5:35, 32:48] = 1
    square, region = ann(1, 1, SQUARE), ann(2, 1, uncompressed_rle(crowd), iscrowd=1)
    with_crowd = dataset_of(tmp_path, [image], [square, region])
    assert with_crowd.num_objects.tolist() == [1] and with_crowd.num_crowd.tolist() == [1]
    assert with_crowd[0][1].tolist() == [1]  # the item holds the square only
    # the crowd region gives no positive cell: the targets are those of the square alone, while the same region
    # as an ordinary object would have cells of its own
    alone = positive_cells(dataset_of(tmp_path, [image], [square]))
    assert torch.equal(positive_cells(with_crowd), alone) and (alone > 0).any()
    as_object = positive_cells(dataset_of(tmp_path, [image], [square, dict(region, iscrowd=0)]))
    assert (as_object > 0).sum() > (alone > 0).sum()
    # evaluation: a confident detection of the crowd region is no false positive (COCO ignores it); with the
    # region missing from the ground truth it is one, and AP falls
    square_mask = with_crowd.get_raw(0)[2][0].numpy()  # (40, 50)
    dets = det_annotations(1, [0.95, 0.9], [1, 1], np.stack([crowd, square_mask]))
    assert map_summary(evaluate_masks(with_crowd.coco_gt([0]), dets))["AP"] == pytest.approx(1.0)
    without = dataset_of(tmp_path, [image], [square])
    assert map_summary(evaluate_masks(without.coco_gt([0]), dets))["AP"] < 0.9


def test_category_ids_of_any_values_map_to_labels_and_back(tmp_path):
    # ids 12, 3, 7 listed out of order: labels follow the ids' order, results use the json's ids
    train_json, val_json = write_synthetic_coco(tmp_path, num_images=10, seed=1, workers=1, num_classes=3,
                                                category_ids=(3, 7, 12))
    data = json.load(open(val_json))
    data["categories"] = data["categories"][::-1]
    write_json(val_json, data["images"], data["annotations"], data["categories"])
    dataset = COCODataset(val_json, tmp_path / "images")
    assert dataset.class_names == ("vehicle", "person", "animal") and dataset.category_ids == (3, 7, 12)
    raw = [dataset.get_raw(i) for i in range(len(dataset))]
    by_id = {a["id"]: a for a in data["annotations"]}
    assert [int(label) for r in raw for label in r[1]] == [[3, 7, 12].index(a["category_id"]) + 1
                                                           for a in by_id.values()]

    def oracle(model, img, ori_size, cfg=None, scaled_size=None):  # the ground truth as detections
        assert [tuple(size) for size in ori_size] == [(300, 400)] * len(img)
        found = [raw[k] for k in range(len(img))]
        return [torch.linspace(1, 0.5, len(r[1])) for r in found], [r[1] for r in found], [r[2] for r in found]

    model = build_model(dict(backbone="resnet18", backbone_weights="none", num_classes=4))
    SOLO.infer, saved = oracle, SOLO.infer
    try:
        coco_eval = evaluate_map(model, torch.utils.data.Subset(dataset, range(len(dataset))), torch.device("cpu"),
                                 batch_size=len(dataset), workers=0)
    finally:
        SOLO.infer = saved
    metrics = map_summary(coco_eval)
    assert metrics["AP"] == pytest.approx(1.0) and list(metrics["per_class"]) == ["vehicle", "person", "animal"]
    dets = coco_eval.cocoDt.dataset["annotations"]
    assert sorted(d["category_id"] for d in dets) == sorted(a["category_id"] for a in data["annotations"])
    assert {d["image_id"] for d in dets} == {im["id"] for im in data["images"]}


def test_images_of_three_sizes_in_one_batch(tmp_path):
    images = [dict(write_image(tmp_path, f"{k}.png", h, w, seed=k), id=10 + k)
              for k, (h, w) in enumerate([(30, 40), (40, 40), (20, 50)])]
    anns = [ann(k + 1, 10 + k, [[2, 2, 18, 2, 18, 15, 2, 15]], category_id=1 + k % 2) for k in range(3)]
    dataset = dataset_of(tmp_path, images, anns)
    items = [dataset[k] for k in range(3)]
    assert [tuple(item[0].shape[1:]) for item in items] == [(64, 96), (64, 64), (64, 160)]  # 85, 64, 160 padded
    img, labels, masks, boxes = BuildDataLoader.collect_fn(items)
    assert img.shape == (3, 3, 64, 160) and [m.shape for m in masks] == [(1, 64, 160)] * 3
    for k, (item_img, _, item_mask, _) in enumerate(items):  # each image top-left, zeros beyond
        width = item_img.shape[2]
        assert torch.equal(img[k, :, :, :width], item_img) and not img[k, :, :, width:].any()
        assert torch.equal(masks[k][:, :, :width], item_mask) and not masks[k][:, :, width:].any()
    # the network trains on the batch, and each image's detections come back in its own original frame
    model = build_model(dict(backbone="resnet18", backbone_weights="none", stacked_convs=1, seg_feat_channels=32,
                             num_grids=(8, 6, 4, 3, 2), num_classes=3, class_names=dataset.class_names))
    torch.nn.init.constant_(model.head.cate_out.bias, 2.0)  # every cell a candidate
    cate, ins = model(img)
    assert torch.isfinite(model.head.loss(cate, ins, *model.head.target(ins, boxes, labels, masks))[2])
    scores, labels, masks = model.infer(img, [dataset.image_size(k) for k in range(3)])
    assert [tuple(m.shape[1:]) for m in masks] == [(30, 40), (40, 40), (20, 50)]

    # each image's own crop: a candidate whose stride-4 mask covers the left half of its image's resized content
    # (the rest of the batch's 64 x 160 frame is 0) comes back as the left half of that image's original frame
    scaled_widths = iter([85, 64, 160])  # int(64 * w / h), before the padding to multiples of 32

    def left_half(ins_pred_img, cell):
        mask = torch.zeros(len(cell), 64 // 4, 160 // 4)
        mask[:, :, :round(next(scaled_widths) / 8)] = 1
        return mask
    model.head.cell_masks = left_half
    cate = [torch.zeros(3, s, s, 2) for s in model.head.seg_num_grids]
    cate[2][:, 1, 1, 0] = 0.9  # one candidate per image, on a stride-16 level
    sizes = [dataset.image_size(k) for k in range(3)]
    _, _, found = model.head.PostProcess([torch.zeros(3, 1, 1, 1)] * 5, cate, sizes, POSTPROCESS_MAP)
    for mask, (height, width) in zip(found, sizes):
        columns = mask[0].amax(0) > 0  # (width,)
        assert mask.shape == (1, height, width) and (mask[0].amax(1) > 0).all()  # every row
        assert columns[:width // 2 - 1].all() and not columns[width // 2 + 2:].any(), (height, width)


def test_results_json_loads_with_loadres_and_its_map_is_pycocotools_own(tmp_path):
    train_json, val_json = write_synthetic_coco(tmp_path, num_images=20, seed=2, workers=1)
    dataset = COCODataset(val_json, tmp_path / "images")
    rng = np.random.default_rng(0)
    dets = []
    for i in range(len(dataset)):  # known predictions: each object shifted a few pixels, a few spurious masks
        _, labels, masks, _ = dataset.get_raw(i)
        shifted = np.roll(masks.numpy(), int(rng.integers(0, 6)), axis=2)
        spurious = np.roll(masks.numpy()[:1], 60, axis=1)
        scores = rng.uniform(0.2, 1, len(labels) + 1)
        categories = [dataset.category_ids[k - 1] for k in labels.tolist()] + [dataset.category_ids[0]]
        dets += det_annotations(dataset.image_id(i), scores, categories, np.concatenate([shifted, spurious]),
                                first_id=len(dets) + 1)
    ours = map_summary(evaluate_masks(dataset.coco_gt(range(len(dataset))), dets))
    path = save_results_json(dets, str(tmp_path / "results.json"))

    gt = COCO(val_json)
    theirs = COCOeval(gt, gt.loadRes(path), "segm")
    theirs.evaluate(), theirs.accumulate(), theirs.summarize()
    assert [ours[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == pytest.approx(
        list(theirs.stats[:6]), nan_ok=True, abs=1e-12)
    assert 0.1 < ours["AP"] < 0.9  # a case where the numbers say something


# ----------------------------------------------------------------------------------------------------
# Image files
# ----------------------------------------------------------------------------------------------------
def test_grey_palette_rgba_and_exif_rotated_images_load_as_rgb(tmp_path):
    images = [dict(write_image(tmp_path, "grey.png", 20, 30, "L"), id=1),
              dict(write_image(tmp_path, "palette.png", 20, 30, "P"), id=2),
              dict(write_image(tmp_path, "rgba.png", 20, 30, "RGBA"), id=3)]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": the stored 20x30 is shown 30x20
    write_image(tmp_path, "phone.jpg", 20, 30, exif=exif.tobytes(), quality=100)
    images.append(dict(file_name="phone.jpg", height=30, width=20, id=4))  # annotated upright
    images.append(dict(file_name="phone.jpg", height=20, width=30, id=5))  # annotated as stored (EXIF ignored)
    dataset = dataset_of(tmp_path, images, [ann(1, 1, [[10, 10, 19, 10, 19, 19]])])
    for i, (height, width) in enumerate([(20, 30)] * 3 + [(30, 20), (20, 30)]):
        img = dataset.get_raw(i)[0]
        assert img.shape == (3, height, width) and img.dtype == torch.uint8
    grey = dataset.get_raw(0)[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    stored = np.asarray(Image.open(tmp_path / "phone.jpg").convert("RGB"))  # (20, 30, 3)
    np.testing.assert_array_equal(dataset.get_raw(3)[0].permute(1, 2, 0).numpy(), np.rot90(stored, -1))
    np.testing.assert_array_equal(dataset.get_raw(4)[0].permute(1, 2, 0).numpy(), stored)


def test_the_dataset_holds_no_pixels(tmp_path):
    # data stay on disk: the dataset object (what each loader worker gets) does not grow with the images
    train_json, _ = write_synthetic_coco(tmp_path, num_images=40, seed=0, workers=1)
    dataset = COCODataset(train_json, tmp_path / "images")
    pixels = sum(3 * h * w for h, w in dataset.sizes)
    assert len(pickle.dumps(dataset)) < pixels / 50


# ----------------------------------------------------------------------------------------------------
# Empty images, training, resuming, inference
# ----------------------------------------------------------------------------------------------------
def test_images_without_objects_are_skipped_for_training_or_kept(tmp_path):
    images = [dict(write_image(tmp_path, f"{k}.png", 40, 50, seed=k), id=k + 1) for k in range(4)]
    anns = [ann(1, 1, SQUARE), ann(2, 3, SQUARE), ann(3, 4, SQUARE, iscrowd=1)]  # 2 and 4 have no object
    path = write_json(tmp_path / "data.json", images, anns)
    train, test = build_datasets(train_data=(path, tmp_path), val_data=(path, tmp_path), input_height=64)
    assert [train.dataset.image_id(i) for i in train.indices] == [1, 3]  # the authors' default
    assert len(test) == 4  # evaluation keeps every image
    train, _ = build_datasets(train_data=(path, tmp_path), val_data=(path, tmp_path), input_height=64,
                              empty_images="keep")
    assert len(train) == 4


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    """A tiny 5-class COCO-format synthetic set, one epoch trained, then resumed for a second: (data, run dir)."""
    root = tmp_path_factory.mktemp("coco_run")
    train_json, val_json = write_synthetic_coco(root / "data", num_images=10, seed=0, workers=1,
                                                category_ids=CATEGORY_IDS)
    images = str(root / "data" / "images")
    data = ["--train-data", train_json, images, "--val-data", val_json, images]
    # the handout's xavier init starts every category score near 0.5: detections to evaluate after a few steps
    main_train.main(parse_train(TINY + data + ["--set", "init=xavier", "--epochs", "1", "--output-dir",
                                                         str(root / "run")]))
    first = os.stat(root / "run" / "epoch_000.pth").st_mtime_ns
    main_train.main(parse_train(["--resume", str(root / "run"), "--epochs", "2"]))
    assert os.stat(root / "run" / "epoch_000.pth").st_mtime_ns == first  # resumed, not trained again from 0
    return (train_json, val_json, images), root / "run"


def test_train_resume_and_infer_on_a_five_class_coco_set(coco_run, tmp_path):
    (train_json, val_json, images), run = coco_run
    checkpoint = load_checkpoint(str(run / "checkpoint.pth"))
    assert checkpoint["epoch"] == 1 and checkpoint["model_cfg"]["class_names"] == CLASS_NAMES_5
    assert checkpoint["model_cfg"]["num_classes"] == 6 and checkpoint["args"]["train_data"] == [train_json, images]
    figures = tmp_path / "figures"
    metrics = main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint-dir", str(run), "--figures-dir", str(figures), "--device", "cpu", "--workers", "0",
         "--num-figures", "1"]))
    assert list(metrics["per_class"]) == list(CLASS_NAMES_5) and metrics["num_images"] == 2
    gt = COCO(val_json)
    results = gt.loadRes(metrics["results_json"])  # the standard results json, with the json's ids
    assert set(results.getImgIds()) <= set(gt.getImgIds()) and len(results.anns) == metrics["num_detections"] > 0
    assert {a["category_id"] for a in results.anns.values()} <= set(CATEGORY_IDS)
    assert os.path.isfile(figures / "infer_0.png")
    # own photos: an overlay per photo with the checkpoint's model
    (tmp_path / "photos").mkdir()
    write_image(tmp_path / "photos", "street.jpg", 120, 160)
    photos = main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint-dir", str(run), "--images", str(tmp_path / "photos"), "--figures-dir", str(tmp_path / "out"),
         "--device", "cpu"]))
    assert photos["overlays"] == [str(tmp_path / "out" / "street_jpg_infer.png")] and photos["skipped"] == []


def test_overlays_name_the_checkpoints_classes(coco_run, tmp_path, monkeypatch):
    # what the picture says: the label text of a detection of label 5 is the fifth class's name
    _, run = coco_run
    model = load_model(str(run / "checkpoint.pth"))
    figures = []
    monkeypatch.setattr(solo_head, "save_figure", lambda fig, path: figures.append(fig) or path)
    mask = torch.zeros(1, 30, 40)
    mask[0, 5:20, 10:30] = 1
    model.head.PlotInfer([torch.tensor([0.9])], [torch.tensor([5])], [mask], [(1, 0, 0)] * 5,
                         torch.zeros(1, 3, 30, 40))
    assert [t.get_text() for t in figures[0].axes[0].texts] == ["balloon 0.90"]


def test_a_resumed_run_refuses_data_of_other_classes(coco_run, tmp_path):
    (train_json, val_json, images), run = coco_run
    other = json.load(open(train_json))
    other["categories"][0]["name"] = "car"
    path = write_json(tmp_path / "other.json", other["images"], other["annotations"], other["categories"])
    args = parse_train(["--resume", str(run), "--epochs", "3", "--train-data", path, images,
                                  "--val-data", path, images])
    with pytest.raises(CheckpointError,
                       match=r"the data has the classes \['car'.*but checkpoint .* was trained on \['vehicle'"):
        main_train.main(args)
    with pytest.raises(DataError, match=r"test data has the classes \['car'.*trained on \['vehicle'"):
        main_infer.main(main_infer.get_args_parser().parse_args(
            ["--checkpoint-dir", str(run), "--val-data", path, images, "--device", "cpu", "--workers", "0",
             "--figures-dir", str(tmp_path / "f")]))


def test_command_line_choices_of_the_data(tmp_path):
    with pytest.raises(SystemExit):
        parse_train(["--val-data", "val.json", "images"])  # no --train-data
    with pytest.raises(SystemExit):
        parse_train(["--synthetic", "100", "--train-data", "t.json", "images"])
    args = parse_train(["--demo", "--train-data", "t.json", "images"])  # the demo's synthetic set gives way
    assert args.synthetic == 0 and args.train_data == ["t.json", "images"] and args.val_data is None


# ----------------------------------------------------------------------------------------------------
# Bad input: an error naming the json and the entry, or one warning line and a skip
# ----------------------------------------------------------------------------------------------------
BAD_JSONS = {
    "no annotations list": (lambda im: dict(images=[im], categories=CATEGORIES), r"no 'annotations' list"),
    "image without file_name": (lambda im: dict(images=[dict(id=1, height=40, width=50)], annotations=[],
                                                categories=CATEGORIES), r"image id 1 has no file_name"),
    "annotation without segmentation": (lambda im: dict(images=[im], annotations=[dict(id=5, image_id=1,
                                                                                       category_id=1)],
                                                        categories=CATEGORIES), r"annotation id 5 has no segmentation"),
    "unknown image": (lambda im: dict(images=[im], annotations=[ann(5, 9, SQUARE)], categories=CATEGORIES),
                      r"annotation 5 refers to image 9, which 'images' does not list"),
    "unknown category": (lambda im: dict(images=[im], annotations=[ann(5, 1, SQUARE, category_id=4)],
                                         categories=CATEGORIES),
                         r"annotation 5 refers to category 4, which 'categories' does not list \(ids \[1, 2\]\)"),
    "duplicate image id": (lambda im: dict(images=[im, im], annotations=[], categories=CATEGORIES),
                           r"image id 1 is listed twice"),
    "duplicate annotation id": (lambda im: dict(images=[im], annotations=[ann(5, 1, SQUARE), ann(5, 1, SQUARE)],
                                                categories=CATEGORIES), r"annotation id 5 is listed twice"),
    "duplicate category id": (lambda im: dict(images=[im], annotations=[],
                                              categories=CATEGORIES + [dict(id=2, name="cow")]),
                              r"category id 2 is listed twice"),
    "flat polygon": (lambda im: dict(images=[im], annotations=[ann(5, 1, SQUARE[0])], categories=CATEGORIES),
                     r"annotation 5 \(image 1\): segmentation is one flat list of numbers; COCO polygons are a list"),
    "polygon of 2 points": (lambda im: dict(images=[im], annotations=[ann(5, 1, [[1, 1, 5, 5]])],
                                            categories=CATEGORIES),
                            r"annotation 5 \(image 1\): a polygon has 2 points, fewer than 3"),
    "polygon outside": (lambda im: dict(images=[im], annotations=[ann(5, 1, [[60, 1, 70, 1, 70, 9]])],
                                        categories=CATEGORIES),
                        r"annotation 5 \(image 1\): a polygon lies outside the 40x50 image"),
    "RLE of another size": (lambda im: dict(images=[im], annotations=[ann(5, 1, dict(size=[40, 40],
                                                                                     counts=[1600]))],
                                            categories=CATEGORIES),
                            r"annotation 5 \(image 1\): its RLE has size \[40, 40\], but the image is 40x50"),
    "RLE counts not summing": (lambda im: dict(images=[im], annotations=[ann(5, 1, dict(size=[40, 50],
                                                                                        counts=[10, 5]))],
                                               categories=CATEGORIES), r"annotation 5 .*counts are not non-negative"),
    "broken compressed RLE": (lambda im: dict(images=[im], annotations=[ann(5, 1, dict(size=[40, 50],
                                                                                       counts="zzzz!!"))],
                                              categories=CATEGORIES),
                              r"annotation 5 \(image 1\): its compressed RLE counts string is not one pycocotools"),
    # a string whose runs stop short of the image: pycocotools would decode it into unset memory
    "short compressed RLE": (lambda im: dict(images=[im], annotations=[ann(5, 1, dict(size=[40, 50], counts="0:"))],
                                             categories=CATEGORIES),
                             r"annotation 5 \(image 1\): its RLE counts are not non-negative integers summing to "
                             r"40x50 pixels"),
    "category without name": (lambda im: dict(images=[im], annotations=[], categories=[dict(id=3)]),
                              r"category id 3 has no name"),
    "bbox outside": (lambda im: dict(images=[im], annotations=[ann(5, 1, SQUARE, bbox=[60, 1, 5, 5])],
                                     categories=CATEGORIES),
                     r"annotation 5 \(image 1\): bbox \[60, 1, 5, 5\] lies outside the 40x50 image"),
    "bbox of strings": (lambda im: dict(images=[im], annotations=[ann(5, 1, SQUARE, bbox=["1", "1", "5", "5"])],
                                        categories=CATEGORIES),
                        r"annotation 5 \(image 1\): bbox \['1', '1', '5', '5'\] is not 4 numbers"),
    "non-finite polygon": (lambda im: dict(images=[im], annotations=[ann(5, 1, [[1, 1, 9, float("nan"), 5, 9]])],
                                           categories=CATEGORIES),
                           r"annotation 5 \(image 1\): a polygon has a coordinate that is not finite"),
    "non-finite bbox": (lambda im: dict(images=[im], annotations=[ann(5, 1, SQUARE, bbox=[1, 1, float("inf"), 3])],
                                        categories=CATEGORIES),
                        r"annotation 5 \(image 1\): bbox \[1, 1, inf, 3\] is not finite"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONS))
def test_bad_json_is_a_clear_error(folder, case):
    tmp_path, image = folder
    make, message = BAD_JSONS[case]
    path = tmp_path / "bad.json"
    with open(path, "w") as f:
        json.dump(make(image), f)
    with pytest.raises(DataError, match=rf"COCO json {path}: {message}"):
        COCODataset(path, tmp_path)


def test_unreadable_json_and_missing_image_are_clear_errors(folder):
    tmp_path, image = folder
    (tmp_path / "cut.json").write_text('{"images": [')
    with pytest.raises(DataError, match=rf"COCO json {tmp_path / 'cut.json'} is not a readable json file"):
        COCODataset(tmp_path / "cut.json", tmp_path)
    missing = dict(image, id=2, file_name="gone.png")
    with pytest.raises(DataError, match=rf"image 2: file {tmp_path / 'gone.png'} not found \(is {tmp_path} the "):
        dataset_of(tmp_path, [image, missing], [])
    with pytest.raises(FileNotFoundError, match="COCO json not found"):
        COCODataset(tmp_path / "nothing.json", tmp_path)


def test_unreadable_images_and_empty_polygons_are_skipped_with_a_warning(folder, capsys):
    tmp_path, image = folder
    (tmp_path / "broken.png").write_bytes(b"not a png")
    write_image(tmp_path, "small.png", 20, 20)
    write_image(tmp_path, "strip.png", 10, 90)
    images = [image, dict(id=2, file_name="broken.png", height=40, width=50),
              dict(id=3, file_name="small.png", height=40, width=50),
              dict(id=4, file_name="strip.png", height=10, width=90)]
    anns = [ann(1, 1, SQUARE), ann(2, 1, []), ann(3, 1, [[]]), ann(4, 1, [[5, 5, 10, 10, 15, 15]])]  # collinear
    dataset = dataset_of(tmp_path, images, anns)
    assert len(dataset) == 1 and dataset.num_objects.tolist() == [1]
    out = capsys.readouterr().out.splitlines()
    warnings = [line for line in out if line.startswith("warning:")]
    assert len(warnings) == 6 and all(str(tmp_path / "data.json") in line for line in warnings)
    assert any("image 4" in w and "10x90, more elongated than 8:1" in w for w in warnings)
    assert any("image 2" in w and "broken.png" in w and "not a readable image" in w for w in warnings)
    assert any("image 3" in w and "the file is 20x20 but the json says 40x50" in w for w in warnings)
    assert sum("empty polygon or mask, skipped" in w for w in warnings) == 3
    assert any("1 images (3 skipped, not trained on or evaluated)" in line and "; 6 warnings" in line
               for line in out)  # counted in the summary


def test_no_usable_image_is_an_error(folder):
    tmp_path, _ = folder
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"none of its 1 images can be used \(image 7 .*broken.png"):
        dataset_of(tmp_path, [dict(id=7, file_name="broken.png", height=4, width=4)], [])


def test_an_image_that_fails_to_decode_later_names_the_json_and_the_image(folder):
    tmp_path, image = folder
    dataset = dataset_of(tmp_path, [image], [ann(1, 1, SQUARE)])
    with open(tmp_path / "a.png", "r+b") as f:  # cut short after the header was checked
        f.truncate(100)
    with pytest.raises(DataError, match=rf"COCO json .*data.json: image 1 \({tmp_path / 'a.png'}\): not a readable"):
        dataset.get_raw(0)
