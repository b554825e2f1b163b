"""Specification of SOLOHead's training loss (handout 6.9, docs/handout-notes.md 1-4 and 16).

L = L_cate + 3 L_mask.
  L_mask: dice loss 1 - 2 sum(p q) / (sum p^2 + 1e-3 + sum q^2 + 1e-3), averaged over the positive channels
          (ins_ind_gts_list) of every level and image; 0 (not NaN) when there is no positive channel.
  L_cate: focal loss (alpha 0.25, gamma 2) summed over every (cell, class) entry of every level and image, divided
          by (number of positive cells + 1) (the authors', default) or averaged over entries (normalize='mean',
          the handout's). Channel d's target is (label == d + 1); label 0 is background.
Predictions are probabilities, as forward returns them. Values below are derived by hand in the comments.
"""
import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from solo_head import SOLOHead

GRIDS = (4, 3, 2, 2, 2)  # small grids: the loss does not care about the grid sizes
MASK_SIZES = ((8, 8), (8, 8), (4, 4), (2, 2), (2, 2))  # (2H_f, 2W_f) per level
C1 = 3  # C - 1 category channels


def make_head(**kwargs):
    return SOLOHead(num_grids=GRIDS, seg_feat_channels=32, stacked_convs=1, **kwargs)


@pytest.fixture(scope="module")
def head():
    return make_head()


def reference_dice(p, q, eps=1e-3):
    """Plain elementwise dice of two (H, W) maps: 1 - 2 sum(pq) / (sum p^2 + eps + sum q^2 + eps)."""
    inter = sum(float(a) * float(b) for a, b in zip(p.flatten(), q.flatten()))
    pp = sum(float(a) ** 2 for a in p.flatten())
    qq = sum(float(b) ** 2 for b in q.flatten())
    return 1 - 2 * inter / (pp + eps + qq + eps)


def one_hot_targets(labels):
    """(n,) labels 0..3 -> (n, 3) float targets, channel d = (label == d + 1)."""
    return torch.stack([(labels == d + 1) for d in range(C1)], 1).double()


def empty_targets(bz):
    """Lists over images of lists over levels, as target() returns them, with no positive cell."""
    ins_gts = [[torch.zeros(s * s, *size, dtype=torch.uint8) for s, size in zip(GRIDS, MASK_SIZES)]
               for _ in range(bz)]
    ins_ind = [[torch.zeros(s * s, dtype=torch.bool) for s in GRIDS] for _ in range(bz)]
    cate_gts = [[torch.zeros(s, s, dtype=torch.long) for s in GRIDS] for _ in range(bz)]
    return ins_gts, ins_ind, cate_gts


def make_targets(bz, positives):
    """positives: list of (image b, level l, row i, column j, label, mask (2H_f, 2W_f)); channel k = i * S + j."""
    ins_gts, ins_ind, cate_gts = empty_targets(bz)
    for b, level, i, j, label, mask in positives:
        k = i * GRIDS[level] + j
        ins_gts[b][level][k] = mask
        ins_ind[b][level][k] = True
        cate_gts[b][level][i, j] = label
    return ins_gts, ins_ind, cate_gts


def zero_preds(bz, dtype=torch.float32):
    cate = [torch.zeros(bz, C1, s, s, dtype=dtype) for s in GRIDS]
    ins = [torch.zeros(bz, s * s, *size, dtype=dtype) for s, size in zip(GRIDS, MASK_SIZES)]
    return cate, ins


def rect_mask(size, top, left, h, w):
    m = torch.zeros(size, dtype=torch.uint8)
    m[top:top + h, left:left + w] = 1
    return m


# two images, positives on several levels; the masks of one level are pairwise disjoint
POSITIVES = [
    (0, 0, 1, 2, 1, rect_mask((8, 8), 0, 0, 3, 4)),
    (0, 0, 2, 2, 1, rect_mask((8, 8), 4, 4, 2, 2)),
    (0, 2, 1, 0, 3, rect_mask((4, 4), 0, 0, 2, 2)),
    (1, 0, 3, 1, 2, rect_mask((8, 8), 5, 0, 3, 3)),
    (1, 1, 0, 2, 3, rect_mask((8, 8), 1, 1, 4, 5)),
    (1, 4, 1, 1, 1, rect_mask((2, 2), 0, 0, 1, 2)),
]


