"""Converting the published SOLO checkpoints (convert.py, published.py).

Each test builds a checkpoint with exactly the parameter names and shapes mmdetection 2.x/3.x or the SOLO
authors' mmdetection 1.x produce (written out below from their module definitions, not from our model), at a
small configuration, with random weights. The reference forward below reads those weights by *their* names and
computes what their modules compute (ResNet, FPN, the heads' forward), so a tensor landing in the wrong layer of
ours changes our outputs against it.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import convert
from checkpoint import load_checkpoint, load_model
from errors import MissingFileError
from published import COCO_CLASSES, ConversionError

# their names: (head prefix, mask-feature prefix, conv_pred name, layer names)
MMDET = dict(head="mask_head.", feat="mask_head.mask_feature_head.", conv_pred="conv_pred",
             cate_tower="cls_convs", cate_out="conv_cls", solo_tower="mask_convs", solo_out="conv_mask_list",
             x_tower="mask_convs_x", y_tower="mask_convs_y", x_out="conv_mask_list_x", y_out="conv_mask_list_y",
             kernel_tower="kernel_convs", kernel_out="conv_kernel")
AUTHORS = dict(head="bbox_head.", feat="mask_feat_head.", conv_pred="conv_pred.0",  # decoupled_solo_head: dsolo_cate
               cate_tower="cate_convs", cate_out=dict(solo="solo_cate", decoupled="dsolo_cate", solov2="solo_cate"),
               solo_tower="ins_convs", solo_out="solo_ins_list",
               x_tower="ins_convs_x", y_tower="ins_convs_y", x_out="dsolo_ins_list_x", y_out="dsolo_ins_list_y",
               kernel_tower="kernel_convs", kernel_out="solo_kernel")
SCHEMES = dict(mmdet=MMDET, authors=AUTHORS)
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
SMALL = dict(classes=3, channels=64, convs=2, grids=(8, 6, 4, 3, 2), e=64)
SIZE = (96, 128)  # input height, width: multiples of 32


# ----------------------------------------------------------------------------------------------------
# Their checkpoints, from their module definitions
# ----------------------------------------------------------------------------------------------------
def _bn(state, name, channels, gen):
    state[f"{name}.weight"] = 1 + 0.1 * torch.randn(channels, generator=gen)
    state[f"{name}.bias"] = 0.1 * torch.randn(channels, generator=gen)
    state[f"{name}.running_mean"] = 0.1 * torch.randn(channels, generator=gen)
    state[f"{name}.running_var"] = 0.5 + torch.rand(channels, generator=gen)
    state[f"{name}.num_batches_tracked"] = torch.tensor(1000)


def _conv(state, name, out, inp, k, gen, bias=False):
    state[f"{name}.weight"] = torch.randn(out, inp, k, k, generator=gen) * (1.0 / (inp * k * k)) ** 0.5
    if bias:
        state[f"{name}.bias"] = 0.1 * torch.randn(out, generator=gen)


def resnet_fpn_state(depth, gen):
    """mmdetection's ResNet (style='pytorch': the stride in conv2) and FPN (out_channels 256, num_outs 5)."""
    state = {}
    _conv(state, "backbone.conv1", 64, 3, 7, gen)
    _bn(state, "backbone.bn1", 64, gen)
    bottleneck, inplanes, stage_channels = depth >= 50, 64, []
    for stage, blocks in enumerate(BLOCKS[depth]):
        planes = 64 * 2 ** stage
        out = planes * (4 if bottleneck else 1)
        for j in range(blocks):
            name = f"backbone.layer{stage + 1}.{j}"
            if bottleneck:
                _conv(state, f"{name}.conv1", planes, inplanes, 1, gen)
                _conv(state, f"{name}.conv2", planes, planes, 3, gen)
                _conv(state, f"{name}.conv3", out, planes, 1, gen)
                for i, c in ((1, planes), (2, planes), (3, out)):
                    _bn(state, f"{name}.bn{i}", c, gen)
            else:
                _conv(state, f"{name}.conv1", planes, inplanes, 3, gen)
                _conv(state, f"{name}.conv2", planes, planes, 3, gen)
                for i in (1, 2):
                    _bn(state, f"{name}.bn{i}", planes, gen)
            if j == 0 and (stage > 0 or inplanes != out):
                _conv(state, f"{name}.downsample.0", out, inplanes, 1, gen)
                _bn(state, f"{name}.downsample.1", out, gen)
            inplanes = out
        stage_channels.append(out)
    for i, c in enumerate(stage_channels):
        _conv(state, f"neck.lateral_convs.{i}.conv", 256, c, 1, gen, bias=True)
        _conv(state, f"neck.fpn_convs.{i}.conv", 256, 256, 3, gen, bias=True)
    return state


