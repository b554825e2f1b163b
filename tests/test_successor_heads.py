"""Specification of the handout head's successors, Decoupled SOLO and SOLOv2 (solo_head.DecoupledSOLOHead and
SOLOv2Head, `--arch decoupled` / `--arch solov2`): their outputs, how each makes the mask of a grid cell, and that
they share SOLOHead's targets, losses and post-processing; then that every head trains, resumes and runs through
main_infer.py with the same commands.

The backbone is replaced by random feature maps with its output contract (test_solo_head_model.fpn_maps).
"""
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

import main_infer
import main_train
from conftest import parse_train
from bench_inputs import model_settings, shape_only_preds
from coco_eval import map_summary
from dataset import BuildDataLoader, BuildDataset
from decoupled_solo_head import DecoupledSOLOHead
from engine import evaluate_map, train_step
from model import ARCHS, HEADS, ModelConfig, build_model
from solo_head import POSTPROCESS_MAP, SOLOHead, coord_feat, image_of
from solov2_head import SOLOv2Head
from synthetic import write_synthetic_dataset
from test_solo_head_model import fpn_maps
from checkpoint import load_checkpoint
from errors import CheckpointError
from train_settings import DEMO, DEMO_ARCH_LR
from utils import build_optimizer, build_scheduler, seed_everything

GRIDS = (12, 10, 8, 6, 4)
SIZES = [(128, 160), (256, 352)]


def small_head(arch, **kwargs):
    """A head of every kind with 32-channel inputs and towers: the shapes do not depend on the widths."""
    extra = dict(mask_feat_channels=32) if arch == "solov2" else {}
    return HEADS[arch](num_classes=4, in_channels=32, seg_feat_channels=32, stacked_convs=1, num_grids=GRIDS,
                       **extra, **kwargs)


def scene(height, width):
    """One object per FPN level: squares whose sqrt(w * h) falls in one level's scale range at this input height
    (the ranges scale with it), each with its own centre, so that every level has positive cells."""
    scale = height / 800
    sides = [int(s * scale) for s in (40, 120, 250, 500, 780)]  # level 0 to 4 (ranges (1, 96) ... (384, 2048))
    corners = [(0, 0), (0, width - sides[1]), (height - sides[2], 0), (height - sides[3], width - sides[3]), (0, 0)]
    boxes, masks = torch.zeros(5, 4), torch.zeros(5, height, width, dtype=torch.uint8)
    for o, (side, (y, x)) in enumerate(zip(sides, corners)):
        masks[o, y:y + side, x:x + side] = 1
        boxes[o] = torch.tensor([x, y, x + side, y + side], dtype=torch.float)
    return boxes, torch.tensor([1, 2, 3, 1, 2]), masks