class TestDiceLoss:
    @pytest.mark.parametrize("seed", [0, 1])
    @pytest.mark.parametrize("shape", [(5, 6), (3, 5, 6), (2, 3, 4, 5)])
    def test_matches_elementwise_formula_on_batched_maps(self, seed, shape):
        g = torch.Generator().manual_seed(seed)
        p, q = torch.rand(shape, generator=g, dtype=torch.float64), torch.rand(shape, generator=g, dtype=torch.float64)
        out = SOLOHead.DiceLoss(p, q)
        assert out.shape == shape[:-2]
        expected = torch.tensor([reference_dice(a, b) for a, b in zip(p.reshape(-1, *shape[-2:]),
                                                                      q.reshape(-1, *shape[-2:]))],
                                dtype=torch.float64).reshape(shape[:-2])
        torch.testing.assert_close(out, expected)

    def test_identical_binary_masks_give_almost_zero(self):
        # area a = 10: 1 - 2a / (a + 1e-3 + a + 1e-3) = 0.002 / (20.002) = 9.999e-5
        m = rect_mask((6, 6), 1, 1, 2, 5).double()  # float64: 1 - 0.9999 loses digits in float32
        assert SOLOHead.DiceLoss(m, m).item() == pytest.approx(0.002 / 20.002, rel=1e-4)

    def test_disjoint_masks_give_one(self):
        a, b = rect_mask((6, 6), 0, 0, 2, 2).float(), rect_mask((6, 6), 3, 3, 2, 2).float()
        assert SOLOHead.DiceLoss(a, b).item() == pytest.approx(1.0)

    def test_empty_prediction_and_target_finite_with_finite_grads(self):
        # 1 - 0 / (0 + 1e-3 + 0 + 1e-3) = 1: the epsilons keep 0 / 0 away
        p = torch.zeros(2, 4, 4, requires_grad=True)
        out = SOLOHead.DiceLoss(p, torch.zeros(2, 4, 4))
        assert torch.isfinite(out).all() and torch.allclose(out, torch.ones(2))
        (grad,) = torch.autograd.grad(out.sum(), p)
        assert torch.isfinite(grad).all()

    def test_gradcheck_float64(self):
        g = torch.Generator().manual_seed(0)
        p = (torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
        q = (torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
        assert torch.autograd.gradcheck(SOLOHead.DiceLoss, (p, q))


class TestFocalLoss:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_matches_torchvision_normalised_by_positives(self, head, dtype, seed):
        # torchvision's sigmoid_focal_loss takes logits: feed it logit(p), sum, divide by (n_pos + 1)
        g = torch.Generator().manual_seed(seed)
        preds = torch.rand(50, C1, generator=g, dtype=torch.float64) * 0.98 + 0.01
        gts = torch.randint(0, 4, (50,), generator=g)
        gts[:20] = 0  # plenty of background cells
        expected = sigmoid_focal_loss(torch.logit(preds), one_hot_targets(gts), alpha=0.25, gamma=2,
                                      reduction="sum") / ((gts > 0).sum() + 1)
        out = head.FocalLoss(preds.to(dtype), gts)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-7)

    def test_mean_normalisation_is_mean_over_entries(self):
        g = torch.Generator().manual_seed(3)
        preds = torch.rand(40, C1, generator=g, dtype=torch.float64) * 0.98 + 0.01
        gts = torch.randint(0, 4, (40,), generator=g)
        expected = sigmoid_focal_loss(torch.logit(preds), one_hot_targets(gts), alpha=0.25, gamma=2,
                                      reduction="mean")  # sum / (40 * 3)
        mean_head = make_head(cate_loss_cfg=dict(gamma=2, alpha=0.25, weight=1, normalize="mean"))
        torch.testing.assert_close(mean_head.FocalLoss(preds, gts), expected)

    def test_worked_two_cell_example(self, head):
        # cell 0: label 2 (target channel 1), p = [0.1, 0.8, 0.3]; cell 1: background, p = [0.2, 0.0, 0.9]
        #   negative: 0.75 p^2 (-ln(1 - p)); positive: 0.25 (1 - p)^2 (-ln p)
        #   (0,0) neg 0.1: 0.75 * 0.01 * 0.1053605 = 7.902e-4
        #   (0,1) pos 0.8: 0.25 * 0.04 * 0.2231436 = 2.2314e-3
        #   (0,2) neg 0.3: 0.75 * 0.09 * 0.3566749 = 0.0240756
        #   (1,0) neg 0.2: 0.75 * 0.04 * 0.2231436 = 6.6943e-3
        #   (1,1) neg 0.0: 0
        #   (1,2) neg 0.9: 0.75 * 0.81 * 2.3025851 = 1.3988204
        #   sum = 1.4326119; one positive cell -> / (1 + 1) = 0.7163060; mean over 6 entries = 0.2387687
        preds = torch.tensor([[0.1, 0.8, 0.3], [0.2, 0.0, 0.9]], dtype=torch.float64)
        gts = torch.tensor([2, 0])
        assert head.FocalLoss(preds, gts).item() == pytest.approx(0.7163060, rel=1e-6)
        mean_head = make_head(cate_loss_cfg=dict(gamma=2, alpha=0.25, weight=1, normalize="mean"))
        assert mean_head.FocalLoss(preds, gts).item() == pytest.approx(0.2387687, rel=1e-6)

    def test_one_hot_channel_d_is_label_d_plus_one(self, head):
        # a perfect prediction (p = 1 on channel label - 1, 0 elsewhere) costs exactly 0; the same probabilities
        # shifted by one channel cost a lot
        gts = torch.tensor([0, 1, 2, 3])
        perfect = one_hot_targets(gts)  # background row all zeros
        assert head.FocalLoss(perfect, gts).item() == 0
        shifted = perfect.roll(1, dims=1)
        assert head.FocalLoss(shifted, gts).item() > 1

    def test_gradcheck_float64(self, head):
        g = torch.Generator().manual_seed(0)
        preds = (torch.rand(6, C1, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
        gts = torch.tensor([0, 1, 2, 3, 0, 2])
        assert torch.autograd.gradcheck(lambda p: head.FocalLoss(p, gts), (preds,))

    def test_bad_normalize_raises(self):
        with pytest.raises(ValueError, match="cate_norm 'sum' must be one of \\('positives', 'mean'\\)"):
            make_head(cate_loss_cfg=dict(gamma=2, alpha=0.25, weight=1, normalize="sum"))


class TestGradientsAtSaturation:
    def test_finite_gradients_at_exactly_zero_and_one(self, head):
        # every combination of p in {0, 1} and target in {0, 1} for both terms (docs/handout-notes.md 3)
        gts = torch.tensor([0, 1, 2, 3])
        preds = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]],
                             requires_grad=True)
        (grad,) = torch.autograd.grad(head.FocalLoss(preds, gts), preds)
        assert torch.isfinite(grad).all()
        mask_pred = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
        (grad,) = torch.autograd.grad(SOLOHead.DiceLoss(mask_pred, torch.tensor([[1.0, 1.0], [0.0, 0.0]])),
                                      mask_pred)
        assert torch.isfinite(grad).all()

    def test_a_saturated_positive_keeps_the_gradient_of_the_loss_on_logits(self, head):
        # the category branch can push a positive cell's logit far below 0 at a high lr; the loss on its
        # probabilities must still pull it back as the authors' loss on logits does (torchvision's), or the cell
        # stays dead for the rest of training. Logits from -80 (p = 2e-35) to 8 (a negative at p = 0.9997).
        logits = torch.tensor([[-80.0, -3.0, -5.0], [-2.0, -40.0, -6.0], [-4.0, 1.0, -20.0], [8.0, -9.0, -1.0]],
                              requires_grad=True)
        gts = torch.tensor([1, 2, 3, 0])
        loss = head.FocalLoss(logits.sigmoid(), gts)  # float32, as the head's forward gives
        (grad,) = torch.autograd.grad(loss, logits)
        reference = sigmoid_focal_loss(logits.double(), one_hot_targets(gts), alpha=0.25, gamma=2,
                                       reduction="sum") / ((gts > 0).sum() + 1)
        (reference_grad,) = torch.autograd.grad(reference, logits)
        torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad, reference_grad.float(), rtol=1e-3, atol=1e-7)
        assert grad[0, 0] < -0.05  # the p = 2e-35 positive: about -alpha / (positives + 1)

    def test_finite_gradients_through_loss(self, head):
        ins_gts, ins_ind, cate_gts = make_targets(2, POSITIVES)
        cate, ins = zero_preds(2)
        g = torch.Generator().manual_seed(0)
        cate = [(torch.rand(c.shape, generator=g) > 0.5).float().requires_grad_() for c in cate]
        ins = [(torch.rand(m.shape, generator=g) > 0.5).float().requires_grad_() for m in ins]
        _, _, total = head.loss(cate, ins, ins_gts, ins_ind, cate_gts)
        grads = torch.autograd.grad(total, cate + ins)
        assert all(torch.isfinite(gr).all() for gr in grads)


