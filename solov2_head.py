"""SOLOv2's head: SOLOHead with dynamic mask kernels and one map of mask features shared by every level (Wang et
al., "SOLOv2: Dynamic and Fast Instance Segmentation", NeurIPS 2020; the authors' solov2_head.py and
mask_feat_head.py). Targets, losses, Matrix NMS and post-processing are SOLOHead's.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from solo_head import SOLOHead, conv_gn_relu, coord_feat, fpn_levels, tower

MASK_FEAT_HIDDEN = 128  # the width of the mask feature branch before its last conv (the authors')


class MaskFeatBranch(nn.Module):
    """SOLOv2's unified mask features (the authors' MaskFeatHead). FPN level P_(2+i) (stride 4 * 2^i) goes
    through max(i, 1) 3x3 conv-GN-ReLU layers, each of P3-P5's followed by a x2 bilinear upsampling, so that every
    level reaches stride 4; the deepest level gets the two coordinate channels first (CoordConv, as the authors
    do); the levels are summed and a 1x1 conv-GN-ReLU gives the out_channels (E) mask features."""

    def __init__(self, in_channels, channels, out_channels, num_levels=4):
        super().__init__()
        self.levels = nn.ModuleList()
        for i in range(num_levels):
            layers = []
            first = in_channels + 2 * (i == num_levels - 1)  # the deepest level takes the coordinates
            for j in range(max(i, 1)):
                layers.append(conv_gn_relu(first if j == 0 else channels, channels))
                if i > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.levels.append(nn.Sequential(*layers))
        self.out = conv_gn_relu(channels, out_channels, kernel_size=1)

    def forward(self, feats):
        """feats: P2-P5, 4 x (bz, 256, H/s, W/s) with s = 4, 8, 16, 32 -> (bz, E, H/4, W/4)."""
        deepest = torch.cat([feats[-1], coord_feat(feats[-1])], 1)  # (bz, 256 + 2, H/32, W/32)
        fused = sum(level(feat) for level, feat in zip(self.levels, [*feats[:-1], deepest]))  # (bz, c, H/4, W/4)
        return self.out(fused)


class SOLOv2Head(SOLOHead):
    """SOLOv2 (Wang et al., "SOLOv2: Dynamic and Fast Instance Segmentation", NeurIPS 2020; the authors'
    solov2_head.py and mask_feat_head.py). The mask of a cell is its dynamic 1x1 kernel of E weights convolved
    with one map of E mask features shared by every level. Kernel branch, per level: the features with the
    coordinate channels, resized to S x S (the category branch's input is the same resize without them), a tower
    and a 3x3 conv to E channels. Mask features: MaskFeatBranch over the backbone's P2-P5, at stride 4, so every
    level's masks and mask targets are at (H/4, W/4). Mask predictions per level, training and eval: (kernels
    (bz, E, S, S), mask features (bz, E, H/4, W/4)), the mask features one tensor shared by the levels."""

    def __init__(self, *args, mask_feat_channels=256, **kwargs):
        self.mask_feat_channels = mask_feat_channels
        super().__init__(*args, **kwargs)

    def _init_mask_branch(self):
        c, e = self.seg_feat_channels, self.mask_feat_channels
        self.kernel_convs = tower(self.in_channels + 2, c, self.stacked_convs)
        self.kernel_out = nn.Conv2d(c, e, 3, padding=1)
        # the authors' 128 channels before the last conv, fewer where E itself is smaller (the demo's 64)
        self.mask_feat_branch = MaskFeatBranch(self.in_channels, min(MASK_FEAT_HIDDEN, e), e)

    def forward(self, fpn_feat_list, eval=False):
        feats = fpn_levels(fpn_feat_list)
        mask_feat = self.mask_feat_branch(feats[:4])  # (bz, E, H/4, W/4) from strides 4-32, before NewFPN
        cate_pred_list, kernel_pred_list = super().forward(feats, eval=eval)
        return cate_pred_list, [(kernel_pred, mask_feat) for kernel_pred in kernel_pred_list]

    def mask_single_level(self, fpn_feat, idx, eval=False):
        num_grid = self.seg_num_grids[idx]
        kernel_feat = F.interpolate(torch.cat([fpn_feat, coord_feat(fpn_feat)], 1), size=(num_grid, num_grid),
                                    mode="bilinear", align_corners=False)  # (bz, 256 + 2, S, S)
        for conv in self.kernel_convs:
            kernel_feat = conv(kernel_feat)  # (bz, c, S, S)
        return self.kernel_out(kernel_feat)  # (bz, E, S, S): cell (i, j)'s kernel at [:, :, i, j]

    def mask_sizes(self, ins_pred_list):
        return [tuple(mask_feat.shape[-2:]) for _, mask_feat in ins_pred_list]

    def cell_masks_train(self, ins_pred_level, level, image, cell, counts):
        kernel_pred, mask_feat = ins_pred_level  # (bz, E, S, S), (bz, E, H/4, W/4)
        kernels = kernel_pred.flatten(2)[image, :, cell]  # (m, E)
        # the dynamic 1x1 convolution as a product, each image's kernels on its own mask features
        logits = [k @ feat.flatten(1) for k, feat in zip(kernels.split(counts), mask_feat)]  # [(m_b, H/4 * W/4)]
        return torch.cat(logits).view(-1, *mask_feat.shape[-2:]).sigmoid()  # (m, H/4, W/4)

    def cell_masks(self, ins_pred_img, cell):
        mask_feat = ins_pred_img[0][1]  # (E, H/4, W/4)
        kernels = torch.cat([kernel_pred.flatten(1) for kernel_pred, _ in ins_pred_img], 1)[:, cell]  # (E, k)
        return (kernels.T @ mask_feat.flatten(1)).view(-1, *mask_feat.shape[-2:]).sigmoid().float()  # (k, ...)
