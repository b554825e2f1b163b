"""Write the course's four data files (h5/npy, datafiles.py) as a COCO-format dataset: lossless PNG images,
train.json and val.json holding the 80/20 split every script makes of the course files (image id = index in the
files, category ids 1 vehicle, 2 person, 3 animal, masks as compressed RLE, boxes from the bboxes file).

Training on the result gives the same items, split and test split as training on the files themselves:

  python to_coco.py --data-dir data --out data/coco
  python main_train.py --train-data data/coco/train.json data/coco/images --val-data data/coco/val.json data/coco/images
"""
import argparse
import time

from datafiles import dataset_paths
from dataset import course_to_coco
from errors import run_script


def get_args_parser():
    parser = argparse.ArgumentParser(description="Write the course's h5/npy data files as COCO json + images")
    parser.add_argument("--data-dir", default="data", type=str, help="folder holding the four course data files")
    parser.add_argument("--out", default="data/coco", type=str, help="output folder (images/, train.json, val.json)")
    parser.add_argument("--image-format", default="png", choices=("png", "jpg"),
                        help="'png' (lossless: the same tensors as the course files) or 'jpg' (smaller)")
    return parser


def main(args):
    start = time.perf_counter()
    paths = course_to_coco(dataset_paths(args.data_dir), args.out, args.image_format)
    print(f"wrote {', '.join(paths)} and their images in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_script(main, get_args_parser())