class TestLoss:
    def reference(self, cate, ins, ins_gts, ins_ind, cate_gts):
        """Loop over images, levels and cells: pairs (cate_pred[b, :, i, j], cate_gts[b][l][i, j]) and the dice of
        every positive channel."""
        probs, labels, dices = [], [], []
        for b in range(len(cate_gts)):
            for level, s in enumerate(GRIDS):
                for i in range(s):
                    for j in range(s):
                        probs.append(cate[level][b, :, i, j])
                        labels.append(cate_gts[b][level][i, j])
                        if ins_ind[b][level][i * s + j]:
                            dices.append(reference_dice(ins[level][b, i * s + j], ins_gts[b][level][i * s + j]))
        probs, labels = torch.stack(probs).double(), torch.stack(labels)
        cate_loss = sigmoid_focal_loss(torch.logit(probs), one_hot_targets(labels), alpha=0.25, gamma=2,
                                       reduction="sum").item() / ((labels > 0).sum().item() + 1)
        return cate_loss, sum(dices) / len(dices)

    def test_total_is_cate_plus_three_mask_and_matches_loop_reference(self, head):
        ins_gts, ins_ind, cate_gts = make_targets(2, POSITIVES)
        g = torch.Generator().manual_seed(0)
        cate = [torch.rand(2, C1, s, s, generator=g) * 0.98 + 0.01 for s in GRIDS]
        ins = [torch.rand(2, s * s, *size, generator=g) for s, size in zip(GRIDS, MASK_SIZES)]
        cate_loss, mask_loss, total = head.loss(cate, ins, ins_gts, ins_ind, cate_gts)
        ref_cate, ref_mask = self.reference(cate, ins, ins_gts, ins_ind, cate_gts)
        assert cate_loss.item() == pytest.approx(ref_cate, rel=1e-5)
        assert mask_loss.item() == pytest.approx(ref_mask, rel=1e-5)
        assert total.item() == pytest.approx(cate_loss.item() + 3 * mask_loss.item(), rel=1e-6)

    def test_positive_channels_selected_across_levels_and_images(self, head):
        # predictions equal to the targets on every positive channel (random elsewhere, ignored) -> dice of
        # identical binary masks, at most 0.002 / (2 * area) <= 0.002 / 4 for the smallest mask (area 2);
        # the complement of the target on those channels shares no pixel -> exactly 1
        ins_gts, ins_ind, cate_gts = make_targets(2, POSITIVES)
        g = torch.Generator().manual_seed(1)
        ins = [torch.rand(2, s * s, *size, generator=g) for s, size in zip(GRIDS, MASK_SIZES)]
        flipped = [m.clone() for m in ins]
        for b, level, i, j, _, mask in POSITIVES:
            ins[level][b, i * GRIDS[level] + j] = mask.float()
            flipped[level][b, i * GRIDS[level] + j] = 1 - mask.float()
        cate, _ = zero_preds(2)
        _, mask_loss, _ = head.loss(cate, ins, ins_gts, ins_ind, cate_gts)
        assert 0 < mask_loss.item() < 5e-4
        _, mask_loss, _ = head.loss(cate, flipped, ins_gts, ins_ind, cate_gts)
        assert mask_loss.item() == pytest.approx(1.0)

    def test_masks_of_two_images_are_not_swapped(self, head):
        # one positive per image at the same channel, disjoint masks: right pairing ~0, swapped pairing 1
        a, b = rect_mask((8, 8), 0, 0, 3, 3), rect_mask((8, 8), 5, 5, 3, 3)
        ins_gts, ins_ind, cate_gts = make_targets(2, [(0, 0, 1, 1, 1, a), (1, 0, 1, 1, 2, b)])
        cate, ins = zero_preds(2)
        ins[0][0, 5], ins[0][1, 5] = a.float(), b.float()  # channel 1 * 4 + 1 = 5
        assert head.loss(cate, ins, ins_gts, ins_ind, cate_gts)[1].item() < 1e-3
        ins[0][0, 5], ins[0][1, 5] = b.float(), a.float()
        assert head.loss(cate, ins, ins_gts, ins_ind, cate_gts)[1].item() == pytest.approx(1.0)

    def test_no_positive_gives_zero_mask_loss_and_cate_gradients(self, head):
        ins_gts, ins_ind, cate_gts = empty_targets(2)
        g = torch.Generator().manual_seed(2)
        cate = [(torch.rand(2, C1, s, s, generator=g) * 0.5).requires_grad_() for s in GRIDS]
        ins = [torch.rand(2, s * s, *size, generator=g).requires_grad_() for s, size in zip(GRIDS, MASK_SIZES)]
        cate_loss, mask_loss, total = head.loss(cate, ins, ins_gts, ins_ind, cate_gts)
        assert mask_loss.item() == 0 and not torch.isnan(mask_loss)
        assert total.item() == pytest.approx(cate_loss.item())
        total.backward()
        for c in cate:
            assert c.grad is not None and torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0

    @pytest.mark.parametrize("moved", ["transposed", "other image", "other class"])
    def test_cate_pred_and_gts_share_the_cell_order(self, head, moved):
        # one positive cell (i, j) = (0, 2) on level 1 (S = 3) of image 1, label 3 (channel 2). Predicting p = 1
        # there and 0 everywhere else is exact: every entry costs 0, so cate_loss == 0. The same prediction at
        # (j, i), in image 0 or on channel 1 leaves the positive at p = 0 and a negative at p = 1: > 1.
        level, b, i, j, label = 1, 1, 0, 2, 3
        ins_gts, ins_ind, cate_gts = make_targets(2, [(b, level, i, j, label, rect_mask((8, 8), 0, 0, 2, 2))])
        cate, ins = zero_preds(2)
        cate[level][b, label - 1, i, j] = 1
        assert head.loss(cate, ins, ins_gts, ins_ind, cate_gts)[0].item() == 0
        cate, _ = zero_preds(2)
        where = {"transposed": (b, label - 1, j, i), "other image": (0, label - 1, i, j),
                 "other class": (b, label - 2, i, j)}[moved]
        cate[level][where] = 1
        assert head.loss(cate, ins, ins_gts, ins_ind, cate_gts)[0].item() > 1

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision_predictions_computed_in_float32(self, head, dtype):
        ins_gts, ins_ind, cate_gts = make_targets(2, POSITIVES)
        g = torch.Generator().manual_seed(4)
        cate = [(torch.rand(2, C1, s, s, generator=g) * 0.98 + 0.01).to(dtype) for s in GRIDS]
        ins = [torch.rand(2, s * s, *size, generator=g).to(dtype) for s, size in zip(GRIDS, MASK_SIZES)]
        out = head.loss(cate, ins, ins_gts, ins_ind, cate_gts)
        ref = head.loss([c.float() for c in cate], [m.float() for m in ins], ins_gts, ins_ind, cate_gts)
        for value, expected in zip(out, ref):
            assert value.dtype == torch.float32 and torch.isfinite(value)
            torch.testing.assert_close(value, expected)

    def test_half_precision_no_positive_is_zero_not_nan(self, head):
        # full-size maps hold far more than 65504 / 0.9 pixels: a float16 sum of them overflows to inf, and
        # inf * 0 is NaN. The zero mask loss must not come from such a sum.
        grids = (4, 3, 2, 2, 2)
        ins = [torch.full((2, s * s, 64, 64), 0.9, dtype=torch.float16, requires_grad=True) for s in grids]
        cate = [torch.full((2, C1, s, s), 0.01, dtype=torch.float16, requires_grad=True) for s in grids]
        ins_gts = [[torch.zeros(s * s, 64, 64, dtype=torch.uint8) for s in grids] for _ in range(2)]
        _, ins_ind, cate_gts = empty_targets(2)
        cate_loss, mask_loss, total = head.loss(cate, ins, ins_gts, ins_ind, cate_gts)
        assert mask_loss.item() == 0, f"mask_loss {mask_loss.item()} (dtype {mask_loss.dtype})"
        assert torch.isfinite(total)


