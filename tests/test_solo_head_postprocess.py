"""Specification of SOLOHead's inference (handout 6.10, 6.11, docs/handout-notes.md 12-15).

MatrixNMS (SOLOv2 eq. 4, one pass): mask j's score is multiplied by
    decay_j = min over higher-scored masks i (of j's class, or all with labels=None) of f(iou_ij) / f(cmax_i),
    cmax_i = max IoU of mask i with the masks scored above it, f(x) = 1 - x (linear) or exp(-sigma x^2) (gauss).
PostProcess: candidates are (cell, class) entries above cate_thresh; their masks come from cell_masks (below a
    head that reads them from hand-made (S^2, H/4, W/4) maps); masks whose area (pixels > 0.5 at H/4) is
    not larger than the level's stride are dropped; score *= mean of the mask probabilities above 0.5; sort,
    MatrixNMS, keep decayed scores >= update_thresh, keep_instance best; masks resized to the padded input, the
    padding cropped, resized to the original frame and thresholded at 0.5.
The predictions below are built by hand; expected values are derived in the comments.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import mask_ops
import plots
import solo_head
from conftest import ReportsCuda
from datafiles import CLASS_NAMES
from dataset import denormalize
from mask_ops import mask_intersections, masks_to_original, resize_matrix
from plots import CLASS_COLORS
from solo_head import POSTPROCESS_HANDOUT, POSTPROCESS_MAP, SOLOHead

HANDOUT_COLORS = ["jet", "ocean", "Spectral"]  # handout 6.11's color_list

# ------------------------------------------------------------------ Matrix NMS


def reference_matrix_nms(masks, scores, labels=None, method="gauss", sigma=2.0):
    """Plain loops over the SOLOv2 formula (the slow reference)."""
    n = len(scores)
    flat = masks.reshape(n, -1).double()

    def iou(a, b):
        inter = (flat[a] * flat[b]).sum().item()
        union = flat[a].sum().item() + flat[b].sum().item() - inter
        return inter / union if union > 0 else 0.0

    def same_class(a, b):
        return labels is None or labels[a] == labels[b]

    def f(x):
        return math.exp(-sigma * x * x) if method == "gauss" else 1 - x

    cmax = [max([iou(k, i) for k in range(i) if same_class(k, i)], default=0.0) for i in range(n)]
    out = []
    for j in range(n):
        decay = 1.0
        for i in range(j):
            if same_class(i, j):
                fi, fc = f(iou(i, j)), f(cmax[i])
                # a fully suppressed mask i (f(cmax_i) = 0) no longer suppresses anything but its own copies
                ratio = fi / fc if fc > 0 else (0.0 if fi == 0 else math.inf)
                decay = min(decay, ratio)
        out.append(float(scores[j]) * decay)
    return torch.tensor(out, dtype=torch.float64)


def strips(*spans, width=10):
    """1-row masks (n, 1, width): mask k covers columns [a, b) of spans[k]."""
    m = torch.zeros(len(spans), 1, width)
    for k, (a, b) in enumerate(spans):
        m[k, 0, a:b] = 1
    return m


def random_masks(n, seed):
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(n, 1, 1, generator=g) * 0.6 + 0.1
    masks = (torch.rand(n, 5, 6, generator=g) < density).float()
    scores = torch.rand(n, generator=g).sort(descending=True).values
    labels = torch.randint(1, 4, (n,), generator=g)
    return masks, scores, labels


class TestMatrixNMS:
    # handout 6.10.3's example (values corrected in docs/handout-notes.md 12):
    #   mask 1 = [[1,1,0],[1,1,0],[0,0,1]] area 5, mask 2 = [[0,0,1],[0,0,1],[0,0,0]] area 2,
    #   mask 3 = [[1,1,0],[1,1,0],[0,0,0]] area 4; intersections [[5,0,4],[0,2,0],[4,0,4]], only IoU(1,3) = 4/5.
    HANDOUT_MASKS = torch.tensor([[[1, 1, 0], [1, 1, 0], [0, 0, 1]],
                                  [[0, 0, 1], [0, 0, 1], [0, 0, 0]],
                                  [[1, 1, 0], [1, 1, 0], [0, 0, 0]]], dtype=torch.float32)
    HANDOUT_SCORES = torch.tensor([0.9, 0.8, 0.8])

    def test_handout_example_linear(self):
        # cmax = [0, 0, 0.8]; decay_3 = min((1 - 0.8) / (1 - 0), (1 - 0) / (1 - 0)) = 0.2 -> [0.9, 0.8, 0.16]
        out = SOLOHead.MatrixNMS(self.HANDOUT_MASKS, self.HANDOUT_SCORES, method="linear")
        torch.testing.assert_close(out, torch.tensor([0.9, 0.8, 0.16]))

    def test_handout_example_gauss(self):
        # decay_3 = exp(-2 * 0.8^2) / exp(-2 * 0^2) = exp(-1.28) = 0.27804 -> [0.9, 0.8, 0.8 * 0.27804]
        out = SOLOHead.MatrixNMS(self.HANDOUT_MASKS, self.HANDOUT_SCORES, method="gauss", gauss_sigma=2.0)
        torch.testing.assert_close(out, torch.tensor([0.9, 0.8, 0.8 * math.exp(-1.28)]))
        assert math.exp(-1.28) == pytest.approx(0.27804, abs=1e-5)

    def test_identical_masks(self):
        # IoU 1: linear decay (1 - 1) / (1 - 0) = 0; gauss exp(-2 * 1) = 0.13534
        masks, scores = strips((2, 6), (2, 6)), torch.tensor([0.9, 0.7])
        torch.testing.assert_close(SOLOHead.MatrixNMS(masks, scores, method="linear"), torch.tensor([0.9, 0.0]))
        torch.testing.assert_close(SOLOHead.MatrixNMS(masks, scores, method="gauss"),
                                   torch.tensor([0.9, 0.7 * math.exp(-2)]))

    def test_three_identical_masks_linear_no_nan(self):
        # masks 2 and 3 are copies of mask 1: both decay to 0 through mask 1. Mask 2 (cmax = 1) adds the term
        # (1 - 1) / (1 - 1) = 0 / 0 for mask 3: it must not turn the score into NaN.
        masks, scores = strips((2, 6), (2, 6), (2, 6)), torch.tensor([0.9, 0.8, 0.7])
        out = SOLOHead.MatrixNMS(masks, scores, method="linear")
        torch.testing.assert_close(out, torch.tensor([0.9, 0.0, 0.0]))
        # gauss: exp(-2 (1 - 0)) through mask 1 for both
        out = SOLOHead.MatrixNMS(masks, scores, method="gauss")
        torch.testing.assert_close(out, torch.tensor([0.9, 0.8 * math.exp(-2), 0.7 * math.exp(-2)]))

    @pytest.mark.parametrize("method", ["linear", "gauss"])
    def test_disjoint_masks_unchanged(self, method):
        masks, scores = strips((0, 3), (3, 5), (6, 10)), torch.tensor([0.9, 0.6, 0.3])
        torch.testing.assert_close(SOLOHead.MatrixNMS(masks, scores, method=method), scores)

    @pytest.mark.parametrize("big_first", [True, False])
    def test_nested_masks(self, big_first):
        # small (4 px) inside big (16 px): IoU = 4 / 16 = 0.25 whichever scores higher.
        # linear: 1 - 0.25 = 0.75; gauss: exp(-2 * 0.0625) = exp(-0.125) = 0.88250
        big, small = torch.zeros(6, 6), torch.zeros(6, 6)
        big[1:5, 1:5] = 1
        small[2:4, 2:4] = 1
        masks = torch.stack([big, small] if big_first else [small, big])
        scores = torch.tensor([0.9, 0.6])
        torch.testing.assert_close(SOLOHead.MatrixNMS(masks, scores, method="linear"), torch.tensor([0.9, 0.45]))
        torch.testing.assert_close(SOLOHead.MatrixNMS(masks, scores, method="gauss"),
                                   torch.tensor([0.9, 0.6 * math.exp(-0.125)]))

    def test_chain_compensation(self):
        # A = [0, 4), B = [2, 10), C = [4, 10): IoU(A, B) = 2 / 10 = 0.2, IoU(B, C) = 6 / 8 = 0.75, IoU(A, C) = 0.
        # cmax = [0, 0.2, 0.75]. B is itself suppressed by A, so it suppresses C less than its IoU says:
        #   linear: decay_B = 0.8; decay_C = min(1 - 0, (1 - 0.75) / (1 - 0.2)) = 0.3125 (0.25 without
        #           compensation) -> [0.9, 0.64, 0.21875]
        #   gauss:  decay_B = exp(-2 * 0.04) = 0.92312; decay_C = exp(-2 * (0.5625 - 0.04)) = exp(-1.045) = 0.35169
        #           (exp(-1.125) = 0.32465 without compensation)
        masks, scores = strips((0, 4), (2, 10), (4, 10)), torch.tensor([0.9, 0.8, 0.7])
        torch.testing.assert_close(SOLOHead.MatrixNMS(masks, scores, method="linear"),
                                   torch.tensor([0.9, 0.64, 0.21875]))
        torch.testing.assert_close(SOLOHead.MatrixNMS(masks, scores, method="gauss"),
                                   torch.tensor([0.9, 0.8 * math.exp(-0.08), 0.7 * math.exp(-1.045)]))

    def test_class_wise(self):
        # identical masks of different classes: untouched with labels, suppressed (exp(-2)) without
        masks, scores = strips((2, 6), (2, 6)), torch.tensor([0.9, 0.7])
        out = SOLOHead.MatrixNMS(masks, scores, torch.tensor([1, 2]), method="gauss")
        torch.testing.assert_close(out, scores)
        out = SOLOHead.MatrixNMS(masks, scores, None, method="gauss")
        torch.testing.assert_close(out, torch.tensor([0.9, 0.7 * math.exp(-2)]))
        # same class: suppressed with labels too
        out = SOLOHead.MatrixNMS(masks, scores, torch.tensor([3, 3]), method="gauss")
        torch.testing.assert_close(out, torch.tensor([0.9, 0.7 * math.exp(-2)]))

    @pytest.mark.parametrize("seed", range(4))
    @pytest.mark.parametrize("method", ["linear", "gauss"])
    @pytest.mark.parametrize("class_wise", [True, False])
    def test_top_unchanged_no_score_grows(self, seed, method, class_wise):
        masks, scores, labels = random_masks(12, seed)
        out = SOLOHead.MatrixNMS(masks, scores, labels if class_wise else None, method=method)
        assert out[0] == scores[0]
        assert (out <= scores).all() and (out >= 0).all()

    @pytest.mark.parametrize("seed", range(4))
    @pytest.mark.parametrize("method,sigma", [("linear", 2.0), ("gauss", 2.0), ("gauss", 0.5)])
    @pytest.mark.parametrize("class_wise", [True, False])
    def test_matches_loop_reference(self, seed, method, sigma, class_wise):
        masks, scores, labels = random_masks(12, seed)
        labels = labels if class_wise else None
        out = SOLOHead.MatrixNMS(masks, scores, labels, method=method, gauss_sigma=sigma)
        expected = reference_matrix_nms(masks, scores, labels, method, sigma)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)

    def test_empty_input(self):
        out = SOLOHead.MatrixNMS(torch.zeros(0, 4, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
        assert out.shape == (0,)

    def test_bad_method_raises(self):
        with pytest.raises(ValueError, match="method must be 'gauss' or 'linear', got 'box'"):
            SOLOHead.MatrixNMS(strips((0, 2)), torch.tensor([0.5]), method="box")


# ------------------------------------------------------------------ PostProcess

GRIDS = (8, 6, 4, 4, 2)  # small grids, default strides (8, 8, 16, 32, 32)
INPUT = (256, 352)  # padded input; the image was resized to 256 x int(256 * 256 / 192) = 256 x 341
QUARTER = (INPUT[0] // 4, INPUT[1] // 4)  # (64, 88)
ORI = (192, 256)  # original frame; input pixel = 4/3 original pixel, quarter pixel = 3 original pixels
INSIDE, OUTSIDE = 0.97, 0.02  # near-binary mask probabilities; maskness of such a mask is 0.97


class GivenMasksHead(SOLOHead):
    """PostProcess with hand-made masks: ins_pred_list holds each level's (bz, S^2, H/4, W/4) mask probabilities,
    and a cell's mask is read off them instead of being computed from mask features."""

    def cell_masks(self, ins_pred_img, cell):
        return torch.cat(ins_pred_img)[cell]


