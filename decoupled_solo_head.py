"""Decoupled SOLO's head: SOLOHead with another mask branch, S maps per grid column and S per row instead of S^2
masks (Wang et al., "SOLO: Segmenting Objects by Locations", ECCV 2020, section 3.4; the authors'
decoupled_solo_head.py). Targets, losses, Matrix NMS and post-processing are SOLOHead's.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from solo_head import SOLOHead, coord_feat, tower


class DecoupledSOLOHead(SOLOHead):
    """Decoupled SOLO (Wang et al., "SOLO: Segmenting Objects by Locations", ECCV 2020, section 3.4; the authors'
    decoupled_solo_head.py). Per level the mask branch outputs S maps X_j, one per grid column, and S maps Y_i, one
    per row, instead of S^2 masks: the mask of cell (i, j) is sigmoid(X_j) * sigmoid(Y_i). Two towers, X's with
    the x coordinate channel and Y's with the y one; their 3x3 output convs run after the x2 upsampling, as the
    authors' do. Mask predictions per level, training and eval: (bz, 2S, 2H_f, 2W_f), the S sigmoid(X_j) maps
    then the S sigmoid(Y_i) maps."""

    def _init_mask_branch(self):
        c = self.seg_feat_channels
        self.ins_convs_x = tower(self.in_channels + 1, c, self.stacked_convs)
        self.ins_convs_y = tower(self.in_channels + 1, c, self.stacked_convs)
        self.ins_out_x = nn.ModuleList([nn.Conv2d(c, s, 3, padding=1) for s in self.seg_num_grids])
        self.ins_out_y = nn.ModuleList([nn.Conv2d(c, s, 3, padding=1) for s in self.seg_num_grids])

    def mask_single_level(self, fpn_feat, idx, eval=False):
        coords = coord_feat(fpn_feat)  # (bz, 2, H_f, W_f): x, y
        size = tuple(2 * s for s in fpn_feat.shape[-2:])
        maps = []
        for convs, out_convs, coord in ((self.ins_convs_x, self.ins_out_x, coords[:, :1]),
                                        (self.ins_convs_y, self.ins_out_y, coords[:, 1:])):
            feat = torch.cat([fpn_feat, coord], 1)  # (bz, 256 + 1, H_f, W_f)
            for conv in convs:
                feat = conv(feat)  # (bz, c, H_f, W_f)
            feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)  # (bz, c, 2H_f, 2W_f)
            maps.append(out_convs[idx](feat).sigmoid())  # (bz, S, 2H_f, 2W_f)
        return torch.cat(maps, 1)  # (bz, 2S, 2H_f, 2W_f)

    def cell_masks_train(self, ins_pred_level, level, image, cell, counts):
        num_grid = self.seg_num_grids[level]
        x, y = ins_pred_level[image, cell % num_grid], ins_pred_level[image, num_grid + cell // num_grid]  # X_j, Y_i
        return x.float() * y.float()  # one rounding under autocast, as SOLO's masks

    def cell_masks(self, ins_pred_img, cell):
        """Eval, in the authors' order: each level's X and Y probabilities resized to H/4, then the candidates'
        products sigmoid(X_j) * sigmoid(Y_i)."""
        mask_size = ins_pred_img[0].shape[-2:]  # level 0's maps are at stride 4 already
        masks = []
        for level, local in self._cells_by_level(cell):
            maps, num_grid = ins_pred_img[level].float(), self.seg_num_grids[level]  # (2S, 2H_f, 2W_f)
            if maps.shape[-2:] != mask_size:
                maps = F.interpolate(maps[None], size=mask_size, mode="bilinear", align_corners=False)[0]
            masks.append(maps[local % num_grid] * maps[num_grid + local // num_grid])  # (k_l, H/4, W/4)
        return torch.cat(masks) if masks else ins_pred_img[0].new_zeros(0, *mask_size, dtype=torch.float)