class TestInit:
    def test_solo_init_starts_every_cell_at_probability_001(self):
        torch.manual_seed(0)
        head = SOLOHead(in_channels=32, seg_feat_channels=32, stacked_convs=2, num_grids=GRIDS)
        assert head.cate_out.bias.detach().sigmoid().sub(0.01).abs().max() < 1e-7  # bias -ln(99)
        feats = [torch.randn(1, 32, 64 // 2 ** k, 64 // 2 ** k) for k in range(5)]  # strides 4 .. 64
        with torch.no_grad():
            cate, _ = head(feats)
        probs = torch.cat([c.flatten() for c in cate])
        assert 0.005 < probs.min() and probs.max() < 0.02

    def test_focal_loss_at_probability_001_matches_hand_formula(self, head):
        # every entry p = 0.01. negative entry: 0.75 * 0.01^2 * (-ln 0.99) = 7.5378e-7
        #                      positive entry: 0.25 * 0.99^2 * (-ln 0.01) = 1.1283818
        # two images, sum S^2 = 16 + 9 + 4 + 4 + 4 = 37 cells each -> 2 * 37 * 3 = 222 entries; the 6 positive
        # cells of POSITIVES give 6 positive entries and 216 negative ones:
        # (6 * 1.1283818 + 216 * 7.5378e-7) / (6 + 1) = 0.96720
        ins_gts, ins_ind, cate_gts = make_targets(2, POSITIVES)
        cate = [torch.full((2, C1, s, s), 0.01) for s in GRIDS]
        _, ins = zero_preds(2)
        pos, neg = 0.25 * 0.99 ** 2 * -math.log(0.01), 0.75 * 0.01 ** 2 * -math.log(0.99)
        expected = (6 * pos + 216 * neg) / 7
        assert expected == pytest.approx(0.96720, rel=1e-4)
        assert head.loss(cate, ins, ins_gts, ins_ind, cate_gts)[0].item() == pytest.approx(expected, rel=1e-5)


class TestCompactTargets:
    def test_loss_and_gradients_equal_for_both_target_forms(self, head):
        # a 32 x 32 input (masks of 8 x 8 at level 0); squares of side 3, 6, 11 and 20 (scales 75 to 500 at
        # an 800-high input) reach every level; the second image has no object
        masks = torch.zeros(4, 32, 32)
        boxes = torch.tensor([[1.0, 1, 4, 4], [20, 2, 26, 8], [2, 18, 13, 29], [10, 10, 30, 30]])
        for m, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
            m[y1:y2, x1:x2] = 1
        bbox_list, label_list = [boxes, torch.zeros(0, 4)], [torch.tensor([1, 2, 3, 1]), torch.zeros(0).long()]
        mask_list = [masks, torch.zeros(0, 32, 32)]
        torch.manual_seed(0)
        logits = [torch.randn(2, C1, s, s) for s in GRIDS] + [torch.randn(2, s * s, *size)
                                                                for s, size in zip(GRIDS, MASK_SIZES)]
        results = []
        for compact in (False, True):
            leaves = [t.clone().requires_grad_() for t in logits]
            cate, ins = [t.sigmoid() for t in leaves[:5]], [t.sigmoid() for t in leaves[5:]]
            targets = head.target(ins, bbox_list, label_list, mask_list, compact=compact)
            losses = head.loss(cate, ins, *targets)
            losses[2].backward()
            results.append((losses, [t.grad for t in leaves], targets))
        (dense, dense_grads, targets), (compact, compact_grads, _) = results
        assert sum(bool(ind.any()) for ind in targets[1][0]) >= 4  # positive cells on at least 4 levels
        for a, b in zip(dense, compact):
            torch.testing.assert_close(a, b)
        for a, b in zip(dense_grads, compact_grads):
            torch.testing.assert_close(a, b)

    def test_no_object_in_the_batch_gives_zero_mask_loss_and_gradients_everywhere(self, head):
        cate = [torch.rand(2, C1, s, s, requires_grad=True) for s in GRIDS]
        ins = [torch.rand(2, s * s, *size, requires_grad=True) for s, size in zip(GRIDS, MASK_SIZES)]
        targets = head.target(ins, [torch.zeros(0, 4)] * 2, [torch.zeros(0).long()] * 2,
                              [torch.zeros(0, 32, 32)] * 2, compact=True)
        _, mask_loss, total = head.loss(cate, ins, *targets)
        total.backward()
        assert mask_loss.item() == 0
        # every level's mask output is in the graph: DDP finds a gradient for every parameter
        assert all(p.grad is not None and not p.grad.any() for p in ins)
