"""Mask mAP with pycocotools (COCO's segm evaluation): detections against a dataset's COCO ground truth (with
the json's own image and category ids for COCO-format data), the summary table (AP over IoU 0.50:0.95, AP50,
AP75, APs/APm/APl, per class), precision-recall curves, map.json and the standard COCO results json."""
import contextlib
import io
import json
import math

import matplotlib.pyplot as plt
import numpy as np
from pycocotools.cocoeval import COCOeval

from atomic_files import atomic_write
from cocofiles import coco_object, det_annotations, gt_annotations
from datafiles import CLASS_NAMES
from plots import class_colors


def ground_truth(image_sizes, gt_anns, class_names=CLASS_NAMES):
    """The COCO ground truth of annotations from gt_annotations (ids unique over the set) on images
    {image_id: (H, W)}, with categories 1..K named class_names."""
    images = [dict(id=i, height=int(h), width=int(w)) for i, (h, w) in image_sizes.items()]
    return coco_object(images, gt_anns, [dict(id=k + 1, name=name) for k, name in enumerate(class_names)])


def evaluate_masks(coco_gt, det_anns, image_ids=None):
    """Run COCOeval (segm) of detections (det_annotations, or a results json's entries) against a COCO ground
    truth (a dataset's coco_gt, or ground_truth) on image_ids (default all of coco_gt's). Returns the accumulated
    COCOeval. The detections are made into a COCO object directly rather than with loadRes, which fails on an
    empty list (a model that detects nothing)."""
    coco_dt = coco_object(coco_gt.dataset["images"], det_anns, coco_gt.dataset["categories"])
    coco_eval = COCOeval(coco_gt, coco_dt, "segm")
    if image_ids is not None:
        coco_eval.params.imgIds = sorted(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


def class_names_of(coco_eval):
    """The ground truth's category names, in COCOeval's order (by id)."""
    return [coco_eval.cocoGt.cats[cat_id]["name"] for cat_id in coco_eval.params.catIds]


def _mean_precision(precision):
    """Mean of COCO precision entries; -1 marks 'no ground truth' -> nan."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else math.nan


def map_summary(coco_eval):
    """AP (IoU 0.50:0.95), AP50, AP75, AP of small / medium / large objects (COCO's area ranges, in the original
    image's pixels) and per-class AP / AP50 / number of ground-truth objects (crowd regions not counted) from an
    accumulated COCOeval: 100 detections per image. nan where there is no ground truth."""
    precision = coco_eval.eval["precision"][..., -1]  # (IoU thresholds, recall thresholds, classes, areas)
    iou_thrs = coco_eval.params.iouThrs
    i50, i75 = int(np.argmin(abs(iou_thrs - 0.5))), int(np.argmin(abs(iou_thrs - 0.75)))
    areas = dict(zip(coco_eval.params.areaRngLbl, range(len(coco_eval.params.areaRngLbl))))  # all small medium large
    image_ids = set(coco_eval.params.imgIds)
    gt = [a for a in coco_eval.cocoGt.dataset["annotations"] if a["image_id"] in image_ids and not a.get("iscrowd")]
    cat_ids = list(coco_eval.params.catIds)
    num_gt = [sum(a["category_id"] == cat_id for a in gt) for cat_id in cat_ids]
    everything = precision[..., areas["all"]]  # (T, R, K)
    per_class = {name: dict(AP=_mean_precision(everything[:, :, k]), AP50=_mean_precision(everything[i50, :, k]),
                            num_gt=int(num_gt[k]))
                 for k, name in enumerate(class_names_of(coco_eval))}
    return dict(AP=_mean_precision(everything), AP50=_mean_precision(everything[i50]),
                AP75=_mean_precision(everything[i75]),
                **{f"AP{size[0]}": _mean_precision(precision[..., areas[size]])
                   for size in ("small", "medium", "large")},
                per_class=per_class, num_images=len(image_ids), num_gt=len(gt),
                num_detections=sum(a["image_id"] in image_ids for a in coco_eval.cocoDt.dataset["annotations"]))


def pr_curves(coco_eval, iou=0.5):
    """{class name: (recall (R,), interpolated precision (R,))} at the given IoU threshold, R = 101 recall
    points; classes without ground truth are left out."""
    t = int(np.argmin(abs(coco_eval.params.iouThrs - iou)))
    precision = coco_eval.eval["precision"][t, :, :, 0, -1]  # (R, classes)
    return {name: (coco_eval.params.recThrs, precision[:, k]) for k, name in enumerate(class_names_of(coco_eval))
            if (precision[:, k] > -1).any()}


def coco_mask_map(gt, dets, class_names=CLASS_NAMES):
    """Mask mAP of a set of images. gt: per image (labels (n,), masks (n, H, W)); dets: per image (scores (k,),
    labels (k,), masks (k, H, W)); labels in 1..len(class_names). Returns map_summary's dict."""
    image_sizes, gt_anns, det_anns = {}, [], []
    for image_id, ((labels, masks), (d_scores, d_labels, d_masks)) in enumerate(zip(gt, dets)):
        image_sizes[image_id] = tuple(masks.shape[-2:])
        gt_anns += gt_annotations(image_id, labels, masks, first_id=len(gt_anns) + 1)
        det_anns += det_annotations(image_id, d_scores, d_labels, d_masks, first_id=len(det_anns) + 1)
    return map_summary(evaluate_masks(ground_truth(image_sizes, gt_anns, class_names), det_anns))


def format_map_table(metrics):
    """The metrics as a small text table (nan where a class has no ground truth)."""
    width = max([10] + [len(name) for name in metrics["per_class"]])
    lines = [f"{'class':<{width}} {'AP':>6} {'AP50':>6} {'#gt':>6}"]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:<{width}} {m['AP']:6.3f} {m['AP50']:6.3f} {m['num_gt']:6d}")
    lines.append(f"{'all':<{width}} {metrics['AP']:6.3f} {metrics['AP50']:6.3f} {metrics['num_gt']:6d}"
                 f"   AP75 {metrics['AP75']:.3f}, {metrics['num_detections']} detections"
                 f" on {metrics['num_images']} images")
    lines.append(f"{'':<{width}} APs {metrics['APs']:.3f}, APm {metrics['APm']:.3f}, APl {metrics['APl']:.3f} "
                 f"(objects under 32x32, up to 96x96 and larger, original pixels)")
    return "\n".join(lines)


def save_results_json(det_anns, path):
    """The detections as a standard COCO results json ([{image_id, category_id, segmentation (compressed RLE),
    score}]), which COCO.loadRes and any COCO tool read. Returns path."""
    results = [dict(image_id=a["image_id"], category_id=a["category_id"], score=a["score"],
                    segmentation=dict(size=[int(s) for s in a["segmentation"]["size"]],
                                      counts=a["segmentation"]["counts"].decode("ascii")
                                      if isinstance(a["segmentation"]["counts"], bytes)
                                      else a["segmentation"]["counts"]))
               for a in det_anns]
    atomic_write(path, lambda f: f.write(json.dumps(results).encode()))
    return path


def _json_ready(obj):
    """nan -> None (JSON has no nan), recursively."""
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def save_map_json(metrics, path):
    """metrics as JSON at path (nan as null), written atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(_json_ready(metrics), indent=2).encode()))
    return path


def pr_figure(curves, iou=0.5, class_names=None):
    """One precision-recall curve per class (COCO's interpolated precision at the 101 recall points), in the
    class's colour (its position in class_names, default the curves' classes), labelled with the class and its AP
    at that IoU: a matplotlib Figure."""
    class_names = list(class_names or curves)
    colours = class_colors(len(class_names))
    fig, ax = plt.subplots(figsize=(5, 4))
    for k, name in enumerate(class_names):
        if name in curves:
            recall, precision = curves[name]
            ax.plot(recall, precision, color=colours[k], label=f"{name} (AP{round(iou * 100)} {precision.mean():.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"mask PR curves, IoU {iou}")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower left", fontsize="small" if len(curves) > 5 else None)
    fig.tight_layout()
    return fig


def plot_pr_curves(curves, path, iou=0.5, class_names=None):
    """pr_figure saved as a PNG at path, atomically."""
    fig = pr_figure(curves, iou, class_names)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path