@pytest.fixture(scope="module")
def head():
    return GivenMasksHead(num_grids=GRIDS, seg_feat_channels=32, stacked_convs=1)


def quarter_rect(top, left, h, w, inside=INSIDE, outside=OUTSIDE):
    m = torch.full(QUARTER, outside)
    m[top:top + h, left:left + w] = inside
    return m


def ori_rect(top, left, h, w):
    m = torch.zeros(ORI)
    m[top:top + h, left:left + w] = 1
    return m


def eval_preds(objects_per_image, cate_background=0.01):
    """objects_per_image: per image a list of (level, i, j, label, cate score, quarter mask (64, 88)).
    Returns cate_pred_list [(bz, S, S, C-1)] as forward(eval=True) does, and ins_pred_list [(bz, S^2, 64, 88)]
    the masks GivenMasksHead reads."""
    bz = len(objects_per_image)
    cate = [torch.full((bz, s, s, 3), cate_background) for s in GRIDS]
    ins = [torch.full((bz, s * s, *QUARTER), OUTSIDE) for s in GRIDS]
    for b, objects in enumerate(objects_per_image):
        for level, i, j, label, score, mask in objects:
            cate[level][b, i, j, label - 1] = score
            ins[level][b, i * GRIDS[level] + j] = mask
    return cate, ins


def iou(a, b):
    return ((a > 0) & (b > 0)).sum().item() / ((a > 0) | (b > 0)).sum().item()


def cfg(**changes):
    return {**POSTPROCESS_HANDOUT, **changes}


