"""Convert a published COCO-trained SOLO checkpoint (mmdetection 2.x/3.x model zoo, or the SOLO authors'
mmdetection 1.x files) into this project's checkpoint, with no mmcv needed.

  python convert.py solov2_r50_fpn_3x_coco_20220512_125856-fed092d4.pth   # -> checkpoints/solov2_r50_fpn_3x_coco.pth
  python convert.py SOLOv2_R101_3x.pth --out checkpoints/solov2_r101.pth
  then:  python main_infer.py --checkpoint checkpoints/solov2_r50_fpn_3x_coco.pth --images my_photos/
         python main_infer.py --checkpoint ... --val-data instances_val2017.json val2017/     # COCO mask AP
         python main_train.py --init-from checkpoints/solov2_r50_fpn_3x_coco.pth --train-data ...  # fine-tune

The architecture (head, tower depth and width, grids, SOLOv2's E, ResNet depth) is read from the file's tensors
(published.py says how their names map onto ours); the 80 COCO class names come from its meta or COCO's list.
The converted checkpoint predicts in the frame the weights were trained in: RGB, ImageNet mean/std, shorter side
800 and longer at most 1333 (448 / 768 for the SOLOv2 light models), padded to multiples of 32 (README,
"Pretrained models").
"""
import argparse
import os
import re

import torch

from checkpoint import converted_checkpoint, load_model_state, save_checkpoint
from errors import run_script
from model import ModelConfig, build_model
from published import (ConversionError, architecture, class_names_of, convert_state, read_published, state_dict_of,
                       test_scale_of)


def default_out(path):
    """checkpoints/<the file's name without mmdetection's date-and-hash suffix>.pth"""
    name = re.sub(r"_\d{8}_\d{6}-[0-9a-f]{8}$", "", os.path.splitext(os.path.basename(path))[0])
    return os.path.join("checkpoints", name + ".pth")


def get_args_parser():
    parser = argparse.ArgumentParser(description="Convert a published SOLO / Decoupled SOLO / SOLOv2 checkpoint "
                                                 "(mmdetection 1.x/2.x/3.x) into this project's checkpoint")
    parser.add_argument("checkpoint", type=str, help="the published .pth file")
    parser.add_argument("--out", default=None, type=str,
                        help="where to write ours (default: checkpoints/<its name without date and hash>.pth)")
    parser.add_argument("--input-scale", default=None, type=int, nargs=2, metavar=("SHORT", "LONG"),
                        help="the test-time resize, shorter side and longer side at most (default: the file's "
                             "config, else 800 1333, or 448 768 for SOLOv2 light)")
    return parser


def main(args):
    """Returns {"out": path, "model_cfg": ModelConfig, "input_scale": (short, long), "scheme": naming scheme}."""
    source = args.checkpoint
    obj = read_published(source)
    state = state_dict_of(obj, source)
    scheme, fields = architecture(state, source)
    cfg = ModelConfig(**fields, class_names=class_names_of(obj, fields["num_classes"] - 1),
                      backbone_weights="checkpoint")
    short, long = args.input_scale or test_scale_of(obj, fields)
    if short % 32 or short < 64 or long < short:
        raise ConversionError(f"--input-scale {short} {long}: the shorter side must be a multiple of 32 (at least "
                              f"64) and the longer at least the shorter")
    model = build_model(cfg, load_backbone_weights=False)
    load_model_state(model, convert_state(state, scheme, cfg.arch, model.state_dict(), source), source)
    out = args.out or default_out(source)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_checkpoint(converted_checkpoint(model, cfg, dict(input_height=short, max_long_side=long),
                                         dict(file=os.path.abspath(source), scheme=scheme)), out)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    grids = "" if cfg.arch != "solov2" else f", E {cfg.mask_feat_channels}"
    print(f"{source}: {scheme} {cfg.arch} head ({cfg.stacked_convs} convs of {cfg.seg_feat_channels} channels, "
          f"grids {list(cfg.num_grids)}{grids}), {cfg.backbone} FPN backbone, {cfg.num_classes - 1} classes, "
          f"{params:.1f}M parameters; input: shorter side {short}, longer at most {long}")
    print(f"wrote {out}\n  photos:   python main_infer.py --checkpoint {out} --images YOUR_PHOTOS/\n"
          f"  COCO AP:  python main_infer.py --checkpoint {out} --val-data instances_val2017.json val2017/\n"
          f"  finetune: python main_train.py --init-from {out} --train-data TRAIN.json IMAGES/")
    return dict(out=out, model_cfg=cfg, input_scale=(short, long), scheme=scheme)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_script(main, get_args_parser())
