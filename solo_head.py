"""The SOLO head, CIS680 handout section 6: read this file beside it.

SOLOHead keeps the handout's method names and order: layers and init (6.1), NewFPN (6.2), MultiApply (6.3),
forward (6.4), target / target_single_img (6.5), PlotGT (6.6), loss / DiceLoss / FocalLoss (6.9), PostProcess /
PostProcessImg / MatrixNMS / points_nms (6.10), PlotInfer (6.11). Where the handout is ambiguous or wrong it
follows the SOLO authors' code; docs/handout-notes.md says where and why, docs/departures.md with evidence.

Conventions:
  - images are padded on the right and bottom to (H, W), multiples of 32; 800x1088 in the handout.
  - FPN levels after NewFPN have strides [8, 8, 16, 32, 32]; level l cuts the image into S_l x S_l cells.
  - cell (i, j), i the row (y) and j the column (x), is mask channel k = i * S + j, and the category output is
    flattened the same way.
  - category labels 0..C-1 with 0 = background; category channel d predicts label d + 1.
  - boxes are x1 y1 x2 y2 in input pixels; scale_ranges are sqrt(w * h) at an 800-pixel-high input and are
    scaled with the input height, so a smaller input sends the same objects to the same levels.

Elsewhere: Decoupled SOLO and SOLOv2 (decoupled_solo_head.py, solov2_head.py) override the mask branch only; the
CPU-fast mask arithmetic of post-processing is mask_ops.py; the backbone + head and their settings are model.py.

python solo_head.py [--data-dir DIR | --coco JSON IMAGES] saves the ground-truth plots of handout figures 8-9.
"""
import argparse
import functools
import math
import os

import matplotlib
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import build_backbone
from datafiles import default_class_names
from dataset import BuildDataLoader, add_visual_check_args, choose_images, denormalize, visual_check_dataset
from errors import WeightsUnavailableError, run_script
from mask_ops import DenseMasks, TiledMasks, full_precision, mask_intersections
from plots import class_colors, detections_figure, overlay, save_figure

REFERENCE_HEIGHT = 800  # the input height at which the handout's scale_ranges are given
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # the bias of a sigmoid output that starts at probability 0.01
INITS = ("solo", "xavier")  # head initialisation: the authors' (category prior 0.01) or the handout's 6.1.3
CATE_NORMS = ("positives", "mean")  # focal normalisation: the authors' (positive cells + 1) or the handout's 6.9.1

# Post-processing settings. The handout's keep 5 detections: right for figures, but they cap recall, so mAP
# uses the SOLO authors' settings (docs/handout-notes.md, 14). Matrix NMS has no IoU threshold: update_thresh is
# the score a detection must keep after the decay.
POSTPROCESS_HANDOUT = dict(cate_thresh=0.2, ins_thresh=0.5, pre_NMS_num=50, keep_instance=5,
                           update_thresh=0.05, nms_kernel="gauss", nms_sigma=2.0, class_wise=True)
POSTPROCESS_MAP = dict(cate_thresh=0.1, ins_thresh=0.5, pre_NMS_num=500, keep_instance=100,
                       update_thresh=0.05, nms_kernel="gauss", nms_sigma=2.0, class_wise=True)
# PostProcessImg computes first the masks of the best FIRST_SHARE x pre_NMS_num candidates by category score, and
# after them any other that could still make the pre_NMS_num best (scored_candidates): maskness, mostly 0.8-1 for a
# trained model, seldom moves a candidate that far, so the second round is mostly empty
FIRST_SHARE = 1.25


def head_setting_problems(init, cate_norm):
    """What is wrong with a head's init and focal normalisation (empty when both are valid)."""
    problems = [f"init {init!r} must be one of {INITS}"] if init not in INITS else []
    return problems + ([f"cate_norm {cate_norm!r} must be one of {CATE_NORMS}"] if cate_norm not in CATE_NORMS else [])


def center_of_mass(masks):
    """Centres of mass (cy, cx) of masks (n, H, W), in pixel coordinates where pixel (y, x) covers
    [y, y + 1) x [x, x + 1) (so its centre is y + 0.5, as box coordinates are). float64, so that a centre on a
    cell border lands exactly on it. An empty mask gives NaN."""
    rows = masks.float().sum(2).double()  # (n, H) pixel counts, exact
    cols = masks.float().sum(1).double()  # (n, W)
    ys = torch.arange(masks.shape[1], device=masks.device, dtype=torch.float64) + 0.5
    xs = torch.arange(masks.shape[2], device=masks.device, dtype=torch.float64) + 0.5
    area = rows.sum(1)  # (n,)
    return (rows * ys).sum(1) / area, (cols * xs).sum(1) / area


def coord_feat(feat):
    """Normalised x then y coordinates in [-1, 1] as two channels (bz, 2, H, W) for CoordConv."""
    bz, _, h, w = feat.shape
    y, x = torch.meshgrid(_linspace(h, feat), _linspace(w, feat), indexing="ij")
    return torch.stack([x, y]).expand(bz, 2, h, w)


def _linspace(n, feat):
    """torch.linspace(-1, 1, n) in feat's dtype and device. When exported (export.py) it is built from arange
    instead: linspace's number of steps would be frozen at the traced size, while an exported model takes any;
    the values agree up to float rounding."""
    if torch.compiler.is_exporting():
        return torch.arange(n, device=feat.device, dtype=feat.dtype) * (2 / max(n - 1, 1)) - 1
    return torch.linspace(-1, 1, n, device=feat.device, dtype=feat.dtype)


def conv_gn_relu(in_channels, out_channels, kernel_size=3):
    """A conv (3x3 unless told) without bias, GroupNorm(32), ReLU: one layer of a tower (handout 6.1.2)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.GroupNorm(32, out_channels), nn.ReLU(inplace=True))


def tower(in_channels, channels, num_convs):
    """num_convs conv_gn_relu layers, the first taking in_channels: a branch's tower."""
    return nn.ModuleList([conv_gn_relu(in_channels if i == 0 else channels, channels) for i in range(num_convs)])


