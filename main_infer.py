"""Inference with a trained SOLO model (handout section 8): overlays and mask mAP on the test split, or overlays
on your own photos.

  CPU:  python main_infer.py --device cpu                       # newest checkpoint in checkpoints/, test split
  GPU:  python main_infer.py --checkpoint checkpoints/epoch_035.pth --device cuda --batch-size 8 --amp
  data: python main_infer.py --synthetic 400                    # override the checkpoint's data (--data-dir DIR)
  own photos (JPEG/PNG, any size):
        python main_infer.py --images my_photos/ --figures-dir figures/photos
Inference is a single process (no torchrun): it is fast next to training.

The data is rebuilt as in training from the checkpoint's args (data_dir, synthetic, input_height) and split with
dataset.split_dataset, so the test split is the one training never saw. Outputs in --figures-dir (figures/):
  infer_<i>.png     test image i (i < --num-figures) with the handout's post-processing (category score > 0.2,
                    top 50 before Matrix NMS, keep 5), masks coloured by class, with class name and score
  map.json          mask AP over IoU 0.50:0.95, AP50, AP75 and per-class AP / AP50 (pycocotools, COCO's 101-point
                    interpolated precision) with the SOLO authors' post-processing (up to 100 detections per image),
                    against the ground truth in the original 300x400 frame; null where a class has no ground truth
  pr_curve.png      precision-recall curve per class at IoU 0.5
  <stem>_infer.png  with --images: one overlay per photo (handout post-processing)
"""
import argparse
import contextlib
import io
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from tqdm import tqdm  # noqa: E402

import main_train  # noqa: E402
from dataset import CLASS_NAMES, BuildDataLoader, normalize_, pad_to, resized_sizes  # noqa: E402
from solo_head import CLASS_COLORS, POSTPROCESS_HANDOUT, POSTPROCESS_MAP  # noqa: E402

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")


# ----------------------------------------------------------------------------------------------------
# Mask mAP with pycocotools: small pure functions on per-image arrays
# ----------------------------------------------------------------------------------------------------
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