def _conv_module(state, name, out, inp, k, gen):
    """ConvModule(conv, GN(32)): .conv without bias, .gn"""
    _conv(state, f"{name}.conv", out, inp, k, gen)
    state[f"{name}.gn.weight"] = 1 + 0.1 * torch.randn(out, generator=gen)
    state[f"{name}.gn.bias"] = 0.1 * torch.randn(out, generator=gen)


def names(scheme, head):
    """Their layer names for one head (the authors name Decoupled SOLO's category output apart)."""
    return {k: v[head] if isinstance(v, dict) else v for k, v in SCHEMES[scheme].items()}


def published_state(scheme, head, depth=18, seed=0, **small):
    """A whole published state dict, their names and shapes, random weights."""
    cfg, n = {**SMALL, **small}, names(scheme, head)
    gen = torch.Generator().manual_seed(seed)
    state = resnet_fpn_state(depth, gen)
    p, c = n["head"], cfg["channels"]
    towers = {"solo": [("cate_tower", 256), ("solo_tower", 258)], "decoupled":
              [("cate_tower", 256), ("x_tower", 257), ("y_tower", 257)],
              "solov2": [("cate_tower", 256), ("kernel_tower", 258)]}[head]
    for tower, first in towers:
        for i in range(cfg["convs"]):
            _conv_module(state, f"{p}{n[tower]}.{i}", c, first if i == 0 else c, 3, gen)
    _conv(state, f"{p}{n['cate_out']}", cfg["classes"], c, 3, gen, bias=True)
    if head == "solo":
        for level, s in enumerate(cfg["grids"]):
            _conv(state, f"{p}{n['solo_out']}.{level}", s * s, c, 1, gen, bias=True)
    elif head == "decoupled":
        for level, s in enumerate(cfg["grids"]):
            _conv(state, f"{p}{n['x_out']}.{level}", s, c, 3, gen, bias=True)
            _conv(state, f"{p}{n['y_out']}.{level}", s, c, 3, gen, bias=True)
    else:
        e, hidden = cfg["e"], min(128, cfg["e"])
        _conv(state, f"{p}{n['kernel_out']}", e, c, 3, gen, bias=True)
        for i in range(4):  # MaskFeatHead: level 0 one conv; level i: i (conv, upsample), coords at level 3
            for j in range(max(i, 1)):
                inp = (258 if i == 3 else 256) if j == 0 else hidden
                _conv_module(state, f"{n['feat']}convs_all_levels.{i}.conv{j}", hidden, inp, 3, gen)
        _conv_module(state, f"{n['feat']}{n['conv_pred']}", e, hidden, 1, gen)
    return state


def save_published(tmp_path, state, name="published.pth", meta=None):
    path = os.path.join(tmp_path, name)
    torch.save({"meta": meta or {"mmdet_version": "2.25.0"}, "state_dict": state}, path)
    return path


# ----------------------------------------------------------------------------------------------------
# Their forward, read off their code, by their names
# ----------------------------------------------------------------------------------------------------
def _bn_f(x, s, name):
    return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                        s[f"{name}.bias"], training=False, eps=1e-5)