# ---------------------------------------------------------------- outputs
class TestOutputs:
    @pytest.mark.parametrize("height, width", SIZES)
    def test_decoupled_solo_gives_2s_maps_per_level_in_training_and_eval(self, height, width):
        """Decoupled SOLO: per level (bz, 2S, 2H_f, 2W_f), the S sigmoid(X_j) maps then the S sigmoid(Y_i), in both
        modes (S + S maps are cheap); the category branch is SOLO's."""
        torch.manual_seed(0)
        head = small_head("decoupled")
        feats = fpn_maps(height, width, channels=32)
        sizes = [(height // 4, width // 4)] * 2 + [(height // 8, width // 8)] + [(height // 16, width // 16)] * 2
        with torch.no_grad():
            cate, ins = head(feats)
            cate_ev, ins_ev = head(feats, eval=True)
        for level, (s, size) in enumerate(zip(GRIDS, sizes)):
            assert cate[level].shape == (2, 3, s, s) and cate_ev[level].shape == (2, s, s, 3)
            assert ins[level].shape == ins_ev[level].shape == (2, 2 * s, *size)
            assert 0 < ins[level].min() and ins[level].max() < 1
        assert head.mask_sizes(ins) == sizes

    @pytest.mark.parametrize("height, width", SIZES)
    def test_solov2_gives_kernels_per_level_and_one_stride_4_mask_feature_map(self, height, width):
        """SOLOv2: per level (kernels (bz, E, S, S), mask features (bz, E, H/4, W/4)), the mask features one tensor
        for every level, so every level's masks (and mask targets) are at (H/4, W/4)."""
        torch.manual_seed(0)
        head = small_head("solov2")
        feats = fpn_maps(height, width, channels=32)
        with torch.no_grad():
            cate, ins = head(feats)
            cate_ev, ins_ev = head(feats, eval=True)
        for level, s in enumerate(GRIDS):
            kernels, mask_feat = ins[level]
            assert cate[level].shape == (2, 3, s, s) and cate_ev[level].shape == (2, s, s, 3)
            assert kernels.shape == (2, 32, s, s) and mask_feat.shape == (2, 32, height // 4, width // 4)
            assert mask_feat is ins[0][1] and ins_ev[level][1] is ins_ev[0][1]
        assert head.mask_sizes(ins) == [(height // 4, width // 4)] * 5

    @pytest.mark.parametrize("arch", ["decoupled", "solov2"])
    def test_cell_masks_give_every_cell_a_mask_at_a_quarter_of_the_input(self, arch):
        torch.manual_seed(0)
        head = small_head(arch).eval()
        with torch.no_grad():
            _, ins_ev = head(fpn_maps(128, 160, channels=32), eval=True)
            masks = head.cell_masks([image_of(level, 1) for level in ins_ev],
                                    torch.arange(sum(s * s for s in GRIDS)))
        assert masks.shape == (sum(s * s for s in GRIDS), 32, 40) and masks.dtype == torch.float32
        assert 0 <= masks.min() and masks.max() <= 1
        assert head.cell_masks([image_of(level, 0) for level in ins_ev], torch.zeros(0, dtype=torch.long)).shape \
            == (0, 32, 40)

    def test_the_towers_take_the_coordinates_the_authors_give_them(self):
        """Decoupled: the X tower gets the x coordinate channel (constant down a column), the Y tower the y one;
        SOLOv2: the kernel tower both, after the resize to S x S, and the mask feature branch both on P5 only."""
        torch.manual_seed(0)
        seen = {}
        decoupled, solov2 = small_head("decoupled"), small_head("solov2")
        watch = {"x": decoupled.ins_convs_x[0], "y": decoupled.ins_convs_y[0], "kernel": solov2.kernel_convs[0],
                 **{f"p{2 + i}": level[0] for i, level in enumerate(solov2.mask_feat_branch.levels)}}
        for name, module in watch.items():
            module.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0]))
        with torch.no_grad():
            feats = fpn_maps(128, 160, channels=32)
            decoupled(feats)
            solov2(feats)
        x, y = seen["x"][0, -1], seen["y"][0, -1]  # the last input channel, image 0 of level 0
        assert seen["x"].shape[1] == seen["y"].shape[1] == 33
        assert torch.equal(x, torch.linspace(-1, 1, x.shape[1]).expand_as(x))
        assert torch.equal(y, torch.linspace(-1, 1, y.shape[0])[:, None].expand_as(y))
        assert seen["kernel"].shape[1:] == (34, 12, 12)  # 32 features + x, y at S x S for level 0
        level0 = F.interpolate(feats["0"], scale_factor=0.5, mode="bilinear", align_corners=False)  # NewFPN's
        with_coords = torch.cat([level0, coord_feat(level0)], 1)  # the coordinates before the resize to S x S
        assert torch.allclose(seen["kernel"], F.interpolate(with_coords, size=(12, 12), mode="bilinear",
                                                            align_corners=False), atol=1e-6)
        assert [seen[f"p{i}"].shape[1] for i in range(2, 6)] == [32, 32, 32, 34]


# ---------------------------------------------------------------- the mask of a cell
def test_decoupled_mask_of_cell_i_j_is_x_of_its_column_times_y_of_its_row():
    """On a 2 x 2 grid, cell k = i * S + j (i the row) gets sigmoid(X_j) * sigmoid(Y_i), worked out by hand: the
    X maps carry 0.5 and 0.25, the Y maps 0.8 and 0.4, each on its own pixel pattern."""
    head = DecoupledSOLOHead(num_classes=4, in_channels=32, seg_feat_channels=32, stacked_convs=1,
                             num_grids=(2, 2, 2, 2, 2))
    x0, x1 = torch.tensor([[0.5, 0.5], [0.5, 0.5]]), torch.tensor([[0.25, 0.0], [0.0, 0.25]])
    y0, y1 = torch.tensor([[0.8, 0.8], [0.0, 0.0]]), torch.tensor([[0.4, 0.0], [0.4, 0.0]])
    level = torch.stack([x0, x1, y0, y1])[None]  # (1, 2S, 2, 2): X_0, X_1, Y_0, Y_1
    cells = torch.tensor([0, 1, 2, 3])  # (i, j) = (0, 0), (0, 1), (1, 0), (1, 1)
    expected = torch.stack([torch.tensor([[0.4, 0.4], [0.0, 0.0]]),  # X_0 Y_0
                            torch.tensor([[0.2, 0.0], [0.0, 0.0]]),  # X_1 Y_0
                            torch.tensor([[0.2, 0.0], [0.2, 0.0]]),  # X_0 Y_1
                            torch.tensor([[0.1, 0.0], [0.0, 0.0]])])  # X_1 Y_1
    got = head.cell_masks_train(level, 0, torch.zeros(4, dtype=torch.long), cells, [4])
    assert torch.allclose(got, expected)
    # eval: the same products for the cells of the first level (its maps are at H/4 already)
    assert torch.allclose(head.cell_masks([level[0]] * 5, cells), expected)
    # a deeper level's maps are at half that size: each map is resized to H/4 first, then multiplied (the
    # authors' order); its cells come after the 4 cells of each level before it
    g = torch.Generator().manual_seed(0)
    big, small = torch.rand(4, 4, 4, generator=g), torch.rand(4, 2, 2, generator=g)  # X_0, X_1, Y_0, Y_1 each
    got = head.cell_masks([big, big, small, big, big], torch.tensor([2 * 4 + 1]))  # level 2, cell (0, 1)
    x1, y0 = (F.interpolate(m[None, None], size=(4, 4), mode="bilinear", align_corners=False)[0] for m in small[1:3])
    assert torch.allclose(got, x1 * y0)
    assert not torch.allclose(got, F.interpolate((small[1] * small[2])[None, None], size=(4, 4), mode="bilinear",
                                                 align_corners=False)[0])  # the other order differs


def test_solov2_masks_are_the_dynamic_1x1_convolution_of_each_cells_kernel():
    """Each cell's mask is sigmoid(conv2d(mask features of its image, its kernel as a 1x1 filter)): checked against
    an explicit loop of F.conv2d over the cells, in training (cells of several images) and in eval."""
    g = torch.Generator().manual_seed(0)
    head = small_head("solov2")
    kernels, mask_feat = torch.randn(3, 32, 4, 4, generator=g), torch.randn(3, 32, 6, 7, generator=g)
    image, cell = torch.tensor([0, 0, 2, 2, 2]), torch.tensor([5, 15, 0, 5, 9])  # image 1 has none
    got = head.cell_masks_train((kernels, mask_feat), 4, image, cell, [2, 0, 3])
    for m, (b, k) in enumerate(zip(image.tolist(), cell.tolist())):
        weight = kernels[b, :, k // 4, k % 4].view(1, 32, 1, 1)  # cell (i, j) = (k // S, k % S)
        assert torch.allclose(got[m], F.conv2d(mask_feat[b:b + 1], weight)[0, 0].sigmoid(), atol=1e-6)
    # eval: cells index the levels' concatenated S^2 cells; level 1's cell 3 is index S_0^2 + 3
    levels = [(torch.randn(32, s, s, generator=g), mask_feat[0]) for s in GRIDS]
    cells = torch.tensor([7, GRIDS[0] ** 2 + 3])
    got = head.cell_masks(levels, cells)
    for m, (level, k) in enumerate([(0, 7), (1, 3)]):
        weight = levels[level][0][:, k // GRIDS[level], k % GRIDS[level]].view(1, 32, 1, 1)
        assert torch.allclose(got[m], F.conv2d(mask_feat[:1], weight)[0, 0].sigmoid(), atol=1e-6)


# ---------------------------------------------------------------- training: the shared targets and losses
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_branch(arch):
    """With an object on every level, the loss's gradient reaches every parameter of the head and every backbone
    map (SOLOv2's mask features come from P2-P5, its kernels and categories from the 5 NewFPN levels)."""
    torch.manual_seed(0)
    head = small_head(arch)
    feats = {k: v.requires_grad_() for k, v in fpn_maps(256, 352, bz=1, channels=32).items()}
    cate, ins = head(feats)
    boxes, labels, masks = scene(256, 352)
    targets = head.target(ins, [boxes], [labels], [masks], compact=True)
    assert all(int((cells >= 0).sum()) > 0 for cells in targets[1][0])  # every level has positive cells
    head.loss(cate, ins, *targets)[2].backward()
    no_grad = [name for name, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(f.grad.abs().sum() > 0 for f in feats.values())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", ["no object", "no positive cell"])
def test_a_batch_without_positive_cells_gives_finite_losses(arch, case):
    """Two images without an object, or one whose only object has an empty mask (no centre, so no positive cell):
    the focal loss is finite, the dice loss 0, and backward gives finite gradients."""
    torch.manual_seed(0)
    head = small_head(arch)
    cate, ins = head(fpn_maps(128, 160, channels=32))
    if case == "no object":
        boxes, labels, masks = [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2, \
            [torch.zeros(0, 128, 160, dtype=torch.uint8)] * 2
    else:
        boxes, labels = [torch.tensor([[10., 10, 50, 60]]), torch.zeros(0, 4)], [torch.tensor([2]),
                                                                                 torch.zeros(0, dtype=torch.long)]
        masks = [torch.zeros(1, 128, 160, dtype=torch.uint8), torch.zeros(0, 128, 160, dtype=torch.uint8)]
    cate_loss, mask_loss, total = head.loss(cate, ins, *head.target(ins, boxes, labels, masks, compact=True))
    assert math.isfinite(cate_loss.item()) and mask_loss.item() == 0
    total.backward()  # every parameter in the graph: DDP runs without the search for unused parameters
    assert [name for name, p in head.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


@pytest.mark.parametrize("arch", ["decoupled", "solov2"])
def test_the_handout_and_compact_targets_give_the_same_loss(arch):
    """loss takes either form of target's output for every head (the handout's S^2 channels, or the slots)."""
    torch.manual_seed(0)
    head = small_head(arch)
    cate, ins = head(fpn_maps(256, 352, bz=1, channels=32))
    boxes, labels, masks = scene(256, 352)
    compact = head.loss(cate, ins, *head.target(ins, [boxes], [labels], [masks], compact=True))
    handout = head.loss(cate, ins, *head.target(ins, [boxes], [labels], [masks]))
    assert torch.allclose(torch.stack(compact), torch.stack(handout), atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_training_step_under_bfloat16_autocast_is_finite(arch):
    """--amp: the forward under autocast, the losses in float32 (as engine.forward_losses runs them)."""
    torch.manual_seed(0)
    head = small_head(arch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cate, ins = head(fpn_maps(256, 352, bz=1, channels=32))
    boxes, labels, masks = scene(256, 352)
    losses = head.loss(cate, ins, *head.target(ins, [boxes], [labels], [masks], compact=True))
    assert all(math.isfinite(v.item()) for v in losses) and losses[1].item() > 0
    losses[2].backward()


# ---------------------------------------------------------------- inference: the shared post-processing
@pytest.mark.parametrize("arch", ["decoupled", "solov2"])
def test_postprocess_finds_the_object_a_hand_made_prediction_describes(arch):
    """One candidate cell whose mask predictions describe a rectangle (Decoupled: X_j high on its columns, Y_i on
    its rows; SOLOv2: a kernel picking the mask feature channel that is +8 inside, -8 outside) comes out of
    PostProcess as one detection with that rectangle, resized to the original frame."""
    head = small_head(arch).eval()
    height, width, ori = 128, 160, (96, 120)  # a 96x120 image resized to 128x160, no padding
    sizes = [(32, 40)] * 2 + [(16, 20)] + [(8, 10)] * 2  # (2H_f, 2W_f) per level
    rows, cols = slice(8, 20), slice(12, 32)  # the rectangle at H/4: pixels 32-80 x 48-128 of the input
    if arch == "decoupled":
        ins = []
        for s, size in zip(GRIDS, sizes):
            maps = torch.zeros(1, 2 * s, *size)
            ins.append(maps)
        ins[0][0, 5, :, cols] = 1  # X_5: the rectangle's columns
        ins[0][0, GRIDS[0] + 3, rows, :] = 1  # Y_3: its rows
    else:
        mask_feat = torch.full((1, 32, height // 4, width // 4), -8.0)
        mask_feat[0, 7, rows, cols] = 8
        ins = [(torch.zeros(1, 32, s, s), mask_feat) for s in GRIDS]
        ins[0][0][0, 7, 3, 5] = 1  # cell (3, 5) of level 0 picks channel 7
    cate = [torch.zeros(1, s, s, 3) for s in GRIDS]
    cate[0][0, 3, 5, 1] = 0.9  # cell (3, 5) of level 0, class 2
    scores, labels, masks = (r[0] for r in head.PostProcess(ins, cate, ori, POSTPROCESS_MAP))
    assert labels.tolist() == [2] and scores.item() == pytest.approx(0.9, abs=1e-3)
    expected = torch.zeros(ori)
    expected[24:60, 36:96] = 1  # the rectangle at 3/4 of the input's 32-80 x 48-128
    assert (masks[0] != expected).float().mean() < 0.01


# ---------------------------------------------------------------- settings and scripts
def test_the_arch_is_a_model_setting_and_a_bad_one_is_named():
    assert [ModelConfig(arch=a).arch for a in ARCHS] == ["solo", "decoupled", "solov2"]
    assert type(build_model(dict(arch="solov2", backbone="resnet18", backbone_weights="none")).head) is SOLOv2Head
    assert type(build_model(dict(backbone="resnet18", backbone_weights="none")).head) is SOLOHead
    with pytest.raises(ValueError, match=r"arch 'solov3' is not one of \('solo', 'decoupled', 'solov2'\)"):
        ModelConfig(arch="solov3")
    with pytest.raises(ValueError, match="mask_feat_channels 48 must be a multiple of 32"):
        ModelConfig(arch="solov2", mask_feat_channels=48)


TINY = ["--backbone", "resnet18", "--backbone-weights", "none", "--set", "stacked_convs=1",
        "seg_feat_channels=32", "mask_feat_channels=32", "num_grids=8,6,4,3,2", "--input-height", "64",
        "--batch-size", "1", "--log-every", "1", "--device", "cpu", "--workers", "0"]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_head_trains_resumes_and_runs_through_main_infer(arch, three_images, tmp_path, capsys):
    """The same commands for every head: main_train.py --arch A stores the head in the checkpoint; --resume,
    main_infer.py and bench.py --checkpoint take it from there without the flag; a resumed run refuses another
    --arch."""
    run, figures = tmp_path / "run", tmp_path / "figures"
    common = TINY + ["--data-dir", three_images, "--output-dir", str(run)]
    main_train.main(parse_train(common + ["--arch", arch, "--epochs", "1"]))
    assert load_checkpoint(str(run / "checkpoint.pth"))["model_cfg"]["arch"] == arch
    resumed = main_train.main(parse_train(["--resume", str(run), "--epochs", "2"]))
    assert resumed["epoch"] == 1
    other = "solo" if arch != "solo" else "solov2"
    with pytest.raises(CheckpointError, match=re.escape(f"--arch (the run has {arch!r}, the command line {other!r})")):
        parse_train(["--resume", str(run), "--arch", other])
    capsys.readouterr()
    metrics = main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint-dir", str(run), "--figures-dir", str(figures), "--device", "cpu", "--workers", "0",
         "--num-figures", "1"]))
    assert f"(epoch 1, head {arch})" in capsys.readouterr().out
    assert metrics["num_images"] == 1 and len(metrics["overlays"]) == 1
    # bench.py --checkpoint: the run's model settings, random weights
    bench_args = SimpleNamespace(arch=None, checkpoint=str(run / "checkpoint.pth"))
    cfg = model_settings(bench_args)
    assert (cfg.arch, cfg.seg_feat_channels, cfg.backbone_weights, bench_args.arch) == (arch, 32, "none", arch)
    with pytest.raises(CheckpointError, match=f"--arch {other}: the checkpoint .* is a {arch} model"):
        model_settings(SimpleNamespace(arch=other, checkpoint=str(run / "checkpoint.pth")))


# ---------------------------------------------------------------- every head learns
# iterations of batch 8 (the same 8 images) after which each head clears the floor with a margin (docs/tests.md);
# SOLOv2 trains at the demo's lower lr for it (train_settings.DEMO_ARCH_LR)
OVERFIT_ITERATIONS = dict(solo=160, decoupled=200, solov2=280)


@pytest.fixture(scope="module")
def eight_images(tmp_path_factory):
    """8 synthetic images with objects of 30 px or more (as --demo), at the demo's input height."""
    paths = write_synthetic_dataset(str(tmp_path_factory.mktemp("eight")), num_images=8, seed=0, min_size=30,
                                    workers=1)
    return BuildDataset(paths, input_height=DEMO["input_height"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_each_head_learns_eight_images(arch, eight_images):
    """The overfit check: the --demo configuration of each head, trained on 8 images with the demo's optimiser and
    lr (AdamW, a short warm-up), segments those same 8 images with mask AP50 >= 0.7 (an untrained model scores
    about 0): targets, losses and post-processing agree with each other for every head."""
    seed_everything(0)
    model = build_model(ModelConfig.from_args(SimpleNamespace(**DEMO, arch=arch))).train()
    lr = DEMO_ARCH_LR.get(arch, DEMO["lr"])  # as main_train.py --demo --arch <arch>
    optimizer = build_optimizer(model.parameters(), DEMO["optimizer"], lr)
    scheduler = build_scheduler(optimizer, warmup_iters=10, lr_steps=[], iters_per_epoch=1)
    run = SimpleNamespace(amp=False, input_height=DEMO["input_height"], clip_grad=35.0)
    loader = BuildDataLoader(eight_images, batch_size=8, shuffle=True, num_workers=0).loader()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(OVERFIT_ITERATIONS[arch]):
        for batch in loader:  # one batch: the 8 images
            train_step(model, batch, optimizer, scaler, torch.device("cpu"), run)
            scheduler.step()
    metrics = map_summary(evaluate_map(model, Subset(eight_images, range(8)), torch.device("cpu"), 8, 0))
    assert metrics["AP50"] >= 0.7, metrics


@pytest.mark.parametrize("arch", ARCHS)
def test_bench_times_target_on_shape_only_predictions_that_give_the_real_targets(arch):
    """bench.py's target rows pass predictions that hold no memory (only their sizes): the same targets."""
    torch.manual_seed(0)
    head = small_head(arch)
    cate, ins = head(fpn_maps(256, 352, bz=1, channels=32))
    boxes, labels, masks = scene(256, 352)
    real = head.target(ins, [boxes], [labels], [masks], compact=True)
    shapes = head.target(shape_only_preds(head, 1, 256, 352, torch.device("cpu")), [boxes], [labels], [masks],
                         compact=True)
    for real_part, shape_part in zip(real, shapes):
        assert all(torch.equal(a, b) for a, b in zip(real_part[0], shape_part[0]))


def test_the_demo_gives_solov2_its_own_lr_and_an_explicit_lr_wins(capsys):
    assert parse_train(["--demo"]).lr == DEMO["lr"]
    assert parse_train(["--demo", "--arch", "decoupled"]).lr == DEMO["lr"]
    assert parse_train(["--demo", "--arch", "solov2"]).lr == DEMO_ARCH_LR["solov2"] == 0.001
    assert parse_train(["--demo", "--arch", "solov2", "--lr", "0.03"]).lr == 0.03
    with pytest.raises(SystemExit):
        parse_train(["--help"])
    assert "(--arch solov2: --lr 0.001)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_each_head_trains_one_run_and_infers_under_amp(arch, three_images, tmp_path):
    """The GPU runbook's check of every head: one --amp epoch on CUDA (the device-side data path) and
    main_infer.py on CUDA with --amp."""
    run = tmp_path / "run"
    args = TINY[:-4] + ["--device", "cuda", "--workers", "0", "--amp", "--arch", arch, "--data-dir", three_images,
                        "--output-dir", str(run), "--epochs", "1"]
    result = main_train.main(parse_train(args))
    assert result["epoch"] == 0 and all(math.isfinite(v) for v in result["train_loss"])
    metrics = main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint-dir", str(run), "--figures-dir", str(tmp_path / "figures"), "--device", "cuda", "--amp",
         "--workers", "0", "--num-figures", "1"]))
    assert metrics["num_images"] == 1
