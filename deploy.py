"""Run an exported SOLO model (export.py) with onnxruntime and numpy: overlays of your photos without PyTorch, or
the mask mAP of the test split or a COCO json as main_infer.py computes it.

  python export.py --checkpoint checkpoints/demo/checkpoint.pth --out model.onnx
  python deploy.py --model model.onnx --images my_photos/ --figures-dir figures/onnx    # needs no PyTorch
  python deploy.py --model model.onnx --evaluate                   # the test split of the run's data
  python deploy.py --model model.onnx --evaluate --val-data val.json val_images/   # a COCO-format json

--images needs onnxruntime, numpy, Pillow, matplotlib and tqdm only, and writes the overlays main_infer.py --images
writes (<name>_<extension>_infer.png, the handout's post-processing). --evaluate reads the data with the project's
dataset code (which uses PyTorch) but runs the model in onnxruntime; it writes map.json and segm_results.json.
"""
import argparse
import os
import sys

import matplotlib

from errors import MissingFileError, run_script
from imagefiles import list_photos
from onnx_infer import ExportedSOLO
from plots import photo_overlays


def get_args_parser():
    parser = argparse.ArgumentParser(description="SOLO inference with an exported ONNX model (no PyTorch)")
    parser.add_argument("--model", required=True, type=str, help="the .onnx file export.py wrote")
    parser.add_argument("--images", default=None, type=str, help="folder of JPEG/PNG photos: overlays")
    parser.add_argument("--recursive", action="store_true", help="with --images, the photos of its subfolders too")
    parser.add_argument("--evaluate", action="store_true",
                        help="mask mAP of the test split of the run's data (or --data-dir, --synthetic, --val-data)")
    parser.add_argument("--data-dir", default=None, type=str, help="with --evaluate: the course files' folder")
    parser.add_argument("--synthetic", default=None, type=int, help="with --evaluate: the synthetic set of N images")
    parser.add_argument("--val-data", default=None, type=str, nargs=2, metavar=("JSON", "IMAGES"),
                        help="with --evaluate: a COCO-format json and its image folder")
    parser.add_argument("--batch-size", default=4, type=int, help="with --evaluate: images per batch")
    parser.add_argument("--threads", default=0, type=int, help="onnxruntime threads (0: its default)")
    parser.add_argument("--figures-dir", default="figures/onnx", type=str, help="where the outputs go")
    parser.add_argument("--plot-score-thresh", default=0.3, type=float,
                        help="overlays draw detections scoring at least this (after Matrix NMS)")
    return parser


def run_photos(model, args):
    photos, subfolders = list_photos(args.images, args.recursive)
    meta = model.meta

    def infer(image, size, scaled_size):
        scores, labels, masks = model.infer(image, size, meta["postprocess"]["handout"], scaled_size)
        return scores[0], labels[0], masks[0]
    paths, skipped = photo_overlays(infer, meta["class_names"], args.images, photos, meta["input_height"],
                                    args.figures_dir, args.plot_score_thresh, meta["data"].get("max_long_side"))
    print(f"wrote {len(paths)} overlays to {args.figures_dir}, skipped {len(skipped)} photos"
          + (f"; {subfolders} subfolders not searched (--recursive)" if subfolders else ""))
    return dict(overlays=paths, skipped=skipped)


def run_evaluation(model, args):
    """The test split through the exported model: main_infer.py's table, map.json and segm_results.json."""
    import torch  # the data come through the project's dataset code

    from coco_eval import format_map_table, map_summary, save_map_json, save_results_json
    from errors import DataError
    from dataset import build_test_split
    from engine import evaluate_map

    meta = model.meta
    test_set = build_test_split(meta["data"], args.data_dir, args.synthetic, args.val_data)
    if list(test_set.dataset.class_names) != meta["class_names"]:
        raise DataError(f"the test data has the classes {list(test_set.dataset.class_names)}, but {args.model} was "
                        f"trained on {meta['class_names']}")
    coco_eval = evaluate_map(None, test_set, torch.device("cpu"), args.batch_size, workers=0,
                             cfg=meta["postprocess"]["map"],
                             infer=lambda img, sizes, cfg, scaled: model.infer(img.numpy(), sizes, cfg, scaled))
    metrics = map_summary(coco_eval)
    print(format_map_table(metrics))
    metrics.update(model=args.model, map_json=os.path.join(args.figures_dir, "map.json"),
                   results_json=save_results_json(coco_eval.cocoDt.dataset["annotations"],
                                                  os.path.join(args.figures_dir, "segm_results.json")))
    save_map_json(metrics, metrics["map_json"])
    print(f"wrote {metrics['map_json']} and {metrics['results_json']}")
    return metrics


def main(args):
    if bool(args.images) == args.evaluate:
        raise SystemExit("error: give --images DIR (overlays) or --evaluate (mask mAP)")
    if not os.path.isfile(args.model):
        raise MissingFileError(f"--model {args.model}: no such file (export.py writes one from a checkpoint)")
    model = ExportedSOLO(args.model, args.threads)
    print(f"model {args.model}: {model.meta['arch']} head, classes {', '.join(model.meta['class_names'])}, input "
          f"height {model.meta['input_height']}")
    return run_photos(model, args) if args.images else run_evaluation(model, args)


if __name__ == "__main__":
    matplotlib.use("Agg")  # a script saves its figures and never shows them
    result = run_script(main, get_args_parser())
    if "skipped" in result and not result["overlays"]:
        sys.exit(f"error: none of the {len(result['skipped'])} photos could be read")
