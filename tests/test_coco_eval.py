"""Specification of coco_eval's mask mAP (pycocotools, COCO's 101-point interpolated precision) on hand-made
detections whose AP is worked out by hand.

COCO's AP of one class at one IoU threshold: detections sorted by score, precision made monotone from the right,
then averaged over the 101 recall points r = 0, 0.01, ..., 1 (precision taken at the first rank whose recall
reaches r, 0 past the highest recall). AP is the mean over the IoU thresholds 0.50, 0.55, ..., 0.95 and over the
classes that have ground truth.
"""
import json
import math

import numpy as np
import pytest

from coco_eval import (coco_mask_map, evaluate_masks, format_map_table, ground_truth, map_summary, plot_pr_curves,
                       pr_curves, pr_figure, save_map_json)
from cocofiles import det_annotations, gt_annotations
from plots import CLASS_COLORS

H, W = 30, 40  # image size of the hand-made cases
NAMES = ("vehicle", "person", "animal")


def box_mask(y0, y1, x0, x1):
    """(H, W) uint8 mask of rows y0:y1, columns x0:x1."""
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def stack(*masks):
    return np.stack(masks) if masks else np.zeros((0, H, W), np.uint8)


def gt_image(labels, masks):
    return np.array(labels, np.int64), stack(*masks)


def det_image(scores, labels, masks):
    return np.array(scores, np.float32), np.array(labels, np.int64), stack(*masks)


NO_DETS = det_image([], [], [])

# two images, three objects each: one of every class, disjoint masks
A1, A2, A3 = box_mask(0, 10, 0, 10), box_mask(0, 10, 15, 25), box_mask(15, 30, 0, 20)
B1, B2, B3 = box_mask(20, 30, 20, 40), box_mask(0, 12, 0, 12), box_mask(0, 8, 30, 40)
GT = [gt_image([1, 2, 3], [A1, A2, A3]), gt_image([1, 2, 3], [B1, B2, B3])]


def perfect():
    return [det_image([0.9, 0.8, 0.7], labels, list(masks)) for labels, masks in GT]


def assert_all(metrics, value):
    for key in ("AP", "AP50", "AP75"):
        assert metrics[key] == pytest.approx(value), key
    for name in NAMES:
        assert metrics["per_class"][name]["AP"] == pytest.approx(value), name
        assert metrics["per_class"][name]["AP50"] == pytest.approx(value), name


class TestWorkedValues:
    def test_perfect_predictions_give_one(self):
        metrics = coco_mask_map(GT, perfect(), NAMES)
        assert_all(metrics, 1.0)
        assert metrics["num_images"] == 2 and metrics["num_gt"] == 6 and metrics["num_detections"] == 6
        assert all(metrics["per_class"][name]["num_gt"] == 2 for name in NAMES)

    def test_torch_tensors_and_float_masks_are_accepted(self):
        torch = pytest.importorskip("torch")
        gt = [(torch.as_tensor(labels), torch.as_tensor(masks)) for labels, masks in GT]
        dets = [(torch.as_tensor(s), torch.as_tensor(l), torch.as_tensor(m).float()) for s, l, m in perfect()]
        assert_all(coco_mask_map(gt, dets, NAMES), 1.0)

    def test_swapped_classes_give_zero(self):
        # every mask exact, but vehicles called people and people called vehicles; animals not detected
        dets = [det_image([0.9, 0.8], [2, 1], list(masks[:2])) for _, masks in GT]
        assert_all(coco_mask_map(GT, dets, NAMES), 0.0)

    def test_half_found_half_missed(self):
        # per class: 2 objects, 1 found with its exact mask, 1 missed (image 2 has no detections).
        # recall 0.5 at precision 1 -> the 51 recall points 0, 0.01, ..., 0.50 have precision 1, the 50 above 0.
        dets = [perfect()[0], NO_DETS]
        assert_all(coco_mask_map(GT, dets, NAMES), 51 / 101)

    def test_false_positive_between_true_positives(self):
        # one class, 4 objects; ranked detections TP (0.9), FP (0.8), TP (0.7): precision 1, 1/2, 2/3 at recall
        # 1/4, 1/4, 1/2; monotone from the right 1, 2/3, 2/3 -> r in [0, 0.25]: 1 (26 points),
        # r in (0.25, 0.5]: 2/3 (25 points), rest 0.  AP = (26 + 25 * 2/3) / 101 at every IoU threshold.
        gt = [gt_image([1, 1], [A1, A3]), gt_image([1, 1], [B1, B2])]
        dets = [det_image([0.9, 0.8], [1, 1], [A1, A2]), det_image([0.7], [1], [B1])]
        metrics = coco_mask_map(gt, dets, NAMES)
        expected = (26 + 25 * 2 / 3) / 101
        assert metrics["AP"] == pytest.approx(expected)
        assert metrics["per_class"]["vehicle"]["AP50"] == pytest.approx(expected)

    def test_iou_0625_counts_for_ap50_not_ap75(self):
        # gt 10 x 26 pixels, detection the same box moved 6 columns right: IoU = 10*20 / (10*32) = 0.625, so it
        # matches at IoU thresholds 0.50, 0.55, 0.60 (precision 1 everywhere) and none of the 7 above.
        gt = [gt_image([2], [box_mask(5, 15, 2, 28)])]
        dets = [det_image([0.9], [2], [box_mask(5, 15, 8, 34)])]
        metrics = coco_mask_map(gt, dets, NAMES)
        assert metrics["AP50"] == pytest.approx(1.0)
        assert metrics["AP75"] == pytest.approx(0.0)
        assert metrics["AP"] == pytest.approx(3 / 10)
        assert metrics["per_class"]["person"] == dict(AP=pytest.approx(0.3), AP50=pytest.approx(1.0), num_gt=1)


