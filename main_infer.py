"""Inference with a trained SOLO model (handout section 8): overlays and mask mAP on the test split, or overlays
on your own photos.

  CPU:  python main_infer.py --device cpu                       # newest checkpoint in checkpoints/, test split
  GPU:  python main_infer.py --checkpoint checkpoints/epoch_035.pth --device cuda --batch-size 8 --amp
  the path: on a CPU with native bfloat16 (AMX, AVX512-BF16) the network runs under bfloat16 autocast in the
        channels_last layout, 3-4x faster; elsewhere in float32. --amp off / --channels-last off force float32 / NCHW
  data: python main_infer.py --synthetic 400                    # override the checkpoint's data (--data-dir DIR)
  COCO: python main_infer.py --val-data val.json val_images/     # a COCO-format json (default: the checkpoint's)
  own photos (JPEG/PNG, any size):
        python main_infer.py --images my_photos/ --figures-dir figures/photos [--recursive]
Inference is a single process (no torchrun): it is fast next to training.

The data is rebuilt as in training from the checkpoint's args (data_dir, synthetic, input_height, train_data,
val_data), so the test split is the one training never saw: the course files' 80/20 split (dataset.split_dataset),
a COCO-format run's validation json, or the 20 % of its training json it held out. Outputs in --figures-dir:
  infer_<i>.png     test image i (i < --num-figures) with the handout's post-processing (category score > 0.2,
                    top 50 before Matrix NMS, keep 5), masks coloured by class, with class name and score
  map.json          mask AP over IoU 0.50:0.95, AP50, AP75, APs/APm/APl and per-class AP / AP50 (pycocotools, COCO's
                    101-point interpolated precision) with the SOLO authors' post-processing (up to 100 detections
                    per image), against the ground truth in each image's original frame (a COCO json's crowd
                    regions are ignored, as COCO does); null where a class has no ground truth
  segm_results.json the detections as a standard COCO results json (the json's own image and category ids; for the
                    course files, image id = index in the files, category = label), for COCO.loadRes and any COCO tool
  pr_curve.png      precision-recall curve per class at IoU 0.5
  <name>_<extension>_infer.png  with --images: one overlay per photo (handout post-processing)
"""
import argparse
import sys

import matplotlib
import torch

from checkpoint import check_classes, load_checkpoint, load_model, model_config, resolve_checkpoint, stored_settings
from coco_eval import format_map_table
from dataset import DATA_SETTINGS, build_test_split
from engine import evaluate_and_save, plot_test_overlays
from errors import DataError, run_script
from imagefiles import list_photos
from plots import photo_overlays
from solo_head import POSTPROCESS_HANDOUT
from compute_path import add_path_arguments, autocast, choose_path
from utils import prepare_device


# ----------------------------------------------------------------------------------------------------
# Your own photos
# ----------------------------------------------------------------------------------------------------
@torch.inference_mode()
def infer_photos(model, folder, photos, input_height, device, figures_dir, score_thresh, max_long_side=None):
    """plots.photo_overlays with the model (handout post-processing) in the frame of input_height and
    max_long_side (a converted published model's). Returns (overlay paths, skipped photos)."""
    def infer(image, size, scaled_size):
        scores, labels, masks = model.infer(torch.from_numpy(image).to(device), size, POSTPROCESS_HANDOUT, scaled_size)
        return scores[0].float().cpu().numpy(), labels[0].cpu().numpy(), masks[0].cpu().numpy()
    return photo_overlays(infer, model.head.class_names, folder, photos, input_height, figures_dir, score_thresh,
                          max_long_side)


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
    parser.add_argument("--val-data", default=None, type=str, nargs=2, metavar=("JSON", "IMAGES"),
                        help="evaluate on this COCO-format json and image folder (default: the checkpoint's data)")
    parser.add_argument("--images", default=None, type=str,
                        help="folder of your own JPEG/PNG photos: overlays only, no test split and no mAP")
    parser.add_argument("--recursive", action="store_true",
                        help="with --images, the photos of its subfolders too (their overlays in the same subfolders)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=str,
                        help="device (default cuda when available)")
    parser.add_argument("--batch-size", default=4, type=int, help="test images per batch")
    add_path_arguments(parser)  # --amp, --channels-last
    parser.add_argument("--workers", default=2, type=int, help="data loading worker processes")
    parser.add_argument("--figures-dir", default="figures", type=str,
                        help="where the overlays, map.json and pr_curve.png go")
    parser.add_argument("--num-figures", default=5, type=int, help="test images to draw overlays of")
    parser.add_argument("--plot-score-thresh", default=0.3, type=float,
                        help="overlays draw detections scoring at least this (after Matrix NMS)")
    return parser