# three disjoint objects; original-frame rectangles are multiples of 3 so quarter = original / 3
OBJ_A = (0, 2, 5, 1, 0.9, quarter_rect(10, 20, 20, 30))  # original rows [30, 90), cols [60, 150)
OBJ_B = (2, 1, 3, 2, 0.8, quarter_rect(30, 65, 30, 21))  # rows [90, 180), cols [195, 256): right edge.
# Quarter column 85 is input [340, 344): the crop at 341 keeps [260, 341) -> original [195, 256). Without the
# crop, 352 input columns map onto 256 and the object lands at [189, 250): IoU 0.82.
OBJ_C = (4, 1, 0, 3, 0.7, quarter_rect(40, 0, 20, 20))  # rows [120, 180), cols [0, 60)
EXPECTED = {1: ori_rect(30, 60, 60, 90), 2: ori_rect(90, 195, 90, 61), 3: ori_rect(120, 0, 60, 60)}


class TestPostProcess:
    def test_finds_constructed_objects(self, head):
        cate, ins = eval_preds([[OBJ_C, OBJ_A, OBJ_B]])
        scores, labels, masks = head.PostProcess(ins, cate, ORI)
        assert len(scores) == len(labels) == len(masks) == 1
        scores, labels, masks = scores[0], labels[0], masks[0]
        assert labels.tolist() == [1, 2, 3]
        # disjoint masks: no decay; maskness 0.97
        torch.testing.assert_close(scores, torch.tensor([0.9, 0.8, 0.7]) * INSIDE)
        assert masks.shape == (3, *ORI)
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        for label, mask in zip(labels.tolist(), masks):
            assert iou(mask, EXPECTED[label]) > 0.95, f"label {label}: IoU {iou(mask, EXPECTED[label]):.3f}"

    def test_right_edge_object_reaches_the_edge(self, head):
        # docs/handout-notes.md 15: the padding is cropped before resizing to the original frame
        cate, ins = eval_preds([[OBJ_B]])
        mask = head.PostProcess(ins, cate, ORI)[2][0][0]
        cols = mask.nonzero()[:, 1]
        assert cols.max().item() == ORI[1] - 1 and abs(cols.min().item() - 195) <= 1

    def test_keep_instance_and_pre_nms_caps(self, head):
        cate, ins = eval_preds([[OBJ_A, OBJ_B, OBJ_C]])
        scores, labels, masks = (x[0] for x in head.PostProcess(ins, cate, ORI, cfg=cfg(keep_instance=2)))
        assert labels.tolist() == [1, 2] and masks.shape == (2, *ORI)
        scores, labels, masks = (x[0] for x in head.PostProcess(ins, cate, ORI, cfg=cfg(pre_NMS_num=1)))
        assert labels.tolist() == [1]
        scores, labels, masks = (x[0] for x in head.PostProcess(ins, cate, ORI, cfg=cfg(pre_NMS_num=0)))
        assert len(scores) == len(labels) == 0 and masks.shape == (0, *ORI)

    def test_masks_not_larger_than_stride_dropped(self, head):
        # level 0 (stride 8): 2 x 4 = 8 px dropped, 3 x 3 = 9 px kept;
        # level 2 (stride 16): 4 x 4 = 16 px dropped, 3 x 6 = 18 px kept
        objects = [(0, 0, 0, 1, 0.9, quarter_rect(5, 5, 2, 4, 1.0, 0.0)),
                   (0, 0, 1, 2, 0.8, quarter_rect(5, 20, 3, 3, 1.0, 0.0)),
                   (2, 3, 3, 3, 0.7, quarter_rect(40, 40, 4, 4, 1.0, 0.0)),
                   (2, 3, 0, 1, 0.6, quarter_rect(40, 5, 3, 6, 1.0, 0.0))]
        cate, ins = eval_preds([objects])
        scores, labels, _ = (x[0] for x in head.PostProcess(ins, cate, ORI))
        assert labels.tolist() == [2, 1]
        torch.testing.assert_close(scores, torch.tensor([0.8, 0.6]))

    def test_maskness_scaling(self, head):
        # 20 x 10 px at 0.9 and 20 x 10 at 0.7 (mean 0.8), a 20 x 5 strip at exactly 0.5 (not above 0.5,
        # left out) and background 0.02: score = 0.8 (cate) * 0.8 = 0.64
        mask = torch.full(QUARTER, OUTSIDE)
        mask[10:30, 10:20], mask[10:30, 20:30], mask[10:30, 30:35] = 0.9, 0.7, 0.5
        cate, ins = eval_preds([[(1, 2, 2, 2, 0.8, mask)]])
        scores, labels, _ = (x[0] for x in head.PostProcess(ins, cate, ORI))
        assert labels.tolist() == [2]
        torch.testing.assert_close(scores, torch.tensor([0.64]))

    # two same-class masks with IoU 0.5: rows [10, 30), cols [10, 40) and [20, 50): 400 / 800.
    # gauss sigma 2: the second decays by exp(-2 * 0.25) = 0.60653 -> 0.5 * 0.60653 = 0.30327 (maskness 1)
    PAIR = [(0, 1, 1, 1, 0.9, quarter_rect(10, 10, 20, 30, 1.0, 0.0)),
            (0, 1, 2, 1, 0.5, quarter_rect(10, 20, 20, 30, 1.0, 0.0))]

    def test_update_thresh(self, head):
        cate, ins = eval_preds([self.PAIR])
        scores, _, _ = (x[0] for x in head.PostProcess(ins, cate, ORI, cfg=cfg(update_thresh=0.30)))
        torch.testing.assert_close(scores, torch.tensor([0.9, 0.5 * math.exp(-0.5)]))
        scores, _, masks = (x[0] for x in head.PostProcess(ins, cate, ORI, cfg=cfg(update_thresh=0.31)))
        torch.testing.assert_close(scores, torch.tensor([0.9]))
        assert masks.shape == (1, *ORI)

    def test_class_wise_vs_agnostic(self, head):
        pair = [self.PAIR[0], (*self.PAIR[1][:3], 3, *self.PAIR[1][4:])]  # second object now an animal
        cate, ins = eval_preds([pair])
        scores, labels, _ = (x[0] for x in head.PostProcess(ins, cate, ORI, cfg=cfg(class_wise=True)))
        assert labels.tolist() == [1, 3]
        torch.testing.assert_close(scores, torch.tensor([0.9, 0.5]))
        scores, labels, _ = (x[0] for x in head.PostProcess(ins, cate, ORI, cfg=cfg(class_wise=False)))
        assert labels.tolist() == [1, 3]
        torch.testing.assert_close(scores, torch.tensor([0.9, 0.5 * math.exp(-0.5)]))

    def test_only_candidates_that_can_make_the_pre_nms_best_have_their_masks_computed(self, head, monkeypatch):
        """Maskness is at most 1, so no candidate scores above its category score. pre_NMS_num 2: the masks of the
        best 3 (FIRST_SHARE 1.25 x 2, rounded up) by category score come first, 0.9, 0.85, 0.8 with maskness 0.55:
        scores 0.495, 0.4675, 0.44. Then those whose category score reaches the second best so far (0.4675): 0.7
        and 0.6, maskness 0.97, which take the top two. 0.3's mask is never computed. Computing every mask
        gives the same detections."""
        spans = [(0, 0), (0, 15), (0, 30), (0, 45), (20, 0), (20, 15)]  # disjoint 10 x 10 masks: no decay
        cates = [0.9, 0.85, 0.8, 0.7, 0.6, 0.3]
        objects = [(0, 1, k, 1, cate, quarter_rect(top, left, 10, 10, 0.55 if cate > 0.75 else INSIDE))
                   for k, ((top, left), cate) in enumerate(zip(spans, cates))]
        cate, ins = eval_preds([objects])
        computed = []
        monkeypatch.setattr(head, "cell_masks", lambda ins_pred_img, cell: computed.append(len(cell)) or
                            torch.cat(ins_pred_img)[cell])
        scores, labels, masks = (x[0] for x in head.PostProcess(ins, cate, ORI, cfg=cfg(pre_NMS_num=2)))
        assert computed == [3, 2]
        torch.testing.assert_close(scores, torch.tensor([0.7, 0.6]) * INSIDE)
        assert iou(masks[0], ori_rect(0, 135, 30, 30)) > 0.95 and iou(masks[1], ori_rect(60, 0, 30, 30)) > 0.95
        monkeypatch.setattr(solo_head, "FIRST_SHARE", 100)  # every mask in the first round
        computed.clear()
        every = [x[0] for x in head.PostProcess(ins, cate, ORI, cfg=cfg(pre_NMS_num=2))]
        assert computed == [6]
        assert torch.equal(every[0], scores) and torch.equal(every[1], labels) and torch.equal(every[2], masks)

    def test_candidates_are_all_computed_while_too_few_large_masks_score(self, head, monkeypatch):
        """Where fewer than pre_NMS_num of the first masks are larger than their level's stride, no score bounds
        the others: every remaining candidate's mask is computed. pre_NMS_num 1: the first 2 (1.25, rounded up)
        are both dropped, and the third, the only detection, follows."""
        objects = [(0, 1, 0, 1, 0.9, quarter_rect(0, 0, 2, 2)),  # 4 pixels, not above stride 8: dropped
                   (0, 1, 1, 2, 0.8, quarter_rect(0, 15, 2, 3)), (0, 1, 2, 3, 0.3, quarter_rect(0, 30, 10, 10))]
        cate, ins = eval_preds([objects])
        computed = []
        monkeypatch.setattr(head, "cell_masks", lambda ins_pred_img, cell: computed.append(len(cell)) or
                            torch.cat(ins_pred_img)[cell])
        scores, labels, _ = (x[0] for x in head.PostProcess(ins, cate, ORI, cfg=cfg(pre_NMS_num=1,
                                                                                     keep_instance=5)))
        assert computed == [2, 1] and labels.tolist() == [3]

    def test_a_mask_wholly_in_the_padding_is_no_detection(self, head):
        # quarter columns 86-87 are input columns 344-351, all padding (the image ends at 341)
        in_padding = (0, 1, 1, 2, 0.95, quarter_rect(10, 86, 20, 2, 1.0, 0.0))
        scores, labels, masks = (x[0] for x in head.PostProcess(*eval_preds([[OBJ_A, in_padding]])[::-1], ORI))
        assert labels.tolist() == [1] and masks.shape == (1, *ORI)

    def test_no_detection_gives_empty_tensors(self, head):
        cate, ins = eval_preds([[]], cate_background=0.1)  # everything below cate_thresh 0.2
        scores, labels, masks = (x[0] for x in head.PostProcess(ins, cate, ORI))
        assert scores.shape == (0,) and labels.shape == (0,) and masks.shape == (0, *ORI)
        assert labels.dtype == torch.int64

    def test_batch_with_one_empty_image(self, head):
        cate, ins = eval_preds([[], [OBJ_A, OBJ_C]])
        scores, labels, masks = head.PostProcess(ins, cate, ORI)
        assert [len(s) for s in scores] == [0, 2] and masks[0].shape == (0, *ORI)
        assert labels[1].tolist() == [1, 3] and masks[1].shape == (2, *ORI)
        assert iou(masks[1][1], EXPECTED[3]) > 0.95