def plot_pr_curves(curves, path, iou=0.5):
    """One precision-recall curve per class (COCO's interpolated precision at the 101 recall points)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for k, name in enumerate(CLASS_NAMES):
        if name in curves:
            recall, precision = curves[name]
            ax.plot(recall, precision, color=CLASS_COLORS[k], label=f"{name} (AP{round(iou * 100)} "
                                                                    f"{precision.mean():.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"mask PR curves, IoU {iou}")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(loc="lower left")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------------
def resolve_checkpoint(path, checkpoint_dir):
    """The checkpoint to use: path if given, else the newest complete one in checkpoint_dir."""
    if path:
        return path
    latest = main_train.latest_checkpoint(checkpoint_dir)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint found in {checkpoint_dir!r}: train one with main_train.py, or "
                                f"pass --checkpoint PATH")
    return latest


def build_test_split(train_args, data_dir=None, synthetic=None):
    """The test Subset of the data the checkpoint was trained on, built as training builds it (its args data_dir,
    synthetic, input_height). data_dir alone means the real files in that folder; synthetic N the synthetic set."""
    if data_dir is not None and synthetic is None:
        synthetic = 0
    _, test_set = main_train.build_datasets(data_dir if data_dir is not None else train_args["data_dir"],
                                            synthetic if synthetic is not None else train_args["synthetic"],
                                            train_args["input_height"],
                                            synthetic_options=main_train.synthetic_options(train_args))
    return test_set


@torch.inference_mode()
def predict(model, img, ori_size, cfgs):
    """img (bz, 3, Hp, Wp) normalised input -> one PostProcess result per cfg in cfgs, each (scores_list,
    labels_list, masks_list) over the batch, masks (k, ori_H, ori_W) in {0, 1}. Candidate-first, as SOLO.infer:
    only the masks of cells above the category threshold are computed."""
    # the category maps and the mask features: [(bz, S, S, C-1)], [(bz, c, H_f, W_f)]
    cate_pred_list, ins_feat_list = model.head.forward_features(model.backbone(img))
    return [model.head.PostProcessFeat(ins_feat_list, cate_pred_list, ori_size, cfg=cfg) for cfg in cfgs]


def plot_overlays(model, results, raw_images, figures_dir, start_index, score_thresh):
    """PlotInfer on the original images: raw_images (bz, 3, ori_H, ori_W) uint8; results from predict."""
    scores_list, labels_list, masks_list = results
    return model.head.PlotInfer(scores_list, labels_list, masks_list, list(CLASS_COLORS), raw_images,
                                save_prefix=os.path.join(figures_dir, "infer"), score_thresh=score_thresh,
                                start_index=start_index)


def evaluate_test_split(model, test_set, device, batch_size, workers, figures_dir, num_figures, score_thresh):
    """Run the model over the test split (a Subset of BuildDataset): overlays of the first num_figures images
    (handout post-processing) and mask mAP (authors' post-processing) against dataset.get_raw's ground truth.
    Returns (accumulated COCOeval, overlay paths)."""
    raw_set, indices = test_set.dataset, list(test_set.indices)
    ori_size = tuple(raw_set.ori_size)
    loader = BuildDataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=workers).loader()
    image_sizes, gt_anns, det_anns, overlay_paths = {}, [], [], []
    position = 0  # index of the batch's first image in the test split
    for img, *_ in tqdm(loader, desc="inference", unit="batch"):
        bz = img.shape[0]
        cfgs = [POSTPROCESS_MAP] + ([POSTPROCESS_HANDOUT] if position < num_figures else [])
        results = predict(model, img.to(device, non_blocking=True), ori_size, cfgs)
        for b in range(bz):
            image_id = indices[position + b]
            _, labels, masks, _ = raw_set.get_raw(image_id)  # ground truth in the original frame
            image_sizes[image_id] = ori_size
            gt_anns += gt_annotations(image_id, labels, masks, first_id=len(gt_anns) + 1)
            scores, det_labels, det_masks = (r[b].cpu() for r in results[0])  # one copy each, not one per score
            det_anns += det_annotations(image_id, scores, det_labels, det_masks, first_id=len(det_anns) + 1)
        if len(results) > 1:
            n = min(bz, num_figures - position)
            raw = torch.stack([raw_set.get_raw(indices[position + b])[0] for b in range(n)])  # (n, 3, H, W) uint8
            overlay_paths += plot_overlays(model, [r[:n] for r in results[1]], raw, figures_dir, position,
                                           score_thresh)
        position += bz
    return evaluate_masks(image_sizes, gt_anns, det_anns), overlay_paths


# ----------------------------------------------------------------------------------------------------
# Your own photos
# ----------------------------------------------------------------------------------------------------
def list_photos(folder):
    """Sorted JPEG/PNG files of a folder; a clear error if there are none."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--images: {folder!r} is not a directory")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(PHOTO_SUFFIXES))
    if not paths:
        raise FileNotFoundError(f"--images: no JPEG/PNG images ({', '.join(PHOTO_SUFFIXES)}) in {folder!r}")
    return paths