def main(args):
    """Test split: map_summary's metrics (nan where a class has no ground truth) plus checkpoint, overlays,
    map_json and pr_curve paths. With --images: {"checkpoint": path, "overlays": [paths], "skipped": [photos]}."""
    device = prepare_device(args.device, fixed_input_size=args.images is None)  # photos: any size
    photos, subfolders = list_photos(args.images, args.recursive) if args.images else (None, 0)  # before the model
    checkpoint_path = resolve_checkpoint(args.checkpoint, args.checkpoint_dir)
    checkpoint = load_checkpoint(checkpoint_path)
    compute = choose_path(device, args.amp, args.channels_last)
    model = compute.apply(load_model(checkpoint, device, source=checkpoint_path))  # eval mode
    train_args = stored_settings(checkpoint, checkpoint_path, DATA_SETTINGS, required=("input_height",))
    arch = model_config(checkpoint, checkpoint_path).arch
    converted = checkpoint.get("converted_from")
    origin = (f"converted from {converted.get('file')}" if isinstance(converted, dict)
              else f"epoch {checkpoint['epoch']}")
    frame = (f"input: shorter side {train_args['input_height']}, longer at most {train_args['max_long_side']}"
             if train_args.get("max_long_side") else f"input height {train_args['input_height']}")
    print(f"checkpoint {checkpoint_path} ({origin}, head {arch}), {frame}; {device}: {compute}")
    if converted and not photos and args.val_data is None and args.data_dir is None and args.synthetic is None:
        raise DataError(f"checkpoint {checkpoint_path} is a converted published model: it has no test split of its "
                        f"own; pass --val-data instances_val2017.json val2017/ (COCO mask AP) or --images FOLDER")

    if photos:
        with autocast(device, compute.amp):
            paths, skipped = infer_photos(model, args.images, photos, train_args["input_height"], device,
                                          args.figures_dir, args.plot_score_thresh, train_args.get("max_long_side"))
        print(f"wrote {len(paths)} overlays to {args.figures_dir}, skipped {len(skipped)} photos"
              + (f"; {subfolders} subfolders not searched (--recursive)" if subfolders else ""))
        return dict(checkpoint=checkpoint_path, overlays=paths, skipped=skipped)

    test_set = build_test_split(train_args, args.data_dir, args.synthetic, args.val_data)
    check_classes(test_set.dataset.class_names, model.head.class_names, checkpoint_path, DataError, "the test data")
    print(f"test split: {len(test_set)} images, input height {train_args['input_height']}, device {device}")
    overlays = plot_test_overlays(model, test_set, device, args.figures_dir, args.num_figures, args.plot_score_thresh,
                                  compute.amp)
    metrics = evaluate_and_save(model, test_set, device, args.figures_dir, args.batch_size, args.workers, compute.amp,
                                checkpoint=checkpoint_path, overlays=overlays)
    print(format_map_table(metrics))
    print(f"wrote {len(overlays)} overlays, {metrics['map_json']}, {metrics['results_json']} and "
          f"{metrics['pr_curve']}")
    return metrics


if __name__ == "__main__":
    matplotlib.use("Agg")  # a script saves its figures and never shows them
    result = run_script(main, get_args_parser())
    if "skipped" in result and not result["overlays"]:
        sys.exit(f"error: none of the {len(result['skipped'])} photos could be read")