# ------------------------------------------------------------------ plots: what the pictures show


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots save, kept for inspection (saving closes them; their artists stay readable)."""
    saved, real_save = [], solo_head.save_figure

    def save(fig, path):
        saved.append(fig)
        return real_save(fig, path)
    monkeypatch.setattr(solo_head, "save_figure", save)
    return saved


def rgb(color):
    return torch.tensor(plots.rgb(color))


@pytest.mark.parametrize("color_list", [HANDOUT_COLORS, list(CLASS_COLORS)], ids=["handout", "rgb"])
class TestPlots:
    def test_plot_gt_one_panel_per_level_with_the_positive_masks_in_the_class_colour(self, head, tmp_path,
                                                                                     color_list, figures):
        img = torch.zeros(1, 3, *INPUT)  # normalised input 0: the ImageNet mean colour once denormalised
        masks = torch.zeros(2, *INPUT)
        masks[0, 40:140, 60:200], masks[1, 150:180, 250:290] = 1, 1
        bbox = torch.tensor([[60.0, 40, 200, 140], [250, 150, 290, 180]])  # sqrt(wh) 118 and 35 at 256 px
        sizes = [(64, 88), (64, 88), (32, 44), (16, 22), (16, 22)]  # 2H_f x 2W_f at strides 8, 8, 16, 32, 32
        ins_pred_list = [torch.zeros(1, s * s, *size) for s, size in zip(GRIDS, sizes)]
        targets = head.target(ins_pred_list, [bbox], [torch.tensor([2, 1])], [masks])
        paths = head.PlotGT(*targets, color_list, img, save_prefix=str(tmp_path / "gt"))
        assert paths == [str(tmp_path / "gt_0.png")] and os.path.getsize(paths[0]) > 0
        (fig,) = figures
        assert len(fig.axes) == len(GRIDS)
        mean = denormalize(img)[0, :, 0, 0]
        for level, ax in enumerate(fig.axes):
            positives = int(targets[1][0][level].sum())
            assert ax.get_title() == f"level {level}: S={GRIDS[level]}, {positives} positive cells"
            shown = torch.tensor(ax.images[0].get_array())  # (H, W, 3) the overlay
            person = torch.isclose(shown, 0.5 * mean + 0.5 * rgb(color_list[1]), atol=1e-4).all(-1)
            vehicle = torch.isclose(shown, 0.5 * mean + 0.5 * rgb(color_list[0]), atol=1e-4).all(-1)
            has_person = targets[2][0][level].eq(2).any().item()  # the large object, label 2
            has_vehicle = targets[2][0][level].eq(1).any().item()
            assert person[90, 130].item() == has_person and vehicle[165, 270].item() == has_vehicle
            assert not (person | vehicle)[5, 5]  # the background is the image
        assert sum(int(targets[1][0][level].sum()) for level in range(len(GRIDS))) > 0

    def test_plot_infer_draws_each_kept_mask_in_its_class_colour_with_name_and_score(self, head, tmp_path,
                                                                                     color_list, figures):
        cate, ins = eval_preds([[OBJ_A, OBJ_B, OBJ_C], []])
        results = head.PostProcess(ins, cate, ORI)
        img = torch.full((2, 3, *ORI), 128, dtype=torch.uint8)  # grey 128 / 255
        paths = head.PlotInfer(*results, color_list, img, save_prefix=str(tmp_path / "infer"))
        assert paths == [str(tmp_path / "infer_0.png"), str(tmp_path / "infer_1.png")]
        grey = 128 / 255
        shown = torch.tensor(figures[0].axes[0].images[0].get_array())  # (ori_H, ori_W, 3)
        for label, mask in zip(results[1][0].tolist(), results[2][0]):
            blend = 0.5 * grey + 0.5 * rgb(color_list[label - 1])
            assert torch.isclose(shown[mask.bool()], blend, atol=1e-4).all(), f"label {label}"
        background = results[2][0].sum(0) == 0
        assert torch.isclose(shown[background], torch.tensor(grey), atol=1e-4).all()
        texts = sorted(t.get_text() for t in figures[0].axes[0].texts)
        assert texts == sorted(f"{CLASS_NAMES[label - 1]} {score:.2f}"
                               for score, label in zip(results[0][0].tolist(), results[1][0].tolist()))
        assert len(texts) == 3
        # the second image has no detection: the picture is the image alone, without labels
        assert not figures[1].axes[0].texts
        assert torch.isclose(torch.tensor(figures[1].axes[0].images[0].get_array()), torch.tensor(grey),
                             atol=1e-4).all()

    def test_plot_infer_leaves_out_a_detection_below_the_score_threshold_or_without_pixels(self, head, tmp_path,
                                                                                           color_list, figures):
        # a kept detection whose mask is empty in the original frame (e.g. predicted inside the padding only)
        masks = torch.zeros(3, *ORI)
        masks[0, 10:50, 10:50] = 1
        masks[2, 100:120, 100:120] = 1
        head.PlotInfer([torch.tensor([0.9, 0.8, 0.2])], [torch.tensor([1, 2, 3])], [masks], color_list,
                       torch.full((1, 3, *ORI), 0.5), save_prefix=str(tmp_path / "infer"), score_thresh=0.3)
        ax = figures[0].axes[0]
        assert [t.get_text() for t in ax.texts] == ["vehicle 0.90"]
        shown = torch.tensor(ax.images[0].get_array())
        assert torch.isclose(shown[110, 110], torch.tensor(0.5), atol=1e-4).all()  # 0.2 < 0.3: not drawn


# ------------------------------------------------------------------ candidate-first inference


def reference_masks_to_original(masks, ori_size):
    """The authors' three steps on full-size tensors: upsample to the padded input, crop, resize."""
    height, width = 4 * masks.shape[-2], 4 * masks.shape[-1]
    crop_w = int(height * ori_size[1] / ori_size[0])
    full = F.interpolate(masks[None], size=(height, width), mode="bilinear", align_corners=False)
    return F.interpolate(full[:, :, :, :crop_w], size=ori_size, mode="bilinear", align_corners=False)[0]