def _cm(x, s, name, groups=32, pad=1):
    """ConvModule: conv (no bias), GN, ReLU"""
    x = F.conv2d(x, s[f"{name}.conv.weight"], padding=pad)
    return F.relu(F.group_norm(x, groups, s[f"{name}.gn.weight"], s[f"{name}.gn.bias"]))


def their_backbone(s, img, depth):
    x = F.relu(_bn_f(F.conv2d(img, s["backbone.conv1.weight"], stride=2, padding=3), s, "backbone.bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    feats = []
    for stage, blocks in enumerate(BLOCKS[depth]):
        for j in range(blocks):
            name, stride = f"backbone.layer{stage + 1}.{j}", 2 if (stage > 0 and j == 0) else 1
            if depth >= 50:
                y = F.relu(_bn_f(F.conv2d(x, s[f"{name}.conv1.weight"]), s, f"{name}.bn1"))
                y = F.relu(_bn_f(F.conv2d(y, s[f"{name}.conv2.weight"], stride=stride, padding=1), s, f"{name}.bn2"))
                y = _bn_f(F.conv2d(y, s[f"{name}.conv3.weight"]), s, f"{name}.bn3")
            else:
                y = F.relu(_bn_f(F.conv2d(x, s[f"{name}.conv1.weight"], stride=stride, padding=1), s, f"{name}.bn1"))
                y = _bn_f(F.conv2d(y, s[f"{name}.conv2.weight"], padding=1), s, f"{name}.bn2")
            if f"{name}.downsample.0.weight" in s:
                x = _bn_f(F.conv2d(x, s[f"{name}.downsample.0.weight"], stride=stride), s, f"{name}.downsample.1")
            x = F.relu(x + y)
        feats.append(x)
    laterals = [F.conv2d(f, s[f"neck.lateral_convs.{i}.conv.weight"], s[f"neck.lateral_convs.{i}.conv.bias"])
                for i, f in enumerate(feats)]
    for i in range(3, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
    outs = [F.conv2d(lat, s[f"neck.fpn_convs.{i}.conv.weight"], s[f"neck.fpn_convs.{i}.conv.bias"], padding=1)
            for i, lat in enumerate(laterals)]
    return outs + [F.max_pool2d(outs[-1], 1, stride=2)]


def _coords(x):
    y, xx = torch.meshgrid(torch.linspace(-1, 1, x.shape[-2]), torch.linspace(-1, 1, x.shape[-1]), indexing="ij")
    return xx.expand(x.shape[0], 1, -1, -1), y.expand(x.shape[0], 1, -1, -1)


def their_forward(s, scheme, head, img, depth=18, **small):
    """Training-mode outputs of their head, sigmoids applied as our forward returns them."""
    cfg, n = {**SMALL, **small}, names(scheme, head)
    p = n["head"]
    feats = their_backbone(s, img, depth)
    resized = [F.interpolate(feats[0], size=feats[1].shape[-2:], mode="bilinear", align_corners=False),
               *feats[1:4], F.interpolate(feats[4], size=feats[3].shape[-2:], mode="bilinear", align_corners=False)]

    def tower(x, name):
        for i in range(cfg["convs"]):
            x = _cm(x, s, f"{p}{n[name]}.{i}")
        return x
    cates, masks = [], []
    for level, (x, grid) in enumerate(zip(resized, cfg["grids"])):
        cate = tower(F.interpolate(x, size=grid, mode="bilinear", align_corners=False), "cate_tower")
        cates.append(F.conv2d(cate, s[f"{p}{n['cate_out']}.weight"], s[f"{p}{n['cate_out']}.bias"],
                              padding=1).sigmoid())
        cx, cy = _coords(x)
        if head == "solo":
            m = F.interpolate(tower(torch.cat([x, cx, cy], 1), "solo_tower"), scale_factor=2, mode="bilinear")
            masks.append(F.conv2d(m, s[f"{p}{n['solo_out']}.{level}.weight"],
                                  s[f"{p}{n['solo_out']}.{level}.bias"]).sigmoid())
        elif head == "decoupled":
            out = []
            for coord, t, o in ((cx, "x_tower", "x_out"), (cy, "y_tower", "y_out")):
                m = F.interpolate(tower(torch.cat([x, coord], 1), t), scale_factor=2, mode="bilinear")
                out.append(F.conv2d(m, s[f"{p}{n[o]}.{level}.weight"], s[f"{p}{n[o]}.{level}.bias"],
                                    padding=1).sigmoid())
            masks.append(torch.cat(out, 1))
        else:
            k = tower(F.interpolate(torch.cat([x, cx, cy], 1), size=grid, mode="bilinear"), "kernel_tower")
            masks.append(F.conv2d(k, s[f"{p}{n['kernel_out']}.weight"], s[f"{p}{n['kernel_out']}.bias"], padding=1))
    if head == "solov2":
        f = n["feat"]
        total = _cm(feats[0], s, f"{f}convs_all_levels.0.conv0")
        for i in range(1, 4):
            x = feats[i] if i < 3 else torch.cat([feats[3], *_coords(feats[3])], 1)
            for j in range(i):
                x = F.interpolate(_cm(x, s, f"{f}convs_all_levels.{i}.conv{j}"), scale_factor=2, mode="bilinear")
            total = total + x
        mask_feat = _cm(total, s, f"{f}{n['conv_pred']}", pad=0)
        masks = [(kernel, mask_feat) for kernel in masks]
    return cates, masks


def _flat(outputs):
    cates, masks = outputs
    return list(cates) + [t for m in masks for t in ([m] if torch.is_tensor(m) else m)]


def assert_same_outputs(ours, theirs):
    for a, b in zip(_flat(ours), _flat(theirs), strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def convert_file(tmp_path, path, *extra):
    out = os.path.join(tmp_path, "ours.pth")
    return convert.main(convert.get_args_parser().parse_args([path, "--out", out, *extra])), out


def image():
    return torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------
# Each kind converts, loads with every key used, and computes their forward
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["mmdet", "authors"])
@pytest.mark.parametrize("head", ["solo", "decoupled", "solov2"])
@torch.no_grad()
def test_published_file_converts_and_computes_their_forward(tmp_path, scheme, head):
    state = published_state(scheme, head)
    result, out = convert_file(tmp_path, save_published(tmp_path, state))
    cfg = result["model_cfg"]
    assert (cfg.arch, cfg.backbone, cfg.num_classes, cfg.stacked_convs, cfg.seg_feat_channels) == \
        (head, "resnet18", SMALL["classes"] + 1, SMALL["convs"], SMALL["channels"])
    if head != "solov2":
        assert cfg.num_grids == SMALL["grids"]  # read off the mask outputs
    else:
        assert cfg.mask_feat_channels == SMALL["e"]
    model = load_model(out)  # strict: no missing or unexpected key
    if head == "solov2":  # the grids are not in SOLOv2's weights: the published ones are assumed
        assert cfg.num_grids == (40, 36, 24, 16, 12)
        model.head.seg_num_grids = list(SMALL["grids"])
    assert_same_outputs(model(image()), their_forward(state, scheme, head, image()))


@pytest.mark.parametrize("depth", [34, 50, 101])
@torch.no_grad()
def test_resnet_depth_is_read_from_the_file(tmp_path, depth):
    state = published_state("mmdet", "solo", depth=depth)
    result, out = convert_file(tmp_path, save_published(tmp_path, state))
    assert result["model_cfg"].backbone == f"resnet{depth}"
    if depth == 50:  # bottleneck blocks and their downsample land where ours use them
        assert_same_outputs(load_model(out)(image()), their_forward(state, "mmdet", "solo", image(), depth=50))


@torch.no_grad()
def test_swapping_two_towers_changes_the_outputs(tmp_path):
    """The check above would catch a conversion that put one tower's weights in another's layers."""
    state = published_state("mmdet", "solo")
    _, out = convert_file(tmp_path, save_published(tmp_path, state))
    model = load_model(out)
    cate, ins = model.head.cate_convs[1], model.head.ins_convs[1]
    swapped = {k: v.clone() for k, v in cate.state_dict().items()}
    cate.load_state_dict(ins.state_dict())
    ins.load_state_dict(swapped)
    with pytest.raises(AssertionError):
        assert_same_outputs(model(image()), their_forward(state, "mmdet", "solo", image()))


def test_converted_checkpoint_holds_the_coco_classes_and_the_input_frame(tmp_path):
    state = published_state("mmdet", "solov2", classes=80)
    result, out = convert_file(tmp_path, save_published(tmp_path, state))
    checkpoint = load_checkpoint(out)
    assert result["model_cfg"].class_names == COCO_CLASSES and len(COCO_CLASSES) == 80
    assert checkpoint["args"] == dict(input_height=800, max_long_side=1333)
    assert checkpoint["model_cfg"]["backbone_weights"] == "checkpoint"
    assert checkpoint["converted_from"]["scheme"] == "mmdetection 2.x/3.x"


def test_light_models_and_stored_configs_give_their_test_scale(tmp_path):
    light = published_state("mmdet", "solov2", convs=2, e=128)  # SOLOv2 light: 2 convs per tower, E 128
    assert convert_file(tmp_path, save_published(tmp_path, light))[0]["input_scale"] == (448, 768)
    config = "test_pipeline = [dict(type='MultiScaleFlipAug', img_scale=(852, 512), flip=False)]"
    path = save_published(tmp_path, light, "light512.pth", meta={"config": config})
    assert convert_file(tmp_path, path)[0]["input_scale"] == (512, 852)
    assert convert_file(tmp_path, path, "--input-scale", "640", "1066")[0]["input_scale"] == (640, 1066)


def test_default_output_name_drops_the_zoo_date_and_hash(tmp_path, monkeypatch):
    state = published_state("mmdet", "solo")
    monkeypatch.chdir(tmp_path)
    for name, out in (("solo_r50_fpn_3x_coco_20210901_012353-11d224d7.pth", "solo_r50_fpn_3x_coco.pth"),
                      ("SOLO_R50_3x.pth", "SOLO_R50_3x.pth")):
        path = save_published(tmp_path, state, name)
        assert convert.main(convert.get_args_parser().parse_args([path]))["out"] == os.path.join("checkpoints", out)
        assert os.path.isfile(tmp_path / "checkpoints" / out)


# ----------------------------------------------------------------------------------------------------
# Bad files: one error naming the key or the file
# ----------------------------------------------------------------------------------------------------
def test_renamed_key_is_named(tmp_path):
    state = published_state("mmdet", "solo")
    state["mask_head.mask_convs.1.gn.wieght"] = state.pop("mask_head.mask_convs.1.gn.weight")
    with pytest.raises(ConversionError, match=r"unexpected key 'mask_head\.mask_convs\.1\.gn\.wieght'"):
        convert_file(tmp_path, save_published(tmp_path, state))


def test_missing_key_is_named(tmp_path):
    state = published_state("authors", "decoupled")
    assert "bbox_head.dsolo_cate.weight" in state
    del state["bbox_head.dsolo_ins_list_y.2.bias"]
    with pytest.raises(ConversionError, match=r"missing .*head\.ins_out_y\.2\.bias"):
        convert_file(tmp_path, save_published(tmp_path, state))


def test_changed_shape_is_named_with_the_expected_shape(tmp_path):
    state = published_state("mmdet", "solov2")
    state["mask_head.kernel_convs.1.conv.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ConversionError, match=r"key 'mask_head\.kernel_convs\.1\.conv\.weight' has shape "
                                              r"\(64, 64, 1, 1\), expected \(64, 64, 3, 3\)"):
        convert_file(tmp_path, save_published(tmp_path, state))


def test_dcn_file_is_refused_saying_why(tmp_path):
    state = published_state("mmdet", "solov2")
    state["mask_head.kernel_convs.1.conv.conv_offset.weight"] = torch.zeros(18, 64, 3, 3)
    with pytest.raises(ConversionError, match=r"deformable-convolution \(DCN\).*conv_offset"):
        convert_file(tmp_path, save_published(tmp_path, state))


def test_decoupled_light_head_is_refused_saying_why(tmp_path):
    state = published_state("mmdet", "decoupled")
    state["mask_head.mask_convs.0.conv.weight"] = torch.zeros(64, 258, 3, 3)
    with pytest.raises(ConversionError, match="Decoupled SOLO light head"):
        convert_file(tmp_path, save_published(tmp_path, state))


def test_file_that_is_not_a_checkpoint_is_named(tmp_path):
    path = os.path.join(tmp_path, "notes.pth")
    with open(path, "w") as f:
        f.write("not a checkpoint")
    with pytest.raises(ConversionError, match=f"published checkpoint {path!r} cannot be read"):
        convert_file(tmp_path, path)
    other = os.path.join(tmp_path, "faster_rcnn.pth")
    torch.save({"state_dict": {"roi_head.bbox_head.fc_cls.weight": torch.zeros(81, 1024)}}, other)
    with pytest.raises(ConversionError, match="faster_rcnn.pth: no SOLO head found"):
        convert_file(tmp_path, other)
    with pytest.raises(MissingFileError, match="missing.pth"):
        convert_file(tmp_path, os.path.join(tmp_path, "missing.pth"))


def test_pickled_code_in_a_file_is_not_run(tmp_path):
    path = os.path.join(tmp_path, "crafted.pth")
    torch.save({"state_dict": {}, "meta": {"hook": os.getcwd}}, path)  # a callable: needs unpickling code
    with pytest.raises(ConversionError, match="cannot be read .* without running code"):
        convert_file(tmp_path, path)


# ----------------------------------------------------------------------------------------------------
# The published models' input frame: shorter side, longer side at most, padded at the right and bottom
# ----------------------------------------------------------------------------------------------------
def test_mmdetection_frame_sizes():
    from imagefiles import resized_sizes
    assert resized_sizes(480, 640, 800, 1333) == ((800, 1067), (800, 1088))  # landscape: the height is 800
    assert resized_sizes(640, 480, 800, 1333) == ((1067, 800), (1088, 800))  # portrait: the width is 800
    assert resized_sizes(300, 2000, 800, 1333) == ((200, 1333), (224, 1344))  # the longer side caps it
    assert resized_sizes(300, 400, 800) == ((800, 1066), (800, 1088))  # the handout's frame is unchanged


def test_bottom_padding_is_cropped_before_the_resize_to_the_original():
    """A portrait image in mmdetection's frame is padded at the bottom: a mask covering the whole image must
    cover the whole original frame, in PyTorch and in the exported model's numpy post-processing alike."""
    import numpy as np
    from mask_ops import masks_to_original
    from onnx_infer import masks_to_original as numpy_masks_to_original
    ori, scaled, padded = (640, 480), (1067, 800), (1088, 800)
    masks = torch.zeros(1, padded[0] // 4, padded[1] // 4)
    masks[:, :-(-scaled[0] // 4), :scaled[1] // 4] = 1  # the stride-4 cells that hold the image
    assert masks_to_original(masks, ori, scaled).all()
    assert numpy_masks_to_original(masks.numpy(), ori, scaled).all()
    assert not masks_to_original(masks, ori)[:, -1].any()  # the handout's frame would keep the padding
    blobs = (torch.rand(5, *masks.shape[1:], generator=torch.Generator().manual_seed(0)) > 0.4).float()
    np.testing.assert_array_equal(masks_to_original(blobs, ori, scaled).bool().numpy(),
                                  numpy_masks_to_original(blobs.numpy(), ori, scaled))


def test_converted_model_predicts_on_photos_in_its_frame(tmp_path):
    import numpy as np
    from PIL import Image
    import main_infer
    from errors import DataError
    _, out = convert_file(tmp_path, save_published(tmp_path, published_state("mmdet", "solo")),
                          "--input-scale", "64", "128")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(photos / "wide.jpg")
    Image.fromarray(rng.integers(0, 256, (200, 150, 3), dtype=np.uint8)).save(photos / "tall.jpg")
    args = ["--checkpoint", out, "--figures-dir", str(tmp_path / "figures"), "--device", "cpu"]
    result = main_infer.main(main_infer.get_args_parser().parse_args(args + ["--images", str(photos)]))
    assert sorted(os.path.basename(p) for p in result["overlays"]) == ["tall_jpg_infer.png", "wide_jpg_infer.png"]
    with pytest.raises(DataError, match=f"checkpoint {out} is a converted published model: .* --val-data"):
        main_infer.main(main_infer.get_args_parser().parse_args(args))


def test_converted_checkpoint_cannot_be_resumed(tmp_path):
    import main_train
    from errors import CheckpointError
    _, out = convert_file(tmp_path, save_published(tmp_path, published_state("mmdet", "solo")))
    with pytest.raises(CheckpointError, match=f"--resume {out}: a converted published model .* --init-from {out}"):
        main_train.get_args_parser().parse_args(["--resume", out])


def test_checkpoint_backbone_weights_need_a_checkpoint(capsys):
    import main_train
    with pytest.raises(SystemExit):
        main_train.get_args_parser().parse_args(["--backbone-weights", "checkpoint", "--backbone", "resnet101"])
    error = capsys.readouterr().err
    assert "--backbone-weights checkpoint: the backbone's weights come with a SOLO checkpoint" in error


def test_a_converted_file_starts_a_fine_tuning_run(tmp_path, three_images):
    """convert.py's output is what main_train.py --init-from takes: a run on other classes trains from it."""
    import main_train
    from conftest import parse_train
    from test_finetune import COURSE, RUN
    _, out = convert_file(tmp_path, save_published(tmp_path, published_state("authors", "solov2", classes=80)),
                          "--input-scale", "64", "128")
    run_dir = tmp_path / "run"
    main_train.main(parse_train(RUN + ["--data-dir", three_images, "--init-from", out, "--output-dir", str(run_dir),
                                       "--epochs", "1", "--workers", "0"]))
    converted, run = load_checkpoint(out), load_checkpoint(run_dir / "checkpoint.pth")
    assert run["model_cfg"]["class_names"] == COURSE and run["model_cfg"]["arch"] == "solov2"
    assert all(torch.equal(run["model"][k], v) for k, v in converted["model"].items() if k.startswith("backbone."))


def test_converted_model_is_evaluated_on_a_coco_json_in_its_frame(tmp_path):
    """main_infer.py --val-data with a converted checkpoint: the images in mmdetection's frame (a portrait set:
    shorter side 64, padded at the bottom), the mask AP table computed."""
    import main_infer
    from dataset import build_test_split
    from synthetic import CLASS_NAMES_5, write_synthetic_coco
    _, val_json = write_synthetic_coco(tmp_path / "coco", num_images=5, num_classes=3, height=400, width=300,
                                       workers=1)
    path = save_published(tmp_path, published_state("mmdet", "solo"), meta={"CLASSES": CLASS_NAMES_5[:3]})
    _, out = convert_file(tmp_path, path, "--input-scale", "64", "128")
    images = str(tmp_path / "coco" / "images")
    test_set = build_test_split(load_checkpoint(out)["args"], val_data=(val_json, images))
    assert test_set.dataset.scaled_size_of(0) == (85, 64) and test_set[0][0].shape == (3, 96, 64)
    metrics = main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint", out, "--val-data", val_json, images, "--figures-dir", str(tmp_path / "figures"),
         "--device", "cpu", "--workers", "0", "--num-figures", "1"]))
    assert os.path.isfile(metrics["map_json"]) and "AP" in metrics


@pytest.mark.slow
def test_converted_model_exports_and_deploys_in_its_frame(tmp_path):
    """export.py and deploy.py on a converted checkpoint: the ONNX model's overlays of a portrait and a landscape
    photo (mmdetection's frame, padded at the bottom and the right) are main_infer.py's."""
    import numpy as np
    from PIL import Image
    import deploy
    import export
    import main_infer
    from onnx_infer import ExportedSOLO
    state = published_state("mmdet", "solo")
    state["mask_head.conv_cls.bias"].fill_(-1.0)  # scores around 0.27: some cells pass the thresholds
    _, out = convert_file(tmp_path, save_published(tmp_path, state), "--input-scale", "64", "128")
    onnx_path = str(tmp_path / "model.onnx")
    export.main(export.get_args_parser().parse_args(["--checkpoint", out, "--out", onnx_path]))
    meta = ExportedSOLO(onnx_path).meta
    assert meta["data"]["max_long_side"] == 128 and meta["input_height"] == 64
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(photos / "wide.png")
    Image.fromarray(rng.integers(0, 256, (200, 150, 3), dtype=np.uint8)).save(photos / "tall.png")
    deploy.main(deploy.get_args_parser().parse_args(["--model", onnx_path, "--images", str(photos), "--figures-dir",
                                                     str(tmp_path / "onnx"), "--plot-score-thresh", "0"]))
    main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint", out, "--images", str(photos), "--figures-dir", str(tmp_path / "torch"),
         "--plot-score-thresh", "0", "--device", "cpu", "--amp", "off"]))  # float32, as the graph
    for name in ("wide_png_infer.png", "tall_png_infer.png"):
        ours, theirs = (np.asarray(Image.open(tmp_path / folder / name)) for folder in ("onnx", "torch"))
        assert ours.shape == theirs.shape and (ours != theirs).any(-1).mean() < 1e-3, name


