"""What bench.py times besides real data: the model settings of its 800x1088 rows, and mask predictions of a
head's training layout that hold no memory (target reads only their sizes)."""
import dataclasses

import torch

from checkpoint import load_checkpoint, model_config
from errors import CheckpointError
from model import ModelConfig
from solov2_head import SOLOv2Head


def model_settings(args):
    """The 800x1088 rows' ModelConfig (random weights): --checkpoint's settings, else the handout's with --arch;
    args.arch set to its head. CheckpointError for a bad checkpoint or one of another head than --arch."""
    cfg = ModelConfig(arch=args.arch or "solo", backbone_weights="none")
    if args.checkpoint:
        stored = model_config(load_checkpoint(args.checkpoint, mmap=True), args.checkpoint)
        if args.arch and args.arch != stored.arch:
            raise CheckpointError(f"--arch {args.arch}: the checkpoint {args.checkpoint} is a {stored.arch} model")
        cfg = dataclasses.replace(stored, backbone_weights="none")
    args.arch = cfg.arch
    return cfg


def shape_only_preds(head, bz, height, width, device):
    """Mask predictions in head's training layout for a (bz, 3, height, width) input, holding no memory: target
    reads only their sizes."""
    empty = torch.empty((), device=device)
    if isinstance(head, SOLOv2Head):
        mask_feat = empty.expand(bz, head.mask_feat_channels, height // 4, width // 4)
        return [(empty.expand(bz, head.mask_feat_channels, s, s), mask_feat) for s in head.seg_num_grids]
    return [empty.expand(bz, 1, 2 * height // stride, 2 * width // stride) for stride in head.strides]