def load_photo(path):
    """uint8 (3, h, w) RGB, EXIF orientation applied (phone photos). Pillow (a matplotlib dependency) rather
    than torchvision.io, whose image decoding is deprecated since torchvision 0.29."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # (3, h, w)


def preprocess_photo(photo, input_height):
    """uint8 (3, h, w) -> (1, 3, Hp, Wp) network input as BuildDataset makes it: resized to height input_height
    keeping the aspect ratio, normalised, zero-padded right/bottom to multiples of 32."""
    scaled, padded = resized_sizes(*photo.shape[-2:], input_height)
    # antialias: a phone photo is usually shrunk several times (a no-op when enlarging, as BuildDataset does)
    img = F.interpolate(photo[None].float() / 255, size=scaled, mode="bilinear", align_corners=False,
                        antialias=True)  # (1, 3, Hs, Ws) in [0, 1]
    return pad_to(normalize_(img), padded)  # (1, 3, Hp, Wp), padding exactly 0 as in BuildDataset


def infer_photos(model, paths, input_height, device, figures_dir, score_thresh):
    """Overlay (handout post-processing) per photo, written as <figures_dir>/<photo stem>_infer.png."""
    out_paths = []
    for path in tqdm(paths, desc="photos", unit="image"):
        photo = load_photo(path)  # (3, h, w) uint8
        (results,) = predict(model, preprocess_photo(photo, input_height).to(device), photo.shape[-2:],
                             [POSTPROCESS_HANDOUT])
        stem = os.path.splitext(os.path.basename(path))[0]
        out_paths += model.head.PlotInfer(*results, list(CLASS_COLORS), photo[None], score_thresh=score_thresh,
                                          save_paths=[os.path.join(figures_dir, f"{stem}_infer.png")])
    return out_paths


# ----------------------------------------------------------------------------------------------------
def get_args_parser():
    parser = argparse.ArgumentParser(description="SOLO inference: test-split overlays and mask mAP, or overlays "
                                                 "of your own photos", add_help=True)
    parser.add_argument("--checkpoint", default=None, type=str,
                        help="checkpoint file (default: the newest in --checkpoint-dir)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", type=str,
                        help="where to look for the newest checkpoint when --checkpoint is not given")
    parser.add_argument("--data-dir", default=None, type=str,
                        help="data directory with the four dataset files (default: the checkpoint's)")
    parser.add_argument("--synthetic", default=None, type=int,
                        help="use the synthetic dataset of N images (default: the checkpoint's setting)")
    parser.add_argument("--images", default=None, type=str,
                        help="folder of your own JPEG/PNG photos: overlays only, no test split and no mAP")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=str,
                        help="device (default cuda when available)")
    parser.add_argument("--batch-size", default=4, type=int, help="test images per batch")
    parser.add_argument("--amp", action="store_true",
                        help="the network in bfloat16 (float16 on GPUs older than the A100), as main_train.py --amp; "
                             "post-processing stays float32. 1.6x faster on CPUs with AVX512-BF16")
    parser.add_argument("--workers", default=2, type=int, help="data loading worker processes")
    parser.add_argument("--figures-dir", default="figures", type=str,
                        help="where the overlays, map.json and pr_curve.png go")
    parser.add_argument("--num-figures", default=5, type=int, help="test images to draw overlays of")
    parser.add_argument("--plot-score-thresh", default=0.3, type=float,
                        help="overlays draw detections scoring at least this (after Matrix NMS)")
    return parser


def main(args):
    """Test split: map_summary's metrics (nan where a class has no ground truth) plus checkpoint, overlays,
    map_json and pr_curve paths. With --images: {"checkpoint": path, "overlays": [paths]}."""
    device = main_train.prepare_device(args.device, fixed_input_size=args.images is None)  # photos: any size
    photos = list_photos(args.images) if args.images else None  # fail before the (slow) model load
    checkpoint_path = resolve_checkpoint(args.checkpoint, args.checkpoint_dir)
    checkpoint = main_train.load_checkpoint(checkpoint_path)
    model = main_train.load_model(checkpoint, device, source=checkpoint_path)  # eval mode
    train_args = checkpoint["args"]
    print(f"checkpoint {checkpoint_path} (epoch {checkpoint['epoch']}), input height {train_args['input_height']}")

    amp_dtype, _ = main_train.autocast_settings(device, args.amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    if photos:
        with autocast:
            paths = infer_photos(model, photos, train_args["input_height"], device, args.figures_dir,
                                 args.plot_score_thresh)
        print(f"wrote {len(paths)} overlays to {args.figures_dir}")
        return dict(checkpoint=checkpoint_path, overlays=paths)

    test_set = build_test_split(train_args, args.data_dir, args.synthetic)
    print(f"test split: {len(test_set)} images, input {test_set.dataset.input_size}, device {device}")
    with autocast:
        coco_eval, overlays = evaluate_test_split(model, test_set, device, args.batch_size, args.workers,
                                                  args.figures_dir, args.num_figures, args.plot_score_thresh)
    metrics = map_summary(coco_eval)
    print(format_map_table(metrics))
    metrics.update(checkpoint=checkpoint_path, overlays=overlays,
                   map_json=os.path.join(args.figures_dir, "map.json"),
                   pr_curve=plot_pr_curves(pr_curves(coco_eval), os.path.join(args.figures_dir, "pr_curve.png")))
    save_map_json(metrics, metrics["map_json"])
    print(f"wrote {len(overlays)} overlays, {metrics['map_json']} and {metrics['pr_curve']}")
    return metrics


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (main_train.CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