def test_a_bad_input_scale_is_named(tmp_path):
    path = save_published(tmp_path, published_state("mmdet", "solo"))
    with pytest.raises(ConversionError, match="--input-scale 100 1333: the shorter side must be a multiple of 32"):
        convert_file(tmp_path, path, "--input-scale", "100", "1333")


def test_mmdetection_1x_class_names_become_cocos_own(tmp_path):
    """The authors' files spell COCO's names as mmdetection 1.x did ('traffic_light'); instances_val2017.json
    has 'traffic light', and main_infer compares the names."""
    state = published_state("authors", "solo", classes=80)
    old_names = tuple(name.replace(" ", "_") for name in COCO_CLASSES)
    result, _ = convert_file(tmp_path, save_published(tmp_path, state, meta={"CLASSES": old_names}))
    assert result["model_cfg"].class_names == COCO_CLASSES


def test_legacy_format_files_with_numpy_metadata_convert(tmp_path):
    """mmdetection's publish_model.py writes the legacy (non-zip) format; its meta may hold numpy scalars; an
    mmengine file keeps its config under meta['cfg']."""
    import numpy as np
    path = os.path.join(tmp_path, "legacy.pth")
    meta = {"seed": np.int64(7), "lr": np.float64(0.01), "cfg": "test_pipeline = [dict(img_scale=(1333, 640))]"}
    torch.save({"meta": meta, "state_dict": published_state("mmdet", "solo")}, path,
               _use_new_zipfile_serialization=False)
    assert convert_file(tmp_path, path)[0]["input_scale"] == (640, 1333)