class TestEmptyInputs:
    def test_no_detections_at_all(self):
        metrics = coco_mask_map(GT, [NO_DETS, NO_DETS], NAMES)
        assert_all(metrics, 0.0)
        assert metrics["num_detections"] == 0

    def test_category_without_ground_truth_is_nan(self):
        gt = [gt_image([1], [A1]), gt_image([2], [B1])]  # no animal anywhere
        dets = [det_image([0.9, 0.5], [1, 3], [A1, A3]), det_image([0.8], [2], [B1])]  # a stray animal
        metrics = coco_mask_map(gt, dets, NAMES)
        assert math.isnan(metrics["per_class"]["animal"]["AP"])
        assert math.isnan(metrics["per_class"]["animal"]["AP50"])
        assert metrics["per_class"]["animal"]["num_gt"] == 0
        assert metrics["AP"] == pytest.approx(1.0)  # the mean is over classes with ground truth

    def test_image_without_ground_truth_counts_its_false_positives(self):
        # a detection on an empty image ranks above the only true positive: precision 1/2 at recall 1
        gt = [gt_image([1], [A1]), gt_image([], [])]
        dets = [det_image([0.5], [1], [A1]), det_image([0.9], [1], [B1])]
        assert coco_mask_map(gt, dets, NAMES)["per_class"]["vehicle"]["AP"] == pytest.approx(0.5)

    def test_no_ground_truth_and_no_detections(self):
        metrics = coco_mask_map([gt_image([], [])], [NO_DETS], NAMES)
        assert math.isnan(metrics["AP"]) and math.isnan(metrics["AP50"]) and math.isnan(metrics["AP75"])
        assert metrics["num_images"] == 1 and metrics["num_gt"] == 0


class TestAnnotationsAndOutputs:
    def test_annotation_ids_start_at_one(self):
        # COCOeval stores the matched gt id in its match table, so an id of 0 would read as "unmatched"
        anns = gt_annotations(7, np.array([1, 3]), stack(A1, A3))
        assert [a["id"] for a in anns] == [1, 2]
        assert [a["area"] for a in anns] == [100, 300]
        assert [a["category_id"] for a in anns] == [1, 3]
        assert det_annotations(7, np.zeros(0), np.zeros(0), stack()) == []

    def test_pr_curves_and_outputs(self, tmp_path):
        gt = [gt_image([1, 2], [A1, A2])]
        dets = [det_image([0.9], [1], [A1])]
        image_sizes = {0: (H, W)}
        coco_eval = evaluate_masks(ground_truth(image_sizes, gt_annotations(0, *gt[0]), NAMES),
                                   det_annotations(0, *dets[0]))
        metrics = map_summary(coco_eval)
        curves = pr_curves(coco_eval)
        assert set(curves) == {"vehicle", "person"}  # no animal ground truth: no curve
        recall, precision = curves["vehicle"]
        assert recall.shape == precision.shape == (101,)
        assert precision == pytest.approx(np.ones(101)) and (curves["person"][1] == 0).all()

        path = save_map_json(metrics, str(tmp_path / "map.json"))
        saved = json.load(open(path))
        assert saved["per_class"]["animal"]["AP"] is None  # nan is written as null
        assert saved["per_class"]["vehicle"]["AP"] == pytest.approx(1.0) and saved["AP"] == pytest.approx(0.5)
        assert plot_pr_curves(curves, str(tmp_path / "pr.png")) == str(tmp_path / "pr.png")
        (ax,) = pr_figure(curves, class_names=NAMES).axes  # what the picture shows: a curve per class with gt
        assert [line.get_label() for line in ax.lines] == ["vehicle (AP50 1.000)", "person (AP50 0.000)"]
        assert [line.get_color() for line in ax.lines] == [CLASS_COLORS[0], CLASS_COLORS[1]]
        np.testing.assert_array_equal(ax.lines[0].get_xydata(), np.stack([recall, precision], 1))
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("recall", "precision")
        table = format_map_table(metrics)
        assert "vehicle" in table and "animal" in table and "nan" in table