class TestMasksToOriginal:
    def test_row_and_column_matrices_compose_the_two_resizes(self):
        torch.manual_seed(0)
        masks = torch.rand(3, *QUARTER)
        rows = resize_matrix(QUARTER[0], INPUT[0], INPUT[0], ORI[0])  # (192, 64)
        cols = resize_matrix(QUARTER[1], INPUT[1], 341, ORI[1])  # (256, 88): 341 = int(256 * 256 / 192)
        assert rows.shape == (ORI[0], QUARTER[0]) and cols.shape == (ORI[1], QUARTER[1])
        torch.testing.assert_close(rows @ masks @ cols.T, reference_masks_to_original(masks, ORI),
                                   rtol=0, atol=1e-6)

    def test_thresholded_like_the_three_steps(self):
        torch.manual_seed(1)
        masks = F.interpolate(torch.rand(1, 8, 8, 11), size=QUARTER, mode="bilinear")[0]  # smooth, many edges
        reference = reference_masks_to_original(masks, ORI)
        out = masks_to_original(masks, ORI)
        differ = out != (reference > 0.5)
        assert ((reference - 0.5).abs()[differ] < 1e-5).all()  # only float rounding at exactly 0.5 may differ
        assert differ.sum() <= 2 and out.shape == (8, *ORI)

    def test_full_precision_under_autocast(self):
        # inference may run under torch.autocast (bfloat16): the resize and its 0.5 threshold stay in float32
        torch.manual_seed(1)
        masks = F.interpolate(torch.rand(1, 8, 8, 11), size=QUARTER, mode="bilinear")[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = masks_to_original(masks, ORI)
        assert torch.equal(out, masks_to_original(masks, ORI))

    def test_edges_corners_single_pixels_and_empty_masks(self):
        # objects at the borders, a lone pixel, a mask with no pixel above 0.5 and one with every pixel above it
        masks = torch.full((7, *QUARTER), 0.1)
        masks[0, 0, 0] = masks[1, -1, -1] = masks[2, 0, -1] = masks[3, 30, 40] = 0.95
        masks[4, :, 80:] = 0.9  # against the right edge, partly in the padding
        masks[6] = 0.8  # masks[5] stays below 0.5 everywhere
        out = masks_to_original(masks, ORI)
        assert torch.equal(out, reference_masks_to_original(masks, ORI) > 0.5)
        assert not out[5].any() and out[6].all() and out[0, 0, 0] == 1 and out[3].sum() > 0

    def test_no_mask(self):
        assert masks_to_original(torch.zeros(0, *QUARTER), ORI).shape == (0, *ORI)


# ------------------------------------------------------------------ the GPU's masks_to_original, run on the CPU


@pytest.fixture
def batched_branch(monkeypatch):
    """mask_ops.masks_to_original as on a GPU, on the CPU: the masks report cuda:0, resize_matrix builds on the
    CPU whatever device it is given (and records it), and the CPU path's box search must not run for them."""
    devices = []
    real_resize_matrix = mask_ops.resize_matrix

    def resize_matrix(size_in, size_up, crop, size_out, device=None):
        devices.append(device)
        return real_resize_matrix(size_in, size_up, crop, size_out)

    real_resize_boxes, batched = mask_ops.resize_boxes, []

    def resize_boxes(*args):
        assert not batched, "the CPU path ran"
        return real_resize_boxes(*args)
    monkeypatch.setattr(mask_ops, "resize_matrix", resize_matrix)
    monkeypatch.setattr(mask_ops, "resize_boxes", resize_boxes)

    def run(masks, ori_size):
        batched.append(True)
        try:
            out = masks_to_original(masks.as_subclass(ReportsCuda), ori_size)
        finally:
            batched.pop()
        return out.as_subclass(torch.Tensor)
    run.devices = devices
    return run


class TestBatchedMasksToOriginal:

    def test_equals_the_cpu_path_and_the_three_steps(self, batched_branch):
        torch.manual_seed(1)
        masks = F.interpolate(torch.rand(1, 10, 6, 8), size=QUARTER, mode="bilinear")[0]  # smooth, many edges
        masks[0] = 0.1  # no pixel above 0.5
        masks[1, :, -10:] = 0.9  # against the right edge, partly in the padding
        cpu = masks_to_original(masks, ORI)
        out = batched_branch(masks, ORI)
        assert out.shape == (10, *ORI) and out.dtype == torch.bool
        reference = reference_masks_to_original(masks, ORI)
        differ = (out != cpu) | (out != (reference > 0.5))
        assert ((reference - 0.5).abs()[differ] < 1e-5).all()  # only float rounding at exactly 0.5 may differ
        assert differ.sum() <= 2 and not out[0].any() and out[1].any()

    def test_the_resize_matrices_are_built_on_the_masks_device(self, batched_branch):
        batched_branch(torch.rand(2, *QUARTER), ORI)
        assert batched_branch.devices == [torch.device("cuda", 0)] * 2

    def test_no_mask(self, batched_branch):
        assert batched_branch(torch.zeros(0, *QUARTER), ORI).shape == (0, *ORI)

    def test_float32_under_autocast(self, batched_branch):
        masks = F.interpolate(torch.rand(1, 4, 6, 8, generator=torch.Generator().manual_seed(2)), size=QUARTER,
                              mode="bilinear")[0]
        expected = batched_branch(masks, ORI)
        with torch.autocast("cpu", dtype=torch.float16):
            assert torch.equal(batched_branch(masks, ORI), expected)


@pytest.fixture(scope="module")
def model_with_candidates():
    """A small SOLO with xavier weights and a category bias that puts about 100 (cell, class) pairs of a random
    input above POSTPROCESS_MAP's threshold, with masks large enough to survive the area filter."""
    from model import build_model

    torch.manual_seed(0)
    model = build_model(dict(backbone="resnet18", backbone_weights="none", seg_feat_channels=32,
                             stacked_convs=1, num_grids=GRIDS, init="xavier")).eval()
    torch.nn.init.constant_(model.head.cate_out.bias, -2.5)
    return model, torch.randn(2, 3, *INPUT)


class TestInfer:
    """SOLO.infer = forward(eval=True) + PostProcess, the masks of the candidate cells computed by cell_masks."""

    @pytest.mark.parametrize("post_cfg", [POSTPROCESS_MAP, POSTPROCESS_HANDOUT], ids=["map", "handout"])
    def test_detections_are_sorted_binary_masks_in_the_original_frame(self, model_with_candidates, post_cfg):
        model, img = model_with_candidates
        with torch.no_grad():
            cate, _ = model(img, eval=True)
        assert sum(int((c > post_cfg["cate_thresh"]).sum()) for c in cate) > 50  # a real workload
        scores, labels, masks = model.infer(img, ORI, cfg=post_cfg)
        for b in range(2):
            assert 3 <= len(scores[b]) <= post_cfg["keep_instance"]
            assert (scores[b][:-1] >= scores[b][1:]).all() and (scores[b] >= post_cfg["update_thresh"]).all()
            assert labels[b].dtype == torch.int64 and set(labels[b].tolist()) <= {1, 2, 3}
            assert masks[b].shape == (len(scores[b]), *ORI) and masks[b].dtype == torch.bool
            assert masks[b].flatten(1).any(1).all()

    def test_the_candidates_masks_are_those_of_every_cell(self, model_with_candidates):
        """PostProcess computes the masks of the candidate cells only; post-processing every cell's mask (a
        GivenMasksHead fed all S^2 masks of each level) gives the same detections, up to float rounding (a
        k-channel and an S^2-channel 1x1 convolution may sum in another order)."""
        model, img = model_with_candidates
        dense_head = GivenMasksHead(num_grids=GRIDS, seg_feat_channels=32, stacked_convs=1)
        with torch.no_grad():
            cate, feats = model(img, eval=True)
            starts = [0] + [sum(s * s for s in GRIDS[:i + 1]) for i in range(len(GRIDS))]
            every = [torch.stack([model.head.cell_masks([f[b] for f in feats], torch.arange(sum(s * s for s in GRIDS)))
                                  for b in range(2)])[:, starts[level]:starts[level + 1]] for level in range(5)]
            dense = dense_head.PostProcess(every, cate, ORI, cfg=POSTPROCESS_MAP)
            fast = model.head.PostProcess(feats, cate, ORI, cfg=POSTPROCESS_MAP)
        for b in range(2):
            torch.testing.assert_close(fast[0][b], dense[0][b])
            assert torch.equal(fast[1][b], dense[1][b]) and fast[2][b].shape == dense[2][b].shape
            assert (fast[2][b] != dense[2][b]).float().mean() < 1e-4

    def test_the_candidates_left_out_could_not_change_the_detections(self, model_with_candidates, monkeypatch):
        """With pre_NMS_num below the number of candidates, the masks of some are never computed
        (scored_candidates); SOLO's masks on the CPU (TiledMasks, in two rounds) give the detections of every
        candidate's mask."""
        model, img = model_with_candidates
        post_cfg = dict(POSTPROCESS_MAP, pre_NMS_num=20, keep_instance=10)
        computed, real = [], mask_ops.TiledMasks.add

        def add(masks, levels):
            computed.append(sum(len(ids) for ids, _ in levels))
            return real(masks, levels)
        monkeypatch.setattr(mask_ops.TiledMasks, "add", add)
        with torch.no_grad():
            cate, feats = model(img, eval=True)
            some = model.head.PostProcess(feats, cate, ORI, cfg=post_cfg)
            monkeypatch.setattr(solo_head, "FIRST_SHARE", 100)
            every = model.head.PostProcess(feats, cate, ORI, cfg=post_cfg)
        candidates = [int((c[b] > post_cfg["cate_thresh"]).sum()) for b in range(2) for c in [torch.cat(
            [c.flatten(1) for c in cate], 1)]]
        first, second = computed[0:4:2], computed[1:4:2]  # per image; then every mask, one round per image
        assert first == [25, 25] and all(n > 0 for n in second) and computed[4:] == candidates
        assert all(f + s < c for f, s, c in zip(first, second, candidates))  # some masks never computed
        for b in range(2):
            torch.testing.assert_close(some[0][b], every[0][b], rtol=1e-6, atol=1e-7)
            assert torch.equal(some[1][b], every[1][b]) and (some[2][b] != every[2][b]).float().mean() < 1e-5

    @pytest.mark.parametrize("none_left", [dict(cate_thresh=1.0), dict(update_thresh=1.0)], ids=["candidates", "kept"])
    def test_no_candidate_or_none_kept_gives_empty_tensors(self, model_with_candidates, none_left):
        model, img = model_with_candidates
        scores, labels, masks = model.infer(img, ORI, cfg={**POSTPROCESS_MAP, **none_left})
        assert [s.shape for s in scores] == [(0,), (0,)] and [m.shape for m in masks] == [(0, *ORI)] * 2
        assert labels[0].dtype == torch.int64


class TestMaskIntersections:
    @pytest.mark.parametrize("n", [0, 1, 5, 40])
    def test_exact_pixel_counts_of_every_pair(self, n):
        torch.manual_seed(n)
        masks = torch.rand(n, 30, 44) > torch.rand(n, 1, 1)  # coverages from 0 to 100 %
        flat = masks.flatten(1).double()
        expected = (flat @ flat.T).float()  # float64 sums: exact
        assert torch.equal(mask_intersections(masks), expected)
        assert torch.equal(mask_intersections(masks.float()), expected)  # {0, 1} floats as well as bools

    @pytest.mark.parametrize("labelled", [False, True])
    def test_object_sized_masks_are_counted_tile_by_tile_exactly(self, labelled):
        """Small masks (one on a tile border, one empty, one covering the whole image among them) take the
        CPU's tiled path: a product per tile the masks reach, the counts as exact as the one product's."""
        g = torch.Generator().manual_seed(5)
        masks = torch.zeros(60, 200, 272, dtype=torch.bool)  # the stride-4 map of 800 x 1088
        for k in range(57):
            y, x = int(torch.randint(0, 180, (), generator=g)), int(torch.randint(0, 250, (), generator=g))
            h, w = (int(v) for v in torch.randint(2, 30, (2,), generator=g))
            region = masks[k, y:y + h, x:x + w]  # a view, clipped at the image's edges
            region[:] = torch.rand(region.shape, generator=g) > 0.2
        masks[57, 20:30, 30:40] = True  # x 34 is the border of tiles 0 and 1 (272 / 8)
        masks[59] = True  # masks[58] stays empty
        labels = torch.randint(1, 4, (60,), generator=g) if labelled else None
        flat = masks.flatten(1).double()
        expected = flat @ flat.T
        if labelled:
            expected = expected * (labels[:, None] == labels[None, :])

        class Products(TorchFunctionMode):
            count = 0

            def __torch_function__(self, func, types, args=(), kwargs=None):
                Products.count += getattr(func, "__name__", "") in ("matmul", "__matmul__")
                return func(*args, **(kwargs or {}))
        with Products():
            out = mask_intersections(masks, labels)
        assert torch.equal(out, expected.float())
        assert Products.count > 3  # tile by tile, not one product per label

    @pytest.mark.parametrize("n", [0, 1, 40])
    def test_with_labels_only_pairs_of_one_label(self, n):
        """Class-wise Matrix NMS reads only the pairs of one class: with labels the other entries are 0."""
        torch.manual_seed(n)
        masks = torch.rand(n, 30, 44) > torch.rand(n, 1, 1)
        labels = torch.randint(1, 4, (n,))
        flat = masks.flatten(1).double()
        expected = ((flat @ flat.T) * (labels[:, None] == labels[None, :])).float()
        assert torch.equal(mask_intersections(masks, labels), expected)


# ------------------------------------------------------------------ SOLO's candidate masks held tile by tile
TILED_INPUT = (320, 448)  # padded input: levels of 40 x 56 (stride 8, twice), 20 x 28, 10 x 14 (twice)
TILED_QUARTER = (80, 112)


def solo_level_logits(seed, k=24):
    """[(ids, logits (k_l, h, w))] of SOLO's five levels: soft blobs of logit up to ~8 (some across a tile border
    or against the image's edges), plus a mask with no positive logit, one positive everywhere and one of noise
    in each level."""
    g = torch.Generator().manual_seed(seed)
    levels, start = [], 0
    for stride in (8, 8, 16, 32, 32):
        h, w = TILED_INPUT[0] // stride, TILED_INPUT[1] // stride
        ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
        cy, cx = torch.rand(k, 1, 1, generator=g) * h, torch.rand(k, 1, 1, generator=g) * w
        cy[0], cx[0] = 0, w - 1  # a corner
        radius = 1 + torch.rand(k, 1, 1, generator=g) * h / 3
        logits = 8 * (radius - ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()) / radius  # (k, h, w)
        logits[1] = -3  # no pixel above any threshold
        logits[2] = 3  # every pixel above 0.5
        logits[3] = 4 * torch.randn(h, w, generator=g)  # noise: every tile
        levels.append((torch.arange(start, start + k), logits))
        start += k
    return levels


def dense_probabilities(levels, size):
    """SOLOHead.cell_masks' dense way: each level's logits upsampled x2, sigmoid, resized to size."""
    masks = []
    for _, logits in levels:
        probs = F.interpolate(logits[None], scale_factor=2, mode="bilinear", align_corners=False).sigmoid()
        masks.append(F.interpolate(probs, size=size, mode="bilinear", align_corners=False)[0])
    return torch.cat(masks)


class TestTiledMasks:
    """SOLO's candidate masks on the CPU (mask_ops.TiledMasks) hold the probabilities of its dense cell masks only
    in the tiles where they can exceed the threshold: the maskness sums, the binary masks' intersections and the
    chosen masks' probabilities and their masks in the original frame are the dense ones', up to float rounding
    (a pixel or two may fall on the other side of a threshold, its probability within 1e-6 of it)."""

    @pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7])
    @pytest.mark.parametrize("tile", [16, 64, 1000])
    def test_the_same_sums_intersections_and_probabilities_as_the_dense_masks(self, thresh, tile):
        levels = solo_level_logits(seed=int(10 * thresh) + tile)
        dense = mask_ops.DenseMasks(dense_probabilities(levels, TILED_QUARTER), thresh)
        tiled = mask_ops.TiledMasks(levels, TILED_QUARTER, thresh, tile=tile)
        assert (tiled.area - dense.area).abs().max() <= 1
        torch.testing.assert_close(tiled.mass, dense.mass, rtol=1e-5, atol=1.0)
        assert tiled.area[1::24].eq(0).all() and tiled.area[2::24].eq(TILED_QUARTER[0] * TILED_QUARTER[1]).all()
        idx = torch.randperm(120, generator=torch.Generator().manual_seed(tile))[:70]
        inter = tiled.intersections(idx)
        assert (inter - dense.intersections(idx)).abs().max() <= 1
        assert torch.equal(inter.diagonal(), tiled.area[idx])
        torch.testing.assert_close(tiled.probabilities(idx[:20]), dense.probabilities(idx[:20]), rtol=0, atol=1e-6)
        for ori, scaled in (((240, 336), None), ((200, 250), (250, 313))):  # the handout's frame, mmdetection's
            original = tiled.to_original(idx[:30], ori, scaled)
            assert original.dtype == torch.bool and original.shape == (30, *ori)
            assert (original != masks_to_original(dense.probabilities(idx[:30]), ori, scaled)).sum() <= 2

    def test_candidates_added_later_are_held_as_if_given_together(self):
        """add() takes more candidates (ids 0..k'-1 of their own) after the ones held: the sums, intersections,
        probabilities and masks in the original frame are those of all given at once (up to float rounding)."""
        levels = solo_level_logits(seed=9)
        first = [(torch.arange(10) + 10 * level, logits[:10]) for level, (_, logits) in enumerate(levels)]  # 0..49
        later = [(torch.arange(14) + 14 * level, logits[10:]) for level, (_, logits) in enumerate(levels)]
        tiled = mask_ops.TiledMasks(first, TILED_QUARTER, 0.5, tile=16)
        tiled.add(later)  # 70 more: ids 50..119
        order = torch.cat([ids[:10] for ids, _ in levels] + [ids[10:] for ids, _ in levels])  # held -> together
        together = mask_ops.TiledMasks(levels, TILED_QUARTER, 0.5, tile=16)
        assert tiled.count == 120 and (tiled.area - together.area[order]).abs().max() <= 1
        torch.testing.assert_close(tiled.mass, together.mass[order], rtol=1e-5, atol=1.0)
        idx = torch.randperm(120, generator=torch.Generator().manual_seed(9))[:70]
        assert (tiled.intersections(idx) - together.intersections(order[idx])).abs().max() <= 1
        torch.testing.assert_close(tiled.probabilities(idx[:20]), together.probabilities(order[idx[:20]]),
                                   rtol=0, atol=1e-6)
        assert (tiled.to_original(idx[:30], (240, 336)) != together.to_original(order[idx[:30]], (240, 336))
                ).sum() <= 2
        probs = dense_probabilities(levels, TILED_QUARTER)
        dense = mask_ops.DenseMasks(probs[:60], 0.5)
        dense.add(probs[60:])
        whole = mask_ops.DenseMasks(probs, 0.5)
        assert all(torch.equal(getattr(dense, name), getattr(whole, name)) for name in ("mass", "area", "probs"))
        assert torch.equal(dense.intersections(idx), whole.intersections(idx))

    def test_resize_matrices_built_under_inference_mode_serve_autograd(self):
        """The chains' and the original frame's resize matrices are built once per size and kept: built under
        torch.inference_mode, they still serve a later call with autograd on (an inference tensor cannot be saved
        for backward)."""
        mask_ops.mask_chain.cache_clear()
        mask_ops._original_resizes.cache_clear()
        levels = solo_level_logits(seed=10)
        with torch.inference_mode():
            quiet = mask_ops.TiledMasks(levels, TILED_QUARTER, 0.5)
            quiet_original = quiet.to_original(torch.arange(30), (240, 336))
        tracked = mask_ops.TiledMasks([(ids, logits.clone().requires_grad_()) for ids, logits in levels],
                                      TILED_QUARTER, 0.5)
        assert tracked.mass.requires_grad and torch.equal(tracked.mass.detach(), quiet.mass)
        assert torch.equal(tracked.to_original(torch.arange(30), (240, 336)), quiet_original)

    def test_object_sized_masks_are_computed_in_a_few_tiles(self):
        levels = [(torch.arange(20 * level, 20 * level + 20), logits[4:])  # the blobs only
                  for level, (_, logits) in enumerate(solo_level_logits(seed=3))]
        tiled = mask_ops.TiledMasks(levels, TILED_QUARTER, 0.5, tile=16)
        pixels = sum(hard.numel() for pieces in tiled.pieces for _, hard in pieces)
        assert pixels < 0.4 * tiled.count * TILED_QUARTER[0] * TILED_QUARTER[1]

    def test_float32_from_bfloat16_logits_and_under_autocast(self):
        levels = [(ids, logits.bfloat16()) for ids, logits in solo_level_logits(seed=4)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tiled = mask_ops.TiledMasks(levels, TILED_QUARTER, 0.5)
            probs = tiled.probabilities(torch.arange(10))
        assert tiled.mass.dtype == probs.dtype == torch.float32
        as_float = mask_ops.TiledMasks([(ids, logits.float()) for ids, logits in levels], TILED_QUARTER, 0.5)
        assert torch.equal(tiled.mass, as_float.mass)

    def test_post_processing_on_the_cpu_takes_them_for_solo_only(self, head):
        feats = [torch.randn(32, h, w) for h, w in ((8, 11), (8, 11), (4, 6), (2, 3), (2, 3))]
        cell = torch.tensor([0, 5, 70, 130])
        small = SOLOHead(num_grids=GRIDS, seg_feat_channels=32, stacked_convs=1)
        assert isinstance(small.candidate_masks(feats, cell, 0.5), mask_ops.TiledMasks)
        assert isinstance(GivenMasksHead(num_grids=GRIDS).candidate_masks(
            [torch.rand(s * s, 16, 22) for s in GRIDS], cell, 0.5), mask_ops.DenseMasks)
        small.cell_masks = lambda ins_pred_img, cell: torch.rand(len(cell), 16, 22)  # a test's own masks
        assert isinstance(small.candidate_masks(feats, cell, 0.5), mask_ops.DenseMasks)

    def test_masks_over_most_tiles_are_computed_as_one_whole_frame_tile(self):
        g = torch.Generator().manual_seed(6)
        levels = [(ids, 4 * torch.randn(logits.shape, generator=g)) for ids, logits in solo_level_logits(seed=6)]
        tiled = mask_ops.TiledMasks(levels, TILED_QUARTER, 0.5, tile=16)
        dense = mask_ops.DenseMasks(dense_probabilities(levels, TILED_QUARTER), 0.5)
        assert len(tiled.pieces) == 1 and (tiled.area - dense.area).abs().max() <= 1

    @pytest.mark.parametrize("size_in, size_out", [(10, 20), (20, 80), (13, 40), (40, 13)])
    def test_a_resize_knows_which_sources_a_run_of_outputs_reads_and_which_outputs_read_a_run_of_sources(
            self, size_in, size_out):
        resize = mask_ops.Resize(mask_ops.linear_matrix(size_in, size_out))
        reads = resize.matrix > 0  # (out, in): output o reads source s
        for first in range(size_in):
            for last in range(first, size_in):
                readers = reads[:, first:last + 1].any(1).nonzero()[:, 0]  # the outputs reading first..last
                o0, o1 = resize.outputs(first, last)
                if len(readers):
                    assert (o0, o1) == (readers.min().item(), readers.max().item() + 1)
                else:  # sources that a downscale skips
                    assert o0 >= o1
        for o0 in range(size_out):
            read = reads[o0:o0 + 3].any(0).nonzero()[:, 0]  # the sources outputs o0..o0+2 read
            assert resize.sources(o0, min(o0 + 3, size_out)) == (read.min().item(), read.max().item() + 1)
        assert resize.outputs(size_in, -1)[0] >= resize.outputs(size_in, -1)[1]  # no source: no output

    def test_the_window_of_a_box_of_positive_logits_holds_every_pixel_above_one_half(self):
        """to_original resizes each kept mask over the window its box of logits above logit(0.5) reaches: every
        pixel above 0.5 of the dense probabilities lies in it, and the window is not much larger."""
        levels = solo_level_logits(seed=7)
        dense = dense_probabilities(levels, TILED_QUARTER) > 0.5  # (k, H/4, W/4)
        for ids, logits in levels:
            chain = mask_ops.MaskChain(logits.shape[-2:], TILED_QUARTER)
            for j, box in zip(ids.tolist(), mask_ops.mask_boxes(logits, -mask_ops.TiledMasks.MARGIN).tolist()):
                y0, y1, x0, x1 = chain.outputs(*box)
                inside = torch.zeros(TILED_QUARTER, dtype=torch.bool)
                inside[max(y0, 0):y1, max(x0, 0):x1] = True
                assert not (dense[j] & ~inside).any(), j
                if dense[j].any():
                    rows, cols = dense[j].any(1).nonzero()[:, 0], dense[j].any(0).nonzero()[:, 0]
                    margin = 2 * TILED_QUARTER[0] // logits.shape[-2]  # two of the level's pixels
                    assert y0 >= rows.min() - margin and y1 <= rows.max() + 1 + margin, j
                    assert x0 >= cols.min() - margin and x1 <= cols.max() + 1 + margin, j

    def test_cell_logits_read_a_channels_last_image_as_an_nchw_one(self):
        """A channels_last model's mask features give the same logits, each cell's map in one piece."""
        torch.manual_seed(8)
        small = SOLOHead(num_grids=GRIDS, seg_feat_channels=32, stacked_convs=1).eval()
        batch = [torch.randn(2, 32, h, w) for h, w in ((8, 11), (8, 11), (4, 6), (2, 3), (2, 3))]
        cell = torch.tensor([0, 5, 70, 130, 150])
        with torch.no_grad():
            nchw = small.cell_logits([level[1] for level in batch], cell)
            last = small.cell_logits([level.contiguous(memory_format=torch.channels_last)[1] for level in batch],
                                     cell)
        assert [ids.tolist() for ids, _ in last] == [ids.tolist() for ids, _ in nchw]
        for (_, a), (_, b) in zip(nchw, last):
            assert b.is_contiguous()
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