def fpn_levels(fpn_feat_list):
    """The backbone's 5 maps as a list, from its OrderedDict or a list."""
    return list(fpn_feat_list.values()) if isinstance(fpn_feat_list, dict) else list(fpn_feat_list)


def level_tensors(pred):
    """A level's mask prediction as a list of tensors: SOLO's and Decoupled SOLO's are one tensor, SOLOv2's a
    (kernels, mask features) pair."""
    return [pred] if torch.is_tensor(pred) else list(pred)


def image_of(pred, b):
    """Image b of a level's mask prediction (a tensor, or a tuple of tensors with the batch first)."""
    return pred[b] if torch.is_tensor(pred) else tuple(t[b] for t in pred)


def upsample_sigmoid(logits, size):
    """Mask logits (bz, k, h, w) -> probabilities (bz, k, *size): bilinear upsampling, then the sigmoid."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).sigmoid()


class SOLOHead(nn.Module):
    """SOLO's head (handout 6): per FPN level, a category branch (S x S x (C-1) probabilities) and a mask branch
    (one mask per grid cell), their targets, losses and post-processing.

    Three contracts differ from the handout's, each for one reason:
      - target_single_img returns 9 slots per object (the 3x3 cells around its centre cell) instead of S^2
        channels, and target() builds them for the whole batch at once: fixed sizes, so training never waits on
        the device; target() still returns the handout's (S^2, 2H_f, 2W_f) layout unless compact=True.
      - forward(eval=True) returns each level's mask features instead of S^2 masks at H/4: those would be a
        840 MB tensor per 800x1088 image, and only the candidate cells' masks are ever needed.
      - PostProcessImg takes those mask features and computes the masks of the candidates only (cell_masks).
    The methods a successor head overrides (its mask branch and how it makes a cell's mask) are grouped at the
    end of the class."""

    def __init__(self,
                 num_classes=4,
                 in_channels=256,
                 seg_feat_channels=256,
                 stacked_convs=7,
                 strides=(8, 8, 16, 32, 32),
                 scale_ranges=((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)),
                 epsilon=0.2,
                 num_grids=(40, 36, 24, 16, 12),
                 cate_down_pos=0,
                 with_deform=False,
                 mask_loss_cfg=dict(weight=3),
                 cate_loss_cfg=dict(gamma=2, alpha=0.25, weight=1, normalize="positives"),
                 postprocess_cfg=POSTPROCESS_HANDOUT,
                 init="solo",
                 class_names=None):
        super().__init__()
        if with_deform:
            raise ValueError("with_deform=True: deformable convolutions are not implemented (the handout "
                             "and the SOLO R50 baseline use plain convolutions)")
        if not (len(strides) == len(scale_ranges) == len(num_grids)):
            raise ValueError(f"strides, scale_ranges and num_grids need one entry per FPN level, got "
                             f"{len(strides)}, {len(scale_ranges)} and {len(num_grids)}")
        problems = head_setting_problems(init, cate_loss_cfg.get("normalize", "positives"))
        if problems:
            raise ValueError("SOLOHead: " + "; ".join(problems))
        self.num_classes = num_classes
        self.class_names = tuple(class_names or default_class_names(num_classes))  # label k: class_names[k - 1]
        self.cate_out_channels = num_classes - 1
        self.in_channels = in_channels
        self.seg_feat_channels = seg_feat_channels
        self.stacked_convs = stacked_convs
        self.strides = list(strides)
        self.scale_ranges = [tuple(r) for r in scale_ranges]
        self.epsilon = epsilon
        self.seg_num_grids = list(num_grids)
        self.cate_down_pos = cate_down_pos
        self.mask_loss_cfg = dict(mask_loss_cfg)
        self.cate_loss_cfg = dict(cate_loss_cfg)
        self.postprocess_cfg = dict(postprocess_cfg)
        self._init_layers()
        self._init_weights(init)

    # ---------------------------------------------------------------- model (6.1, 6.2, 6.3, 6.4)
    def _init_layers(self):
        c = self.seg_feat_channels
        self.cate_convs = tower(self.in_channels, c, self.stacked_convs)
        self.cate_out = nn.Conv2d(c, self.cate_out_channels, 3, padding=1)
        self._init_mask_branch()

    def _init_weights(self, init="solo"):
        """'solo' (default, the authors'): normal(std 0.01) weights, zero bias, category output bias -log(99) so
        every cell starts at probability 0.01 and the summed focal loss starts small. The mask outputs keep a zero
        bias (probability 0.5), where the authors start them at 0.01 too: Decoupled SOLO's product of two such
        maps starts at 1e-4, whose gradient is too small to learn from (docs/departures.md). 'xavier': the
        handout's 6.1.3, xavier_uniform_ weights and zero bias (every cell starts at 0.5)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "solo":
                    nn.init.normal_(m.weight, std=0.01)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if init == "solo":
            nn.init.constant_(self.cate_out.bias, PRIOR_BIAS)

    def NewFPN(self, fpn_feat_list):
        """Strides [4, 8, 16, 32, 64] -> [8, 8, 16, 32, 32]: level 0 halved, the last level resized to exactly
        level 3's size (x2 would give 26x34 against 25x34 at 800x1088)."""
        feats = fpn_levels(fpn_feat_list)
        return [F.interpolate(feats[0], size=feats[1].shape[-2:], mode="bilinear", align_corners=False),
                *feats[1:-1],
                F.interpolate(feats[-1], size=feats[-2].shape[-2:], mode="bilinear", align_corners=False)]

    def MultiApply(self, func, *args, **kwargs):
        pfunc = functools.partial(func, **kwargs) if kwargs else func
        map_results = map(pfunc, *args)
        return tuple(map(list, zip(*map_results)))

    def forward(self, fpn_feat_list, eval=False):
        """fpn_feat_list: the backbone's 5 maps (dict or list), strides [4, 8, 16, 32, 64].
        Training: cate_pred_list [(bz, C-1, S, S)] and ins_pred_list [(bz, S^2, 2H_feat, 2W_feat)], probabilities.
        eval=True: cate_pred_list [(bz, S, S, C-1)] after points_nms, and ins_pred_list [(bz, c, H_feat, W_feat)]
        the mask features of each level, for PostProcess (see the class docstring)."""
        new_fpn_list = self.NewFPN(fpn_feat_list)
        cate_pred_list, ins_pred_list = self.MultiApply(self.forward_single_level, new_fpn_list,
                                                        list(range(len(new_fpn_list))), eval=eval)
        return cate_pred_list, ins_pred_list

    def forward_single_level(self, fpn_feat, idx, eval=False):
        return self.cate_single_level(fpn_feat, idx, eval), self.mask_single_level(fpn_feat, idx, eval)


    def cate_single_level(self, fpn_feat, idx, eval=False):
        """The category branch on one level: the features resized to S x S at position cate_down_pos of the tower
        (0: first). Training: (bz, C-1, S, S) probabilities; eval: (bz, S, S, C-1) after points_nms."""
        num_grid = self.seg_num_grids[idx]
        cate_feat = fpn_feat
        for i, conv in enumerate(self.cate_convs):
            if i == self.cate_down_pos:
                cate_feat = F.interpolate(cate_feat, size=(num_grid, num_grid), mode="bilinear",
                                          align_corners=False)  # (bz, c, S, S)
            cate_feat = conv(cate_feat)
        # the logits and their sigmoid in float32 even under --amp: the focal loss works on probabilities near
        # 0.01, which bfloat16 rounds coarsely (S x S maps: it costs nothing)
        with torch.autocast(cate_feat.device.type, enabled=False):
            cate_pred = self.cate_out(cate_feat.float()).sigmoid()  # (bz, C-1, S, S)
        if eval:
            return self.points_nms(cate_pred).permute(0, 2, 3, 1)  # (bz, S, S, C-1)
        return cate_pred

    # ---------------------------------------------------------------- targets (6.5)
    def target(self, ins_pred_list, bbox_list, label_list, mask_list, compact=False):
        """ins_pred_list: the mask predictions (only their sizes, mask_sizes, and device are read). bbox_list
        [(n, 4)], label_list [(n,)], mask_list [(n, H, W)] per image, at the one padded input size.
        Returns, each a list over images of a list over levels (the handout's layout):
          ins_gts_list (S^2, 2H_f, 2W_f) uint8, ins_ind_gts_list (S^2,) bool, cate_gts_list (S, S) int64;
        compact=True (training): target_single_img's slots instead of the S^2 channels, the same positives
        without host-device synchronisation (loss takes either form). The batch's objects go through
        target_single_img at once: one set of operations (GPU kernel launches) for the batch, not one per image."""
        featmap_sizes = self.mask_sizes(ins_pred_list)
        device = level_tensors(ins_pred_list[0])[0].device
        counts = [len(labels) for labels in label_list]  # host integers: splitting back needs no device read
        shapes = {tuple(m.shape[1:]) for m, n in zip(mask_list, counts) if n}
        if len(shapes) > 1:
            raise ValueError(f"target: the images' masks must share one padded size, got "
                             f"{[tuple(m.shape) for m in mask_list]}")
        image = torch.cat([torch.full((n,), b, device=device) for b, n in enumerate(counts)])  # (N,)
        ins, cate, ind = self.target_single_img(torch.cat([b.to(device) for b in bbox_list]),
                                                torch.cat([lab.to(device) for lab in label_list]),
                                                torch.cat([m.to(device) for m in mask_list]),
                                                featmap_sizes, image=image, num_images=len(counts))
        slots = [9 * n for n in counts]
        ins_gts_list = [[] for _ in counts]
        ins_ind_gts_list = [[] for _ in counts]
        cate_gts_list = [[] for _ in counts]
        for level, size in enumerate(featmap_sizes):
            for b, (masks, cells) in enumerate(zip(ins[level].split(slots), ind[level].split(slots))):
                if not compact:
                    masks, cells = self._slots_to_channels(masks, cells, self.seg_num_grids[level] ** 2, size)
                ins_gts_list[b].append(masks)
                ins_ind_gts_list[b].append(cells)
                cate_gts_list[b].append(cate[level][b])
        return ins_gts_list, ins_ind_gts_list, cate_gts_list

    def target_single_img(self, gt_bboxes_raw, gt_labels_raw, gt_masks_raw, featmap_sizes, image=None,
                          num_images=1):
        """The targets of one image's objects (the authors' rules, docs/handout-notes.md 6-9); target passes a
        whole batch's, with `image` (n,) the image of each, so that cells are contested only within an image.
        An object trains every level whose (inclusive) scale range holds sqrt(w * h) of its box; its positive
        cells are those its centre region (centre of mass, half-size eps*w/2 x eps*h/2) covers, clipped to the
        3x3 cells around the centre-of-mass cell. A cell several objects claim is the smallest box's, the one
        mask it trains towards (the authors' SOLO lets the last object listed win; their SOLOv2 trains the cell
        towards every claimant's mask; docs/departures.md).
        gt_bboxes_raw (n, 4), gt_labels_raw (n,), gt_masks_raw (n, H, W), featmap_sizes [(2H_f, 2W_f)].
        Returns, per level, 9 slots per object, the 3x3 cells around its centre cell (every positive cell is in
        exactly one slot), of fixed sizes (no host-device synchronisation):
          ins_label_list [(9n, 2H_f, 2W_f) uint8], the object's resized mask in each of its slots,
          cate_label_list [(num_images, S, S) int64],
          ins_ind_label_list [(9n,) int64], the slot's channel i * S + j where it is a positive cell of the
          object, else -1."""
        device = gt_masks_raw.device
        n = len(gt_labels_raw)
        image = torch.zeros(n, dtype=torch.long, device=device) if image is None else image
        if n == 0:  # interpolate rejects empty inputs
            return ([torch.zeros(0, *size, dtype=torch.uint8, device=device) for size in featmap_sizes],
                    [torch.zeros(num_images, s, s, dtype=torch.long, device=device) for s in self.seg_num_grids],
                    [torch.zeros(0, dtype=torch.long, device=device) for _ in featmap_sizes])
        masks, labels = gt_masks_raw, gt_labels_raw.long()
        height, width = masks.shape[1:]
        box_w, box_h = gt_bboxes_raw[:, 2] - gt_bboxes_raw[:, 0], gt_bboxes_raw[:, 3] - gt_bboxes_raw[:, 1]  # (n,)
        obj_scale = torch.sqrt(box_w * box_h) * (REFERENCE_HEIGHT / height)  # (n,) in 800-pixel units
        box_area = box_w * box_h
        cy, cx = center_of_mass(masks)  # (n,)
        has_pixels = masks.flatten(1).any(1).bool()  # (n,); any() of uint8 is uint8
        of_image = image == torch.arange(num_images, device=device)[:, None]  # (B, n)
        resized = {}  # masks resized once per distinct level size (levels 0-1 and 3-4 share theirs)
        ins_label_list, cate_label_list, ins_ind_label_list = [], [], []
        for (lower, upper), num_grid, size in zip(self.scale_ranges, self.seg_num_grids, featmap_sizes):
            if size not in resized:
                resized[size] = (F.interpolate(masks[:, None].float(), size=size, mode="bilinear",
                                               align_corners=False)[:, 0] >= 0.5).to(torch.uint8)  # (n, 2H_f, 2W_f)
            hit = (obj_scale >= lower) & (obj_scale <= upper) & has_pixels  # (n,)
            claims, centre = self._centre_cells(cy, cx, 0.5 * self.epsilon * box_h.double(),
                                                0.5 * self.epsilon * box_w.double(), height, width, num_grid)
            claims &= hit[:, None, None]  # (n, S, S)
            # each image's claims (B, n, S, S): n grows with B, so this grows with B^2 (a few MB at 16 images)
            claims_img = claims & of_image[:, :, None, None]
            owner = torch.where(claims_img, box_area[:, None, None], torch.inf).argmin(1).flatten(1)  # (B, S^2)
            cate_label = torch.where(claims_img.any(1).flatten(1), labels[owner], 0)  # (B, S^2)
            cells = self._slot_cells(claims, owner, image, centre)  # (n, 9)
            ins_label_list.append(resized[size].repeat_interleave(9, dim=0))  # (9n, 2H_f, 2W_f)
            cate_label_list.append(cate_label.view(num_images, num_grid, num_grid))
            ins_ind_label_list.append(cells.flatten())  # (9n,)
        return ins_label_list, cate_label_list, ins_ind_label_list

    @staticmethod
    def _slot_cells(claims, owner, image, centre):
        """claims (n, S, S), owner (B, S^2) (the object owning each cell of each image), image (n,), centre
        (n, 2) centre cells (row, column) -> (n, 9): the channel of each of the 3x3 cells around an object's
        centre cell where it is a positive cell the object owns, else -1."""
        n, num_grid = claims.shape[:2]
        offsets = torch.arange(-1, 2, device=claims.device)
        rows = (centre[:, 0, None] + offsets)[:, :, None].expand(n, 3, 3).reshape(n, 9)  # the 3x3 window,
        cols = (centre[:, 1, None] + offsets)[:, None, :].expand(n, 3, 3).reshape(n, 9)  # row-major (n, 9)
        inside = (rows >= 0) & (rows < num_grid) & (cols >= 0) & (cols < num_grid)
        cells = rows.clamp(0, num_grid - 1) * num_grid + cols.clamp(0, num_grid - 1)  # (n, 9)
        obj = torch.arange(n, device=claims.device)[:, None]  # (n, 1)
        positive = inside & claims.flatten(1).gather(1, cells) & (owner[image[:, None], cells] == obj)  # (n, 9)
        return torch.where(positive, cells, -1)

    @staticmethod
    def _slots_to_channels(masks, cells, num_channels, size):
        """One image's slots of one level, masks (m, 2H_f, 2W_f) and cells (m,), -> the handout's layout:
        ins_label (S^2, 2H_f, 2W_f) uint8 with each positive cell's mask in its channel, ins_ind (S^2,) bool."""
        ins_label = torch.zeros(num_channels, *size, dtype=torch.uint8, device=masks.device)
        ins_ind = torch.zeros(num_channels, dtype=torch.bool, device=masks.device)
        positive = cells >= 0
        ins_label[cells[positive]] = masks[positive]
        ins_ind[cells[positive]] = True
        return ins_label, ins_ind

    @staticmethod
    def _centre_cells(cy, cx, half_h, half_w, height, width, num_grid):
        """(n, S, S) bool: the cells of an S x S grid over an height x width image that the centre regions
        [cy +- half_h] x [cx +- half_w] cover, clipped to the 3x3 cells around the cell holding (cy, cx); and
        that centre cell (n, 2) as (row, column)."""
        def cell(v, size):  # cell index of coordinate v along an axis of length size
            return torch.floor(v / size * num_grid).long()
        coord_h, coord_w = cell(cy, height).clamp(0, num_grid - 1), cell(cx, width).clamp(0, num_grid - 1)
        top = torch.maximum(cell(cy - half_h, height).clamp(min=0), coord_h - 1)  # (n,)
        down = torch.minimum(cell(cy + half_h, height).clamp(max=num_grid - 1), coord_h + 1)
        left = torch.maximum(cell(cx - half_w, width).clamp(min=0), coord_w - 1)
        right = torch.minimum(cell(cx + half_w, width).clamp(max=num_grid - 1), coord_w + 1)
        grid = torch.arange(num_grid, device=cy.device)
        rows = (grid >= top[:, None]) & (grid <= down[:, None])  # (n, S)
        cols = (grid >= left[:, None]) & (grid <= right[:, None])  # (n, S)
        return rows[:, :, None] & cols[:, None, :], torch.stack([coord_h, coord_w], 1)

    # ---------------------------------------------------------------- plot of the targets (6.6)
    def PlotGT(self, ins_gts_list, ins_ind_gts_list, cate_gts_list, color_list, img, save_prefix="figures/gt"):
        """For each image, one figure of 5 panels (one per FPN level) with that level's positive-channel masks
        over the image, coloured by class (handout figures 8-9). img (bz, 3, H, W) normalised input.
        Returns the saved PNG paths."""
        paths = []
        for b, image in enumerate(denormalize(img.detach().cpu())):
            fig, axes = plt.subplots(1, len(self.seg_num_grids), figsize=(4 * len(self.seg_num_grids), 3.4))
            for level, ax in enumerate(axes):
                ind = ins_ind_gts_list[b][level].cpu()  # (S^2,)
                masks = ins_gts_list[b][level].cpu()[ind].float()  # (n_pos, 2H_f, 2W_f)
                labels = cate_gts_list[b][level].cpu().flatten()[ind]  # (n_pos,)
                masks = F.interpolate(masks[:, None], size=image.shape[-2:], mode="nearest")[:, 0]  # (n_pos, H, W)
                ax.imshow(overlay(image.permute(1, 2, 0).numpy(), masks.numpy(), labels.numpy(), color_list))
                ax.set_title(f"level {level}: S={self.seg_num_grids[level]}, {int(ind.sum())} positive cells")
                ax.axis("off")
            paths.append(save_figure(fig, f"{save_prefix}_{b}.png"))
        return paths

    # ---------------------------------------------------------------- loss (6.9)
    def loss(self, cate_pred_list, ins_pred_list, ins_gts_list, ins_ind_gts_list, cate_gts_list):
        """L = L_cate + 3 L_mask. Predictions are probabilities as forward returns them (training mode); targets
        in either of target's forms (the compact one runs without host-device synchronisation).
        Returns (cate_loss, mask_loss, total_loss); the first two unweighted."""
        # mask loss: dice averaged over the positive channels of every level and image
        dice_sum, num_pos, num_slots = [], [], 0
        for level, ins_pred_level in enumerate(ins_pred_list):  # SOLO: (bz, S^2, 2H_f, 2W_f)
            image, cell, gts, counts = self._positive_slots(level, ins_gts_list, ins_ind_gts_list)  # (m,) (m,) ...
            positive = cell >= 0
            preds = self.cell_masks_train(ins_pred_level, level, image, cell.clamp(min=0), counts)  # (m, h, w)
            dice_sum.append((self.DiceLoss(preds.float(), gts.float()) * positive).sum())
            num_pos.append(positive.sum())
            num_slots += len(cell)
        mask_loss = torch.stack(dice_sum).sum() / torch.stack(num_pos).sum().clamp(min=1)
        if not num_slots:  # no object in the batch: zero, with every level in the graph so that backward works
            mask_loss = mask_loss + sum(t.flatten()[0] for p in ins_pred_list for t in level_tensors(p)).float() * 0

        # category loss: level, image, cell order on both sides
        cate_gts = torch.cat([torch.stack([gts_img[level] for gts_img in cate_gts_list]).flatten()
                              for level in range(len(cate_pred_list))])  # (bz * sum S^2,)
        cate_preds = torch.cat([p.permute(0, 2, 3, 1).reshape(-1, self.cate_out_channels)
                                for p in cate_pred_list])  # (bz * sum S^2, C-1)
        cate_loss = self.FocalLoss(cate_preds.float(), cate_gts)
        total_loss = self.cate_loss_cfg["weight"] * cate_loss + self.mask_loss_cfg["weight"] * mask_loss
        return cate_loss, mask_loss, total_loss

    @staticmethod
    def _positive_slots(level, ins_gts_list, ins_ind_gts_list):
        """One level's targets over the batch as slots: image (m,) and cell (m,) of each (cell -1: the slot is no
        positive cell), and their masks (m, 2H_f, 2W_f). The handout form (S^2,) bool is turned into slots of its
        positive cells (a host-device synchronisation). counts: the number of slots of each image (host integers,
        from the shapes), in image order."""
        images, cells, gts = [], [], []
        for b, (gts_img, ind_img) in enumerate(zip(ins_gts_list, ins_ind_gts_list)):
            cell, masks = ind_img[level], gts_img[level]
            if cell.dtype == torch.bool:  # handout form
                cell = cell.nonzero()[:, 0]  # (P,)
                masks = masks[cell]
            images.append(torch.full_like(cell, b))
            cells.append(cell)
            gts.append(masks)
        return torch.cat(images), torch.cat(cells), torch.cat(gts), [len(cell) for cell in cells]

    @staticmethod
    def DiceLoss(mask_pred, mask_gt, eps=1e-3):
        """1 - 2 sum(p q) / (sum(p^2) + sum(q^2)) over the last two dims: (..., H, W) -> (...).
        eps on each sum (the authors') keeps empty masks finite."""
        inter = (mask_pred * mask_gt).sum((-2, -1))
        return 1 - 2 * inter / ((mask_pred ** 2).sum((-2, -1)) + eps + (mask_gt ** 2).sum((-2, -1)) + eps)

    def FocalLoss(self, cate_preds, cate_gts):
        """Focal loss on probabilities cate_preds (num_entry, C-1) against labels cate_gts (num_entry,), 0 the
        background; channel d's target is (label == d + 1). Summed over every entry, then divided by the number
        of positive cells + 1 (authors, default) or averaged over entries (handout 6.9.1, normalize='mean').
        Probabilities are clamped inside the logs only, at the dtype's smallest normal number: above it the logit
        gets the gradient of the authors' loss on logits, so a positive cell pushed to p = 1e-30 is pulled back
        (a clamp at 1e-6 would leave it no gradient; docs/departures.md)."""
        prob_eps = torch.finfo(cate_preds.dtype).tiny
        alpha, gamma = self.cate_loss_cfg["alpha"], self.cate_loss_cfg["gamma"]
        classes = torch.arange(1, self.num_classes, device=cate_gts.device)  # labels of the C-1 channels
        target = cate_gts[:, None] == classes  # (num_entry, C-1); one_hot would check the range (a sync)
        p_t = torch.where(target, cate_preds, 1 - cate_preds)
        alpha_t = torch.where(target, alpha, 1 - alpha)
        fl = -alpha_t * (1 - p_t) ** gamma * torch.log(p_t.clamp(min=prob_eps))
        if self.cate_loss_cfg.get("normalize", "positives") == "mean":
            return fl.mean()
        return fl.sum() / ((cate_gts > 0).sum() + 1)

    # ---------------------------------------------------------------- post-processing (6.10)
    def PostProcess(self, ins_pred_list, cate_pred_list, ori_size, cfg=None, scaled_size=None):
        """ins_pred_list (SOLO: [(bz, c, H_f, W_f)]; the successors' mask predictions) and cate_pred_list
        [(bz, S, S, C-1)] as forward(eval=True) returns them, ori_size (ori_H, ori_W) of the images before
        resizing, or a list of one such size per image (a batch of images of different sizes, each resized to the
        input height and padded on the right). cfg: POSTPROCESS_HANDOUT / POSTPROCESS_MAP style dict (default
        self.postprocess_cfg). Returns per image: scores (k,), labels (k,) in 1..C-1 and masks (k, ori_H, ori_W)
        in {0, 1}, sorted by score; k = 0 gives empty tensors. scaled_size: each image's (H_s, W_s) inside the
        padded input, one for all or one per image (default: the handout's frame, the image filling the input's
        height; mmdetection's frame, that of the published models, also pads at the bottom)."""
        bz = cate_pred_list[0].shape[0]
        cate_pred_all = torch.cat([c.reshape(bz, -1, self.cate_out_channels) for c in cate_pred_list], 1)
        ins_imgs = [[image_of(level, b) for level in ins_pred_list] for b in range(bz)]  # per image, per level
        sizes = [tuple(s) for s in ori_size] if isinstance(ori_size[0], (tuple, list)) else [tuple(ori_size)] * bz
        if len(sizes) != bz:
            raise ValueError(f"PostProcess: {len(sizes)} image sizes for a batch of {bz} images")
        scaled = [tuple(s) for s in scaled_size] if scaled_size is not None and isinstance(
            scaled_size[0], (tuple, list)) else [scaled_size and tuple(scaled_size)] * bz
        return self.MultiApply(self.PostProcessImg, ins_imgs, cate_pred_all, sizes, scaled,
                               cfg=cfg or self.postprocess_cfg)

    def PostProcessImg(self, ins_pred_img, cate_pred_img, ori_size, scaled_size, cfg):
        """One image: ins_pred_img the head's mask predictions per level (SOLO: (c, H_f, W_f)), cate_pred_img
        (sum S^2, C-1)."""
        # filter: every (cell, class) above the category threshold is a candidate; cells come out ascending
        cell, cls = (cate_pred_img > cfg["cate_thresh"]).nonzero(as_tuple=True)  # (k,), (k,)
        # the masks and maskness-weighted scores of the candidates that can make the pre_NMS_num best
        which, masks, scores, large = self.scored_candidates(ins_pred_img, cell, cate_pred_img[cell, cls], cfg)
        idx = large.nonzero()[:, 0]  # (k',) into the scored candidates
        # sort, Matrix NMS on the masks above ins_thresh, keep the best
        idx = idx[scores[idx].argsort(descending=True)[:cfg["pre_NMS_num"]]]  # (n,)
        labels = cls[which[idx]] + 1
        sorted_labels = labels if cfg["class_wise"] else None
        scores = self.MatrixNMS(masks.intersections(idx, sorted_labels), scores[idx], sorted_labels,
                                method=cfg["nms_kernel"], gauss_sigma=cfg["nms_sigma"])  # (n,)
        keep = (scores >= cfg["update_thresh"]).nonzero()[:, 0]
        keep = keep[scores[keep].argsort(descending=True)[:cfg["keep_instance"]]]  # (m,) into the n
        # the authors' resize: to the padded input, crop the padding, to the original size
        masks = masks.to_original(idx[keep], ori_size, scaled_size)  # (m, ori_H, ori_W) bool
        scores, labels = scores[keep], labels[keep]
        visible = masks.flatten(1).view(torch.uint8).amax(1) > 0  # a mask wholly in the padding is no detection
        if visible.all():  # the usual case: no copy of the masks
            return scores, labels, masks
        return scores[visible], labels[visible], masks[visible]

    def scored_candidates(self, ins_pred_img, cell, cate_scores, cfg):
        """The candidates' masks and scores, for those (cell (k,), category score (k,)) that can make the
        pre_NMS_num best: (which (k',) ascending into the k, their masks (candidate_masks), scores (k',) the
        category score times the maskness (the authors': the mean probability over the pixels above ins_thresh),
        large (k',) bool: more pixels above ins_thresh than their level's stride, the authors' test of a mask).
        Maskness is at most 1, so no candidate scores above its category score: the masks of the best
        FIRST_SHARE x pre_NMS_num by category score come first; after them, those of any other candidate whose
        category score reaches the pre_NMS_num-th best score of large masks so far (where fewer large masks than
        pre_NMS_num, every other candidate's). The rest could not make the pre_NMS_num best: the same detections
        as from every candidate's mask (apart from the order of exactly equal scores), for less work where there
        are more than FIRST_SHARE x pre_NMS_num candidates."""
        cell_stride = torch.cat([torch.full((s * s,), float(st), device=cell.device)
                                 for s, st in zip(self.seg_num_grids, self.strides)])  # (sum S^2,)
        order, n = cate_scores.argsort(descending=True), cfg["pre_NMS_num"]
        which = order[:math.ceil(FIRST_SHARE * n)].sort().values  # ascending: their cells stay ascending
        masks = self.candidate_masks(ins_pred_img, cell[which], cfg["ins_thresh"])
        rest = order[len(which):]
        if len(rest):
            scores = cate_scores[which] * masks.mass / masks.area
            large = masks.area > cell_stride[cell[which]]
            if large.sum() >= n:  # else every candidate may still make the best
                # the n-th best large score, less a float rounding margin (cate x mass / area may round an ulp
                # above cate where maskness is 1); a top 0 takes none
                bound = scores[large].topk(n).values[-1] * (1 - 1e-6) if n else math.inf
                rest = rest[cate_scores[rest] >= bound]
            if len(rest):
                rest = rest.sort().values
                masks = self.candidate_masks(ins_pred_img, cell[rest], cfg["ins_thresh"], held=masks)
                which = torch.cat([which, rest])
        scores = cate_scores[which] * masks.mass / masks.area  # (k',)
        return which, masks, scores, masks.area > cell_stride[cell[which]]

    def _cells_by_level(self, cell):
        """Ascending cell indices into the levels' concatenated S^2 cells -> (level, its cells (k_l,) as channel
        indices i * S + j of that level) for each level holding any, in level order."""
        out, start = [], 0
        for level, num_grid in enumerate(self.seg_num_grids):
            local = cell[(cell >= start) & (cell < start + num_grid ** 2)] - start  # (k_l,)
            start += num_grid ** 2
            if len(local):
                out.append((level, local))
        return out

    @staticmethod
    @full_precision
    def MatrixNMS(sorted_ins, sorted_scores, sorted_labels=None, method="gauss", gauss_sigma=2.0):
        """Matrix NMS (SOLOv2, Wang et al. 2020, eq. 4), one pass, no IoU threshold.
        Args: sorted_ins (n, H, W) binary masks in descending score order, or their pairwise intersections (n, n)
          (the diagonal their areas; PostProcessImg's candidate masks compute them where they hold the masks);
          sorted_scores (n,); sorted_labels (n,)
          or None: with labels a mask is only suppressed by higher-scored masks of its class (the authors'),
          without them by every higher-scored mask (the handout's). method 'gauss' (decay exp(-sigma iou^2),
          the handout's exp(-iou^2 / 0.5) is sigma = 2) or 'linear' (1 - iou).
        Returns: decayed scores (n,); the top mask keeps its score and no score grows."""
        n = sorted_scores.numel()
        if method not in ("gauss", "linear"):
            raise ValueError(f"MatrixNMS method must be 'gauss' or 'linear', got {method!r}")
        if n == 0:
            return sorted_scores
        inter = sorted_ins if sorted_ins.dim() == 2 else mask_intersections(sorted_ins, sorted_labels)  # (n, n)
        areas = inter.diagonal().expand(n, n)  # areas[i, j] = area_j
        iou = (inter / (areas + areas.T - inter).clamp(min=1)).triu(diagonal=1)  # iou[i, j], i scored above j
        if sorted_labels is not None:
            iou = iou * (sorted_labels[:, None] == sorted_labels[None, :])
        # iou_cmax[i]: how much mask i is itself suppressed, its largest IoU with any higher-scored mask
        iou_cmax = iou.max(0).values.expand(n, n).T  # (n, n), row i holds iou_cmax[i]
        if method == "gauss":
            decay = torch.exp(-gauss_sigma * (iou ** 2 - iou_cmax ** 2))
        else:
            decay = (1 - iou) / (1 - iou_cmax).clamp(min=1e-6)  # a copy of a fully suppressed mask: 0, not 0 / 0
        return sorted_scores * decay.min(0).values

    @staticmethod
    def points_nms(heat, kernel=2):
        """Keep a category score only where it is the max of its 2x2 neighbourhood, per channel (6.10.4).
        heat (bz, C-1, S, S)."""
        if kernel != 2:
            raise ValueError(f"points_nms kernel must be 2, got {kernel}")
        hmax = F.max_pool2d(heat, (kernel, kernel), stride=1, padding=1)
        keep = (hmax[:, :, :-1, :-1] == heat).to(heat.dtype)
        return heat * keep

    # ---------------------------------------------------------------- plot of the detections (6.11)
    def PlotInfer(self, NMS_sorted_scores_list, NMS_sorted_cate_label_list, NMS_sorted_ins_list, color_list, img,
                  save_prefix="figures/infer", score_thresh=0.3, start_index=0, save_paths=None):
        """Overlay the kept masks on the original images, coloured by class, with class name and score
        (handout figures 11-14; plots.detections_figure). img (bz, 3, ori_H, ori_W), uint8 or float in [0, 1].
        Files are <save_prefix>_<start_index + b>.png, or save_paths (one per image). Returns the PNG paths."""
        paths = []
        for b, image in enumerate(img.detach().cpu()):
            image = image.float() / 255 if image.dtype == torch.uint8 else image.float()
            fig = detections_figure(image.permute(1, 2, 0).numpy(), NMS_sorted_scores_list[b].cpu().float().numpy(),
                                    NMS_sorted_cate_label_list[b].cpu().numpy(), NMS_sorted_ins_list[b].cpu().numpy(),
                                    self.class_names, color_list, score_thresh)
            paths.append(save_figure(fig, save_paths[b] if save_paths else f"{save_prefix}_{start_index + b}.png"))
        return paths


    # ---------------------------------------------------------------- the mask branch: what a successor overrides
    def _init_mask_branch(self):
        """SOLO's mask branch: a CoordConv tower, then per level a 1x1 conv to its S^2 mask channels."""
        c = self.seg_feat_channels
        self.ins_convs = tower(self.in_channels + 2, c, self.stacked_convs)
        self.ins_out_list = nn.ModuleList([nn.Conv2d(c, s * s, 1) for s in self.seg_num_grids])

    def mask_single_level(self, fpn_feat, idx, eval=False):
        """SOLO's mask branch on one level: CoordConv, the tower, then the level's 1x1 conv to S^2 channels. The
        authors upsample the features x2 before the 1x1 conv; both are linear (the interpolation weights sum to 1,
        so the bias passes unchanged), so the conv runs first, at the feature resolution, on 4x fewer pixels.
        Training: (bz, S^2, 2H_f, 2W_f) probabilities; eval: the tower's features (bz, c, H_f, W_f)."""
        ins_feat = torch.cat([fpn_feat, coord_feat(fpn_feat)], 1)  # (bz, 256 + 2, H_f, W_f)
        for conv in self.ins_convs:
            ins_feat = conv(ins_feat)  # (bz, c, H_f, W_f)
        if eval:
            return ins_feat
        return upsample_sigmoid(self.ins_out_list[idx](ins_feat), tuple(2 * s for s in fpn_feat.shape[-2:]))

    def mask_sizes(self, ins_pred_list):
        """The size of each level's masks in training, (2H_f, 2W_f): the resolution of its mask targets."""
        return [tuple(pred.shape[-2:]) for pred in ins_pred_list]

    def cell_masks_train(self, ins_pred_level, level, image, cell, counts):
        """Training: the mask probabilities (m, 2H_f, 2W_f) of the cells `cell` (m,) (channel indices i * S + j of
        the level) of the images `image` (m,); counts, the number of them in each image, in image order (the
        successors need it). SOLO's are channels of its S^2 outputs."""
        return ins_pred_level[image, cell]

    def cell_logits(self, ins_pred_img, cell):
        """SOLO's mask logits of the cells `cell` (ascending indices into the levels' concatenated S^2 cells) of one
        image with mask features ins_pred_img [(c, H_f, W_f)] per level, at the feature resolution: per level
        holding any, (their positions in `cell` (k_l,), logits (k_l, H_f, W_f)). Only the chosen channels of each
        level's 1x1 output conv are computed, in the network's precision (autocast's under --amp); what follows
        is post-processing, in float32."""
        out, start = [], 0
        for level, local in self._cells_by_level(cell):  # the levels holding any
            out_conv = self.ins_out_list[level]
            feat = ins_pred_img[level]  # (c, H_f, W_f), NCHW or channels_last: a view (c, H_f * W_f) either way
            # the 1x1 conv as the product it is, each cell's map in one piece (conv2d on one image of a
            # channels_last batch took oneDNN's slow path and wrote the maps interleaved)
            logits = torch.addmm(out_conv.bias[local, None], out_conv.weight[local].flatten(1), feat.flatten(1))
            logits = logits.view(-1, *feat.shape[-2:])  # (k_l, H_f, W_f)
            out.append((torch.arange(start, start + len(local), device=cell.device), logits))
            start += len(local)
        return out

    def cell_masks(self, ins_pred_img, cell):
        """Mask probabilities (k, H/4, W/4) of the cells `cell` (see cell_logits): their logits upsampled x2 in the
        authors' order (the training resolution), passed through the sigmoid and resized to H/4 (a no-op on the
        stride-8 levels)."""
        mask_size = tuple(2 * s for s in ins_pred_img[0].shape[-2:])  # stride 4, as level 0 is stride 8
        masks = []
        for _, logits in self.cell_logits(ins_pred_img, cell):
            probs = upsample_sigmoid(logits[None].float(), tuple(2 * s for s in logits.shape[-2:]))  # (1, k_l, ...)
            if probs.shape[-2:] != mask_size:
                probs = F.interpolate(probs, size=mask_size, mode="bilinear", align_corners=False)
            masks.append(probs[0])  # (k_l, H/4, W/4)
        return torch.cat(masks) if masks else ins_pred_img[0].new_zeros(0, *mask_size, dtype=torch.float)

    def candidate_masks(self, ins_pred_img, cell, thresh, held=None):
        """The candidates' masks as post-processing reads them (maskness sums, pairwise intersections,
        probabilities). SOLO's on the CPU: mask_ops.TiledMasks, the same probabilities computed only where they
        can exceed thresh; a successor's, or any on a GPU (where one kernel over every pixel costs less than many
        small ones): mask_ops.DenseMasks of cell_masks. held: masks from an earlier call, which take these after
        theirs (and are returned)."""
        if getattr(self.cell_masks, "__func__", None) is SOLOHead.cell_masks and cell.device.type == "cpu":
            mask_size = tuple(2 * s for s in ins_pred_img[0].shape[-2:])
            masks, make = self.cell_logits(ins_pred_img, cell), functools.partial(TiledMasks, size=mask_size)
        else:
            masks, make = self.cell_masks(ins_pred_img, cell).float(), DenseMasks
        if held is None:
            return make(masks, thresh=thresh)
        held.add(masks)
        return held


# ----------------------------------------------------------------------------------------------------
# The visual check of handout 6.6: python solo_head.py
# ----------------------------------------------------------------------------------------------------
def get_args_parser():
    parser = argparse.ArgumentParser(description="Plot the SOLO targets of a few images (handout figures 8-9)")
    parser.add_argument("--backbone-weights", default="coco", type=str,
                        help="'coco', 'none' or a weights file; only the feature sizes matter for the targets")
    return add_visual_check_args(parser)


@torch.no_grad()
def plot_target_figures(backbone, head, dataset, out, num=5, seed=0):
    """gt_<k>.png: the FPN targets of num images (choose_images, as the dataset figures) over the input, one panel
    per level (handout figures 8-9), from `head` on `backbone`'s features (any head: the targets are SOLO's).
    Returns the paths."""
    images = [dataset[i] for i in choose_images(dataset.num_objects, num, seed)]
    img, label_list, mask_list, bbox_list = BuildDataLoader.collect_fn(images)
    device = next(head.parameters()).device
    _, ins_pred_list = head.eval()(backbone.eval()(img.to(device)))  # only the feature sizes matter
    targets = head.target(ins_pred_list, *([t.to(device) for t in ts] for ts in (bbox_list, label_list, mask_list)))
    os.makedirs(out, exist_ok=True)
    return head.PlotGT(*targets, class_colors(len(dataset.class_names)), img, save_prefix=os.path.join(out, "gt"))


def main(args):
    dataset = visual_check_dataset(args)
    weights = args.backbone_weights
    try:
        backbone = build_backbone("resnet50", pretrained=weights != "none",
                                  checkpoint_file=None if weights in ("coco", "none") else weights)
    except WeightsUnavailableError as e:
        print(f"{e}\n-> using a random backbone: the targets depend only on the feature map sizes")
        backbone = build_backbone("resnet50", pretrained=False)
    head = SOLOHead(len(dataset.class_names) + 1, class_names=dataset.class_names)
    for path in plot_target_figures(backbone, head, dataset, args.out, args.num, args.seed):
        print(f"saved {path}")


if __name__ == "__main__":
    matplotlib.use("Agg")  # a script saves its figures and never shows them
    run_script(main, get_args_parser())
