"""Mask mAP with pycocotools (COCO's segm evaluation): annotations from per-image arrays, COCOeval, the summary
table (AP over IoU 0.50:0.95, AP50, AP75, per class), precision-recall curves, map.json."""
import contextlib
import io
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from dataset import CLASS_COLORS, CLASS_NAMES  # noqa: E402


def encode_masks(masks):
    """(n, H, W) binary masks (numpy or tensor, any dtype) -> n COCO RLE dicts and their areas (n,)."""
    masks = masks.detach().cpu().numpy() if torch.is_tensor(masks) else np.asarray(masks)
    masks = (masks > 0.5).astype(np.uint8)  # (n, H, W)
    if len(masks) == 0:
        return [], np.zeros(0)
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))  # pycocotools wants (H, W, n) Fortran
    return rles, mask_util.area(rles)


def gt_annotations(image_id, labels, masks, first_id=1):
    """COCO ground-truth annotations of one image; labels (n,) in 1..C-1, masks (n, H, W). Annotation ids start
    at first_id, which must be >= 1: COCOeval marks a detection as matched by storing the gt id, so id 0 would
    count as unmatched."""
    rles, areas = encode_masks(masks)
    return [dict(id=first_id + j, image_id=image_id, category_id=int(label), segmentation=rle, area=float(area),
                 iscrowd=0) for j, (label, rle, area) in enumerate(zip(labels, rles, areas))]


def det_annotations(image_id, scores, labels, masks, first_id=1):
    """COCO detection results of one image; scores (k,), labels (k,) in 1..C-1, masks (k, H, W)."""
    rles, areas = encode_masks(masks)
    return [dict(id=first_id + j, image_id=image_id, category_id=int(label), segmentation=rle, area=float(area),
                 score=float(score)) for j, (score, label, rle, area) in enumerate(zip(scores, labels, rles, areas))]


def _coco(images, annotations, class_names):
    """A COCO object built in memory (no json file); pycocotools' chatter is swallowed."""
    coco = COCO()
    coco.dataset = dict(images=images, annotations=annotations,
                        categories=[dict(id=k + 1, name=name) for k, name in enumerate(class_names)])
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate_masks(image_sizes, gt_anns, det_anns, class_names=CLASS_NAMES):
    """Run COCOeval (segm) on annotations from gt_annotations / det_annotations (ids unique over the set).
    image_sizes: {image_id: (H, W)}. Returns the accumulated COCOeval. The detections are made into a COCO object
    directly rather than with loadRes, which fails on an empty list (a model that detects nothing)."""
    images = [dict(id=i, height=int(h), width=int(w)) for i, (h, w) in image_sizes.items()]
    coco_eval = COCOeval(_coco(images, gt_anns, class_names), _coco(images, det_anns, class_names), "segm")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval


def _mean_precision(precision):
    """Mean of COCO precision entries; -1 marks 'no ground truth' -> nan."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else math.nan


def map_summary(coco_eval, class_names=CLASS_NAMES):
    """AP (IoU 0.50:0.95), AP50, AP75 and per-class AP / AP50 / number of ground-truth objects from an accumulated
    COCOeval: all areas, 100 detections per image. nan where there is no ground truth."""
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (IoU thresholds, recall thresholds, classes)
    iou_thrs = coco_eval.params.iouThrs
    i50, i75 = int(np.argmin(abs(iou_thrs - 0.5))), int(np.argmin(abs(iou_thrs - 0.75)))
    num_gt = np.bincount([a["category_id"] for a in coco_eval.cocoGt.dataset["annotations"]],
                         minlength=len(class_names) + 1)
    per_class = {name: dict(AP=_mean_precision(precision[:, :, k]), AP50=_mean_precision(precision[i50, :, k]),
                            num_gt=int(num_gt[k + 1]))
                 for k, name in enumerate(class_names)}
    return dict(AP=_mean_precision(precision), AP50=_mean_precision(precision[i50]),
                AP75=_mean_precision(precision[i75]), per_class=per_class,
                num_images=len(coco_eval.params.imgIds), num_gt=int(num_gt.sum()),
                num_detections=len(coco_eval.cocoDt.dataset["annotations"]))


def pr_curves(coco_eval, class_names=CLASS_NAMES, iou=0.5):
    """{class name: (recall (R,), interpolated precision (R,))} at the given IoU threshold, R = 101 recall
    points; classes without ground truth are left out."""
    t = int(np.argmin(abs(coco_eval.params.iouThrs - iou)))
    precision = coco_eval.eval["precision"][t, :, :, 0, -1]  # (R, classes)
    return {name: (coco_eval.params.recThrs, precision[:, k]) for k, name in enumerate(class_names)
            if (precision[:, k] > -1).any()}


def coco_mask_map(gt, dets, class_names=CLASS_NAMES):
    """Mask mAP of a set of images. gt: per image (labels (n,), masks (n, H, W)); dets: per image (scores (k,),
    labels (k,), masks (k, H, W)); labels in 1..len(class_names). Returns map_summary's dict."""
    return map_summary(evaluate_masks(*_annotate(gt, dets), class_names), class_names)


def _annotate(gt, dets):
    """Per-image arrays -> (image_sizes, gt annotations, detection annotations) with unique ids."""
    image_sizes, gt_anns, det_anns = {}, [], []
    for image_id, ((labels, masks), (d_scores, d_labels, d_masks)) in enumerate(zip(gt, dets)):
        image_sizes[image_id] = tuple(masks.shape[-2:])
        gt_anns += gt_annotations(image_id, labels, masks, first_id=len(gt_anns) + 1)
        det_anns += det_annotations(image_id, d_scores, d_labels, d_masks, first_id=len(det_anns) + 1)
    return image_sizes, gt_anns, det_anns


def format_map_table(metrics):
    """The metrics as a small text table (nan where a class has no ground truth)."""
    lines = [f"{'class':<10} {'AP':>6} {'AP50':>6} {'#gt':>6}"]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:<10} {m['AP']:6.3f} {m['AP50']:6.3f} {m['num_gt']:6d}")
    lines.append(f"{'all':<10} {metrics['AP']:6.3f} {metrics['AP50']:6.3f} {metrics['num_gt']:6d}"
                 f"   AP75 {metrics['AP75']:.3f}, {metrics['num_detections']} detections"
                 f" on {metrics['num_images']} images")
    return "\n".join(lines)


def _json_ready(obj):
    """nan -> None (JSON has no nan), recursively."""
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def save_map_json(metrics, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(_json_ready(metrics), f, indent=2)
    return path


def pr_figure(curves, iou=0.5, class_names=CLASS_NAMES):
    """One precision-recall curve per class (COCO's interpolated precision at the 101 recall points), in the
    class's colour, labelled with the class and its AP at that IoU: a matplotlib Figure."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for k, name in enumerate(class_names):
        if name in curves:
            recall, precision = curves[name]
            ax.plot(recall, precision, color=CLASS_COLORS[k % len(CLASS_COLORS)],
                    label=f"{name} (AP{round(iou * 100)} {precision.mean():.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"mask PR curves, IoU {iou}")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower left")
    fig.tight_layout()
    return fig


def plot_pr_curves(curves, path, iou=0.5, class_names=CLASS_NAMES):
    """pr_figure saved as a PNG at path."""
    fig = pr_figure(curves, iou, class_names)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
