"""The SOLO model: ModelConfig, the one place its settings are defined (flags, checkpoints and build_model read
it), and SOLO, a backbone followed by one of the three heads."""
import dataclasses

import torch
import torch.nn as nn

from backbone import ARCHITECTURES, CHECKPOINT_ONLY, build_backbone
from datafiles import default_class_names
from decoupled_solo_head import DecoupledSOLOHead
from solo_head import SOLOHead, head_setting_problems
from solov2_head import SOLOv2Head

HEADS = dict(solo=SOLOHead, decoupled=DecoupledSOLOHead, solov2=SOLOv2Head)  # ModelConfig.arch -> head
ARCHS = tuple(HEADS)  # the values of ModelConfig.arch and main_train.py --arch


@dataclasses.dataclass
class ModelConfig:
    """Every setting of a SOLO model: main_train.py's model flags are these fields, checkpoints store them
    (dataclasses.asdict) and build_model builds from them. The defaults are the handout's model."""
    arch: str = "solo"  # the head: 'solo' (the handout's), 'decoupled' (Decoupled SOLO) or 'solov2' (SOLOv2)
    # 'resnet50' (the course's), 'resnet18' (CPU demos); 'resnet34', 'resnet101' (published models, convert.py)
    backbone: str = "resnet50"
    # 'coco' (torchvision's COCO Mask R-CNN), 'none' (random, always trained), a weights file, or 'checkpoint':
    # trained weights that come with the SOLO checkpoint itself (a converted published model, convert.py)
    backbone_weights: str = "coco"
    trainable_backbone: bool = False  # fine-tune a pretrained backbone (default frozen, the handout's)
    num_classes: int = 4  # C: the object classes and the background (from the data)
    class_names: tuple = None  # the C - 1 classes' names, label k is class_names[k - 1] (default: the course's)
    seg_feat_channels: int = 256  # channels of both towers, a multiple of 32 (GroupNorm(32))
    stacked_convs: int = 7  # 3x3 convs per tower
    num_grids: tuple = (40, 36, 24, 16, 12)  # S of each FPN level
    mask_feat_channels: int = 256  # SOLOv2 only: E, the channels of the mask features and of each dynamic kernel
    init: str = "solo"  # head init: 'solo' (authors', category prior 0.01) or 'xavier' (handout 6.1.3)
    cate_norm: str = "positives"  # focal loss normalisation: 'positives' (authors') or 'mean' (handout 6.9.1)

    def __post_init__(self):
        self.num_grids = tuple(int(s) for s in self.num_grids)
        self.class_names = default_class_names(self.num_classes) if self.class_names is None else \
            tuple(self.class_names)
        problems = []
        if self.arch not in ARCHS:
            problems.append(f"arch {self.arch!r} is not one of {ARCHS}")
        if self.backbone not in ARCHITECTURES:
            problems.append(f"backbone {self.backbone!r} is not one of {ARCHITECTURES}")
        if self.backbone in CHECKPOINT_ONLY and self.backbone_weights == "coco":
            problems.append(f"backbone {self.backbone!r} has no COCO Mask R-CNN weights (resnet50 has): use "
                            f"backbone_weights 'none', a weights file, or a converted checkpoint (convert.py)")
        if len(self.num_grids) != 5 or min(self.num_grids) < 1:
            problems.append(f"num_grids {list(self.num_grids)} must be 5 grid sizes >= 1, one per FPN level")
        if self.seg_feat_channels < 32 or self.seg_feat_channels % 32:
            problems.append(f"seg_feat_channels {self.seg_feat_channels} must be a multiple of 32 (GroupNorm(32))")
        if self.mask_feat_channels < 32 or self.mask_feat_channels % 32:
            problems.append(f"mask_feat_channels {self.mask_feat_channels} must be a multiple of 32 (GroupNorm(32))")
        if self.stacked_convs < 1:
            problems.append(f"stacked_convs {self.stacked_convs} must be >= 1")
        if self.num_classes < 2:
            problems.append(f"num_classes {self.num_classes} must be >= 2 (the background and one class)")
        if len(self.class_names) != self.num_classes - 1 or len(set(self.class_names)) != len(self.class_names) \
                or not all(isinstance(name, str) for name in self.class_names):
            problems.append(f"class_names {list(self.class_names)} must be {self.num_classes - 1} distinct names "
                            f"(num_classes {self.num_classes} counts the background)")
        problems += head_setting_problems(self.init, self.cate_norm)
        if problems:
            raise ValueError("model settings: " + "; ".join(problems))

    @classmethod
    def from_args(cls, args):
        """The settings among a namespace's attributes (main_train.py's flags); absent fields keep defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in vars(args).items() if name in names})


class SOLO(nn.Module):
    """Backbone + SOLOHead. A backbone with no trainable parameter (pretrained and frozen, the course's setting)
    runs under no_grad and stays in eval mode, so its BatchNorm statistics never move."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_frozen = not any(p.requires_grad for p in backbone.parameters())

    def forward(self, img, eval=False):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            fpn_feat_list = self.backbone(img)  # 5 x (bz, 256, H/s, W/s), s = 4, 8, 16, 32, 64
        return self.head(fpn_feat_list, eval=eval)

    @torch.no_grad()
    def infer(self, img, ori_size, cfg=None, scaled_size=None):
        """Detections of img (bz, 3, H, W): forward(eval=True), then head.PostProcess with cfg (a POSTPROCESS_*
        dict, default the head's) and scaled_size (see PostProcess). Per image scores (k,), labels (k,), masks
        (k, ori_H, ori_W)."""
        cate_pred_list, ins_pred_list = self(img, eval=True)
        return self.head.PostProcess(ins_pred_list, cate_pred_list, ori_size, cfg, scaled_size)

    def train(self, mode=True):
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self



def build_model(cfg=None, load_backbone_weights=True):
    """SOLO from a ModelConfig (or a dict of its fields; None: the defaults). backbone_weights: 'coco'
    (torchvision's COCO Mask R-CNN weights, frozen unless trainable_backbone), 'none' (random weights, always
    trained), a checkpoint file path, or 'checkpoint' (the SOLO checkpoint's own). load_backbone_weights=False
    builds the same architecture without reading the weights (a SOLO checkpoint about to be loaded holds them);
    'checkpoint' weights are built that way only."""
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig(**(cfg or {}))
    weights = cfg.backbone_weights
    if weights == "checkpoint" and load_backbone_weights:
        raise ValueError("backbone_weights 'checkpoint': the backbone's weights come with a SOLO checkpoint; load "
                         "it with checkpoint.load_model, or start a run from it with main_train.py --init-from FILE")
    pretrained = weights != "none"
    backbone = build_backbone(cfg.backbone, pretrained=pretrained,
                              checkpoint_file=weights if weights not in ("coco", "none", "checkpoint") else None,
                              trainable=cfg.trainable_backbone or not pretrained, load_weights=load_backbone_weights,
                              weights_in_checkpoint=weights == "checkpoint")
    extra = dict(mask_feat_channels=cfg.mask_feat_channels) if cfg.arch == "solov2" else {}
    head = HEADS[cfg.arch](cfg.num_classes, seg_feat_channels=cfg.seg_feat_channels, stacked_convs=cfg.stacked_convs,
                           num_grids=cfg.num_grids, init=cfg.init,
                           cate_loss_cfg=dict(gamma=2, alpha=0.25, weight=1, normalize=cfg.cate_norm),
                           class_names=cfg.class_names, **extra)
    return SOLO(backbone, head)
