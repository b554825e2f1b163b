"""Specification of the SOLO head's network (handout 6.1-6.4, 6.10.4; docs/handout-notes.md 2, 3, 10, 11) and of the
SOLO wrapper (backbone + head).

The backbone is replaced by random feature maps with its output contract: 5 maps of 256 channels at strides
4, 8, 16, 32 and the pool level, which torchvision's FPN makes with max_pool2d(kernel 1, stride 2) of P5, so its
size is ceil(P5 / 2) (13 x 17 for P5 25 x 34 at 800 x 1088).
"""
import math
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import SOLO
from solo_head import SOLOHead, coord_feat

NUM_GRIDS = (40, 36, 24, 16, 12)
KEYS = ("0", "1", "2", "3", "pool")


def fpn_sizes(height, width):
    """Backbone map sizes: H/s x W/s for s = 4, 8, 16, 32 (H, W multiples of 32), then ceil(P5 / 2)."""
    sizes = [(height // s, width // s) for s in (4, 8, 16, 32)]
    return sizes + [tuple(math.ceil(v / 2) for v in sizes[-1])]


def fpn_maps(height, width, bz=2, channels=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((key, torch.randn(bz, channels, *size, generator=g))
                       for key, size in zip(KEYS, fpn_sizes(height, width)))


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    return SOLOHead(num_classes=4)


# ---------------------------------------------------------------- forward (6.4)
class TestForward:
    @pytest.mark.parametrize("height, width", [(128, 160), (256, 352)])
    def test_output_shapes_and_ranges(self, height, width):
        """Training: cate (bz, C-1, S, S), ins (bz, S^2, 2H_f, 2W_f) with the NewFPN sizes H/8, H/8, H/16, H/32,
        H/32, i.e. ins at (H/4, W/4), (H/4, W/4), (H/8, W/8), (H/16, W/16), (H/16, W/16), probabilities strictly
        inside (0, 1). eval=True: cate (bz, S, S, C-1) = points_nms of the training output, channels last; ins
        (bz, c, H_f, W_f), the mask features, of which cell_masks makes any cell's mask at (H/4, W/4): for all S^2
        cells of levels 0 and 1 (already at H/4) they are the training masks. The sizes do not depend on the
        channel width, so a 32-channel head keeps this fast (the 256-channel layout is tested below)."""
        bz = 2
        torch.manual_seed(0)
        head = SOLOHead(num_classes=4, in_channels=32, seg_feat_channels=32)
        feats = fpn_maps(height, width, bz, channels=32)
        train_sizes = [(height // 4, width // 4)] * 2 + [(height // 8, width // 8)] + [(height // 16, width // 16)] * 2
        with torch.no_grad():
            cate, ins = head(feats)
            cate_ev, ins_ev = head(feats, eval=True)
        assert isinstance(cate, list) and isinstance(ins, list) and len(cate) == len(ins) == 5
        for level, (s, size) in enumerate(zip(NUM_GRIDS, train_sizes)):
            assert cate[level].shape == (bz, 3, s, s)
            assert ins[level].shape == (bz, s * s, *size)
            assert cate_ev[level].shape == (bz, s, s, 3)
            assert ins_ev[level].shape == (bz, 32, *(v // 2 for v in size))
            for p in (cate[level], ins[level]):
                assert (p > 0).all() and (p < 1).all()
            assert (cate_ev[level] >= 0).all() and (cate_ev[level] < 1).all()
            torch.testing.assert_close(cate_ev[level], SOLOHead.points_nms(cate[level]).permute(0, 2, 3, 1))
        for b in range(bz):
            masks = head.cell_masks([level[b] for level in ins_ev], torch.arange(sum(s * s for s in NUM_GRIDS)))
            assert masks.shape == (sum(s * s for s in NUM_GRIDS), height // 4, width // 4)
            torch.testing.assert_close(masks[:NUM_GRIDS[0] ** 2], ins[0][b])
            torch.testing.assert_close(masks[NUM_GRIDS[0] ** 2:sum(s * s for s in NUM_GRIDS[:2])], ins[1][b])

    def test_branch_inputs(self, head):
        """The mask tower's first conv sees the NewFPN level then the coordinate channels x, y (256 + 2); the
        category tower's first conv sees the level resized to S x S (cate_down_pos = 0)."""
        feats = fpn_maps(128, 160, bz=1)
        seen = {}
        hooks = [head.ins_convs[0].register_forward_pre_hook(lambda m, a: seen.setdefault("ins", []).append(a[0])),
                 head.cate_convs[0].register_forward_pre_hook(lambda m, a: seen.setdefault("cate", []).append(a[0]))]
        try:
            with torch.no_grad():
                head(feats)
        finally:
            for h in hooks:
                h.remove()
        new_fpn = head.NewFPN(feats)
        for level, s in enumerate(NUM_GRIDS):
            ins_in, cate_in = seen["ins"][level], seen["cate"][level]
            assert ins_in.shape[1] == 258
            torch.testing.assert_close(ins_in[:, :256], new_fpn[level])
            torch.testing.assert_close(ins_in[:, 256:], coord_feat(new_fpn[level]))
            assert cate_in.shape == (1, 256, s, s)


def test_cell_masks_follow_the_authors_upsampling_order(head):
    """A cell's mask at inference (docs/handout-notes.md 11, 17), as the authors compute it for all S^2 cells: the mask
    features upsampled x2, the level's 1x1 conv, the sigmoid, then the probabilities resized to (H/4, W/4).
    cell_masks computes the chosen channels only, at the feature resolution before the x2 upsampling (the two
    commute): the same masks up to float rounding. Upsampling the logits straight to H/4 and then taking the
    sigmoid differs (levels 2-4 are below stride 8)."""
    torch.manual_seed(0)
    small = SOLOHead(num_classes=4, in_channels=32, seg_feat_channels=32, stacked_convs=1, init="xavier").eval()
    feats = fpn_maps(128, 160, bz=1, channels=32)
    with torch.no_grad():
        _, ins_feats = small(feats, eval=True)
        feats_img = [f[0] for f in ins_feats]
        cells = torch.tensor([5, 300, 1600 + 1296 + 3, 1600 + 1296 + 576 + 255, 3871])  # levels 0, 0, 2, 3, 4
        got = small.cell_masks(feats_img, cells)
        starts = [0, 1600, 1600 + 1296, 1600 + 1296 + 576, 1600 + 1296 + 576 + 256]
        want, straight = [], []
        for cell in cells.tolist():
            level = max(i for i, s in enumerate(starts) if cell >= s)
            up = F.interpolate(feats_img[level][None], scale_factor=2, mode="bilinear", align_corners=False)
            logits = small.ins_out_list[level](up)[0, cell - starts[level]]  # (2H_f, 2W_f)
            want.append(F.interpolate(logits.sigmoid()[None, None], size=(32, 40), mode="bilinear",
                                      align_corners=False)[0, 0])
            direct = small.ins_out_list[level](feats_img[level][None])[:, cell - starts[level]][None]
            straight.append(F.interpolate(direct, size=(32, 40), mode="bilinear", align_corners=False)[0, 0].sigmoid())
    assert got.shape == (5, 32, 40)
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)
    assert (got[2:] - torch.stack(straight)[2:]).abs().max() > 1e-3  # the other order is not the same
    assert small.cell_masks(feats_img, torch.zeros(0, dtype=torch.long)).shape == (0, 32, 40)


# ---------------------------------------------------------------- NewFPN (6.2, note 10)
class TestNewFPN:
    @pytest.mark.parametrize("height, width", [(128, 160), (256, 352), (800, 1088)])
    def test_sizes(self, head, height, width):
        """Level 0 takes level 1's size, level 4 level 3's (at 800 x 1088: P6 13 x 17 -> 25 x 34, not x2 =
        26 x 34); levels 1-3 pass through unchanged. A dict (the backbone's) or a list are both accepted."""
        feats = fpn_maps(height, width, bz=1, channels=2)
        sizes = fpn_sizes(height, width)
        if height == 800:
            assert sizes[3] == (25, 34) and sizes[4] == (13, 17)
        for given in (feats, list(feats.values())):
            new = head.NewFPN(given)
            assert [tuple(f.shape[-2:]) for f in new] == [sizes[1], sizes[1], sizes[2], sizes[3], sizes[3]]
            for level in (1, 2, 3):
                assert torch.equal(new[level], feats[KEYS[level]])

    def test_level0_is_a_2x2_average(self, head):
        """Halving with bilinear, align_corners False: output pixel i samples input 2i + 0.5, the mean of
        pixels 2i and 2i + 1, so level 0 equals avg_pool2d(P2, 2). A constant last level stays constant."""
        feats = fpn_maps(128, 160, bz=1, channels=3)
        feats["pool"] = torch.full_like(feats["pool"], 7.0)
        new = head.NewFPN(feats)
        torch.testing.assert_close(new[0], F.avg_pool2d(feats["0"], 2))
        assert torch.equal(new[4], torch.full_like(new[4], 7.0))


def test_coord_feat_values():
    """Channel 0 is x = linspace(-1, 1, W) along the columns, channel 1 is y = linspace(-1, 1, H) along the rows;
    W = 4 gives -1, -1/3, 1/3, 1 and H = 3 gives -1, 0, 1."""
    c = coord_feat(torch.zeros(2, 5, 3, 4))
    assert c.shape == (2, 2, 3, 4)
    x = torch.tensor([-1, -1 / 3, 1 / 3, 1])
    y = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(c[:, 0], x.expand(2, 3, 4))
    torch.testing.assert_close(c[:, 1], y[:, None].expand(2, 3, 4))


# ---------------------------------------------------------------- layers and initialisation (6.1.2, 6.1.3, note 2)
class TestLayers:
    def test_layout(self, head):
        """Each tower: 7 x (3x3 conv pad 1 without bias, GroupNorm(32), ReLU); the mask tower starts at 256 + 2
        channels. cate_out: 3x3 conv pad 1 to C - 1 = 3 channels with bias; ins_out: one 1x1 conv per level to
        S^2 channels with bias. 7 + 7 + 1 + 5 = 20 convolutions, 14 GroupNorms."""
        for tower, first_in in ((head.cate_convs, 256), (head.ins_convs, 258)):
            assert len(tower) == 7
            for i, layer in enumerate(tower):
                conv, gn, relu = layer
                assert isinstance(conv, nn.Conv2d) and isinstance(gn, nn.GroupNorm) and isinstance(relu, nn.ReLU)
                assert conv.in_channels == (first_in if i == 0 else 256) and conv.out_channels == 256
                assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
                assert conv.bias is None
                assert gn.num_groups == 32 and gn.num_channels == 256
        out = head.cate_out
        assert (out.in_channels, out.out_channels, out.kernel_size, out.padding) == (256, 3, (3, 3), (1, 1))
        assert out.bias is not None
        assert len(head.ins_out_list) == 5
        for conv, s in zip(head.ins_out_list, NUM_GRIDS):
            assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (256, s * s, (1, 1))
            assert conv.bias is not None
        assert sum(isinstance(m, nn.Conv2d) for m in head.modules()) == 20
        assert sum(isinstance(m, nn.GroupNorm) for m in head.modules()) == 14

    def test_solo_init(self, head):
        """Default (authors'): conv weights normal(std 0.01), zero biases except cate_out's, -log(99), so a cell
        with no evidence has probability sigmoid(-log 99) = 1 / (1 + 99) = 0.01; on random features the mean
        initial category probability is close to 0.01."""
        torch.testing.assert_close(head.cate_out.bias, torch.full((3,), -math.log(99)))
        torch.testing.assert_close(torch.sigmoid(head.cate_out.bias), torch.full((3,), 0.01))
        for conv in [layer[0] for layer in head.ins_convs] + list(head.ins_out_list):
            assert abs(conv.weight.std().item() - 0.01) < 0.001
            if conv.bias is not None:
                assert not conv.bias.any()
        with torch.no_grad():
            cate, _ = head(fpn_maps(128, 160, bz=1))
        mean = torch.cat([c.flatten() for c in cate]).mean().item()
        assert 0.005 < mean < 0.02, mean

    def test_xavier_init(self):
        """init='xavier' (handout 6.1.3): xavier_uniform_ weights, bound sqrt(6 / (fan_in + fan_out)) =
        sqrt(6 / (2304 + 2304)) = 0.0361 for a 256 -> 256 3x3 conv, and every bias zero (cells start near 0.5)."""
        head = SOLOHead(num_classes=4, init="xavier")
        for m in head.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                assert not m.bias.any()
        w = head.cate_convs[3][0].weight
        bound = math.sqrt(6 / (2304 + 2304))
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound

    @pytest.mark.parametrize("kwargs, message", [
        (dict(init="kaiming"), r"init 'kaiming' must be one of \('solo', 'xavier'\)"),
        (dict(cate_loss_cfg=dict(gamma=2, alpha=0.25, weight=1, normalize="sum")), "cate_norm 'sum' must be one of"),
        (dict(with_deform=True), "deformable"),
        (dict(strides=(8, 8, 16, 32)), "one entry per FPN level"),
    ])
    def test_bad_settings_raise(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            SOLOHead(num_classes=4, **kwargs)


# ---------------------------------------------------------------- points_nms (6.10.4), MultiApply (6.3)
def reference_points_nms(heat):
    """Keep heat[b, c, i, j] iff it equals the max over rows i-1..i and columns j-1..j (clipped at the border)."""
    out = torch.zeros_like(heat)
    bz, ch, h, w = heat.shape
    for b in range(bz):
        for c in range(ch):
            for i in range(h):
                for j in range(w):
                    window = heat[b, c, max(i - 1, 0):i + 1, max(j - 1, 0):j + 1]
                    if heat[b, c, i, j] == window.max():
                        out[b, c, i, j] = heat[b, c, i, j]
    return out


class TestPointsNMS:
    @pytest.mark.parametrize("seed", [0, 1])
    def test_matches_loop_reference(self, seed):
        heat = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(seed))
        heat[0, 0, 2:4, 2:4] = 0.99  # a tie: equal neighbours are all kept
        torch.testing.assert_close(SOLOHead.points_nms(heat), reference_points_nms(heat), rtol=0, atol=0)

    def test_worked_values(self):
        """Per channel: in [[0.1, 0.9], [0.8, 0.2]] the 0.9 and (window of (1,0): 0.1, 0.8) the 0.8 survive,
        0.1 (corner, its own window) survives too, 0.2 is below 0.9 of its window and goes."""
        heat = torch.tensor([[0.1, 0.9], [0.8, 0.2]])[None, None].repeat(1, 2, 1, 1)
        heat[0, 1] = heat[0, 1].flip(-1)
        want = torch.tensor([[0.1, 0.9], [0.8, 0.0]])
        torch.testing.assert_close(SOLOHead.points_nms(heat)[0, 0], want)
        # channel 1 is [[0.9, 0.1], [0.2, 0.8]]: (0,1) 0.1 < 0.9 and (1,0) 0.2 < 0.9 go, (1,1) 0.8 < 0.9 goes
        torch.testing.assert_close(SOLOHead.points_nms(heat)[0, 1], torch.tensor([[0.9, 0.0], [0.0, 0.0]]))

    def test_kernel_must_be_2(self):
        with pytest.raises(ValueError, match="kernel must be 2"):
            SOLOHead.points_nms(torch.rand(1, 3, 4, 4), kernel=3)


def test_multi_apply_returns_tuple_of_lists(head):
    """func(a_i, b_i, **kwargs) for each i; results transposed into a tuple of lists (one list per output)."""
    out = head.MultiApply(lambda a, b, k=0: (a + b + k, a * b), [1, 2], [3, 4], k=1)
    assert out == ([5, 7], [3, 8]) and isinstance(out, tuple) and all(isinstance(x, list) for x in out)


# ---------------------------------------------------------------- SOLO wrapper
class FakeBackbone(nn.Module):
    """The backbone's contract (5 maps, strides 4..64, pool = max_pool(k 1, s 2) of P5) from one 1x1 conv and
    a BatchNorm; records whether gradients were enabled while it ran."""

    def __init__(self, channels, trainable):
        super().__init__()
        self.proj = nn.Conv2d(3, channels, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.requires_grad_(trainable)
        self.grad_enabled = None

    def forward(self, img):
        self.grad_enabled = torch.is_grad_enabled()
        x = self.bn(self.proj(img))
        maps = [F.avg_pool2d(x, s) for s in (4, 8, 16, 32)]
        maps.append(F.max_pool2d(maps[-1], 1, 2))
        return OrderedDict(zip(KEYS, maps))


def small_model(trainable):
    torch.manual_seed(0)
    head = SOLOHead(num_classes=4, in_channels=32, seg_feat_channels=32, stacked_convs=2)
    return SOLO(FakeBackbone(32, trainable), head)


class TestSOLO:
    def test_frozen_backbone(self):
        """A backbone with no trainable parameter stays in eval mode after model.train() (its BatchNorm running
        statistics do not move) and runs without a gradient graph; the head still trains."""
        model = small_model(trainable=False)
        assert model.backbone_frozen
        model.train()
        assert not model.backbone.training and model.head.training
        stats = model.backbone.bn.running_mean.clone()
        cate, ins = model(torch.randn(2, 3, 64, 96))
        assert model.backbone.grad_enabled is False
        assert torch.equal(model.backbone.bn.running_mean, stats)
        (sum(c.sum() for c in cate) + sum(i.sum() for i in ins)).backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        assert all(p.grad is not None for p in model.head.parameters())

    def test_trainable_backbone(self):
        """A trainable backbone follows model.train() / model.eval() and gets gradients."""
        model = small_model(trainable=True)
        assert not model.backbone_frozen
        model.train()
        assert model.backbone.training
        cate, ins = model(torch.randn(2, 3, 64, 96))
        assert model.backbone.grad_enabled is True
        (sum(c.sum() for c in cate) + sum(i.sum() for i in ins)).backward()
        assert all(p.grad is not None for p in model.backbone.parameters())
        model.eval()
        assert not model.backbone.training and not model.head.training

    def test_eval_output_shapes(self):
        """forward(eval=True): the category maps and each level's mask features (strides 8, 8, 16, 32, 32)."""
        model = small_model(trainable=False).eval()
        with torch.no_grad():
            cate, ins = model(torch.randn(1, 3, 64, 96), eval=True)
        assert [tuple(c.shape) for c in cate] == [(1, s, s, 3) for s in NUM_GRIDS]
        assert [tuple(i.shape) for i in ins] == [(1, 32, 8, 12)] * 2 + [(1, 32, 4, 6)] + [(1, 32, 2, 3)] * 2


# ---------------------------------------------------------------- mixed precision (main_train.py --amp)
def test_forward_target_and_loss_under_autocast():
    """Under autocast (bfloat16 on the CPU, as --amp uses where supported) forward gives low-precision mask
    probabilities but float32 category probabilities (the focal loss needs them), and target, loss and backward
    still give finite float32 losses and gradients."""
    torch.manual_seed(0)
    head = SOLOHead(num_classes=4, in_channels=32, seg_feat_channels=32, stacked_convs=2)
    feats = fpn_maps(128, 160, bz=2, channels=32)
    mask = torch.zeros(1, 128, 160)
    mask[0, 40:100, 50:120] = 1  # sqrt(70 * 60) = 64.8 at 128 px: 405 at 800, levels 2 and 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cate, ins = head(feats)
    assert ins[0].dtype == torch.bfloat16 and all(c.dtype == torch.float32 for c in cate)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(c.dtype == torch.float32 for c in head(feats, eval=True)[0])
    targets = head.target(ins, [torch.tensor([[50., 40, 120, 100]])] * 2, [torch.tensor([2])] * 2, [mask] * 2)
    cate_loss, mask_loss, total = head.loss(cate, ins, *targets)
    total.backward()
    assert total.dtype == torch.float32 and all(torch.isfinite(x) for x in (cate_loss, mask_loss, total))
    assert 0 < mask_loss < 1
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


# ---------------------------------------------------------------- python solo_head.py (handout 6.6, 6.7)
def test_main_plots_the_targets_of_synthetic_images_when_real_files_are_missing(tmp_path, capsys):
    import solo_head

    args = solo_head.get_args_parser().parse_args([
        "--data-dir", str(tmp_path / "nothing"), "--synthetic-dir", str(tmp_path / "synthetic"),
        "--synthetic-images", "4", "--num", "2", "--input-height", "128", "--backbone-weights", "none",
        "--out", str(tmp_path / "figures")])
    solo_head.main(args)
    assert sorted(os.listdir(tmp_path / "figures")) == ["gt_0.png", "gt_1.png"]
    assert "real data not found" in capsys.readouterr().out
