"""The published COCO-trained SOLO checkpoints (mmdetection 2.x/3.x model zoo; the SOLO authors' mmdetection 1.x
files): their parameter names mapped onto this project's SOLO, with the architecture read from the file.

Both codebases build the same layers as ours under other names (read in their repositories: mmdetection's
mmdet/models/dense_heads/solo_head.py, decoupled_solo_head.py, solov2_head.py, necks/fpn.py, backbones/resnet.py;
WXinlong/SOLO's mmdet/models/anchor_heads/*solo*_head.py and mask_heads/mask_feat_head.py):

    theirs (mmdetection 2.x/3.x | the authors' 1.x)              ours
    backbone.<ResNet>                                             backbone.body.<the same names>
    neck.lateral_convs.i.conv / neck.fpn_convs.i.conv             backbone.fpn.inner_blocks.i.0 / layer_blocks.i.0
    mask_head. | bbox_head.  cls_convs | cate_convs  .i.conv/.gn  head.cate_convs.i.0 / .1  (conv, GroupNorm)
                             conv_cls | solo_cate (dsolo_cate)    head.cate_out
    SOLO:                    mask_convs | ins_convs               head.ins_convs
                             conv_mask_list | solo_ins_list .l    head.ins_out_list.l
    Decoupled SOLO:          mask_convs_x | ins_convs_x (and _y)  head.ins_convs_x (and _y)
                             conv_mask_list_x | dsolo_ins_list_x  head.ins_out_x (and _y)
    SOLOv2:                  kernel_convs, conv_kernel | solo_kernel   head.kernel_convs, head.kernel_out
      mask_head.mask_feature_head. | mask_feat_head.
                             convs_all_levels.i.conv<j>           head.mask_feat_branch.levels.i.<2j>
                             conv_pred | conv_pred.0              head.mask_feat_branch.out

Their ResNets use BatchNorm with eps 1e-5, frozen at inference; ours holds a converted backbone in
FrozenBatchNorm2d with eps 0, so the eps is folded into running_var (the same arithmetic: (var + 1e-5) + 0).
Deformable-convolution (DCN) variants, ResNeXt bodies and the Decoupled SOLO light head are refused by name.
"""
import importlib
import math
import os
import re
import warnings

import numpy as np
import torch

from checkpoint import without_module_prefix
from errors import CheckpointError, MissingFileError

# mmdetection's and the authors' ResNet and GroupNorm layers: BatchNorm2d's default eps
THEIR_BN_EPS = 1e-5
# the grids of every published file (SOLOv2's weights do not tell them; SOLO's and Decoupled SOLO's do)
PUBLISHED_GRIDS = (40, 36, 24, 16, 12)
# their test-time resize (mmdetection's Resize keep_ratio: shorter side, longer side at most), (short, long)
TEST_SCALE = (800, 1333)
LIGHT_TEST_SCALE = (448, 768)  # the SOLOv2 light models' (mmdetection's and the authors' 448 ones)
# ResNet depth from (bottleneck blocks?, blocks in layer3)
RESNET_DEPTHS = {(False, 2): 18, (False, 6): 34, (True, 6): 50, (True, 23): 101}

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")

# The two naming schemes: the head's prefix and its layers' names (a dict where a name differs by head: the
# authors call Decoupled SOLO's category output dsolo_cate).
SCHEMES = {
    "mmdetection 2.x/3.x": dict(
        head="mask_head.", feat_head="mask_head.mask_feature_head.", conv_pred=r"conv_pred",
        names=dict(cate_tower="cls_convs", cate_out="conv_cls", solo_tower="mask_convs",
                   solo_out="conv_mask_list", x_tower="mask_convs_x", y_tower="mask_convs_y",
                   x_out="conv_mask_list_x", y_out="conv_mask_list_y", kernel_tower="kernel_convs",
                   kernel_out="conv_kernel")),
    "the SOLO authors' (mmdetection 1.x)": dict(
        head="bbox_head.", feat_head="mask_feat_head.", conv_pred=r"conv_pred\.0",
        names=dict(cate_tower="cate_convs", cate_out=dict(solo="solo_cate", decoupled="dsolo_cate",
                                                         solov2="solo_cate"), solo_tower="ins_convs",
                   solo_out="solo_ins_list", x_tower="ins_convs_x", y_tower="ins_convs_y",
                   x_out="dsolo_ins_list_x", y_out="dsolo_ins_list_y", kernel_tower="kernel_convs",
                   kernel_out="solo_kernel")),
}
OURS = dict(cate_tower="cate_convs", cate_out="cate_out", solo_tower="ins_convs", solo_out="ins_out_list",
            x_tower="ins_convs_x", y_tower="ins_convs_y", x_out="ins_out_x", y_out="ins_out_y",
            kernel_tower="kernel_convs", kernel_out="kernel_out")
HEAD_LAYERS = dict(solo=("cate_tower", "cate_out", "solo_tower", "solo_out"),
                   decoupled=("cate_tower", "cate_out", "x_tower", "y_tower", "x_out", "y_out"),
                   solov2=("cate_tower", "cate_out", "kernel_tower", "kernel_out"))
TOWERS = ("cate_tower", "solo_tower", "x_tower", "y_tower", "kernel_tower")


class ConversionError(CheckpointError):
    """A published checkpoint that cannot be converted: the message names the file and the key."""


def state_dict_of(obj, source):
    """The state dict of a loaded published file: {'state_dict': ...} (mmdetection's runner) or a bare one; a
    'module.' prefix (a model saved from DataParallel) is dropped."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                      for k, v in obj.items()):
        raise ConversionError(f"{source}: not a model checkpoint (expected a dict of tensors, or one under "
                              f"'state_dict', as mmdetection saves them)")
    return without_module_prefix(obj)


def class_names_of(obj, num_classes):
    """The class names a published file stores (mmdetection 1.x/2.x meta['CLASSES'], 3.x
    meta['dataset_meta']['classes']), else COCO's 80 when it has 80 classes, else class_1, class_2, ...
    COCO's names as mmdetection 1.x spells them ('traffic_light') become COCO's own ('traffic light', the names
    instances_val2017.json has)."""
    meta = obj.get("meta") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    names = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
    if names and len(names) == num_classes and all(isinstance(n, str) for n in names):
        if tuple(n.replace("_", " ") for n in names) == COCO_CLASSES:
            return COCO_CLASSES
        return tuple(names)
    if num_classes == len(COCO_CLASSES):
        return COCO_CLASSES
    return tuple(f"class_{k}" for k in range(1, num_classes + 1))


def test_scale_of(obj, fields):
    """(shorter side, longer side at most) of the file's test-time resize: read off the config text mmdetection
    stores in meta['config'] (mmengine: meta['cfg']; its test pipeline's img_scale), else the published one for
    the model whose architecture() fields these are (the SOLOv2 light models: 2 convs per tower, E 128)."""
    meta = (obj.get("meta") if isinstance(obj, dict) else None) or {}
    config = meta.get("config") or meta.get("cfg") or "" if isinstance(meta, dict) else ""
    config = config if isinstance(config, str) else ""
    test = config[config.find("test_pipeline"):] if "test_pipeline" in config else ""
    match = re.search(r"img_scale\s*=\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)", test)
    if match:
        a, b = int(match.group(1)), int(match.group(2))
        return min(a, b), max(a, b)
    light = fields["arch"] == "solov2" and (fields["stacked_convs"], fields.get("mask_feat_channels")) == (2, 128)
    return LIGHT_TEST_SCALE if light else TEST_SCALE


def scheme_of(state, source):
    """The naming scheme of a published state dict, from its head's prefix."""
    for name, scheme in SCHEMES.items():
        if any(k.startswith(scheme["head"]) for k in state):
            return name
    raise ConversionError(f"{source}: no SOLO head found: no key starts with 'mask_head.' (mmdetection 2.x/3.x) or "
                          f"'bbox_head.' (the SOLO authors' mmdetection 1.x); its keys start with "
                          f"{sorted({k.split('.')[0] for k in state})}")


def refuse_unsupported(state, source, head):
    """ConversionError for the variants this project does not build: DCN, ResNeXt, Decoupled SOLO light."""
    offsets = [k for k in state if "conv_offset" in k]
    if offsets:
        raise ConversionError(f"{source}: a deformable-convolution (DCN) model (e.g. key {offsets[0]!r}); this "
                              f"project builds the plain-convolution models only: use the file without 'dcn' in "
                              f"its name")
    conv2 = state.get("backbone.layer1.0.conv2.weight")
    if conv2 is not None and conv2.shape[0] != conv2.shape[1]:
        raise ConversionError(f"{source}: a grouped-convolution body (ResNeXt: backbone.layer1.0.conv2.weight is "
                              f"{tuple(conv2.shape)}); only ResNet-18/34/50/101 bodies are supported")
    light = [k for k in state if re.match(r"(mask_head|bbox_head)\.(mask_convs|ins_convs)\.", k)]
    if head == "decoupled" and light:
        raise ConversionError(f"{source}: a Decoupled SOLO light head (one mask tower shared by X and Y, key "
                              f"{light[0]!r}); this project builds Decoupled SOLO's two towers only")


def layer_name(scheme, layer, head):
    """Their name of one of our layers (OURS' keys) in a scheme, for a head."""
    name = SCHEMES[scheme]["names"][layer]
    return name[head] if isinstance(name, dict) else name


def head_of(state, scheme, source):
    """'solo', 'decoupled' or 'solov2', from the head's output layers."""
    prefix, names = SCHEMES[scheme]["head"], SCHEMES[scheme]["names"]
    for head, layer in (("decoupled", "x_out"), ("solov2", "kernel_out"), ("solo", "solo_out")):
        if any(k.startswith(f"{prefix}{names[layer]}.") for k in state):
            return head
    raise ConversionError(f"{source}: a head with none of SOLO's, Decoupled SOLO's or SOLOv2's mask outputs "
                          f"({prefix}{names['solo_out']}, {names['x_out']} or {names['kernel_out']})")


def _shape(state, key, source):
    if key not in state:
        raise ConversionError(f"{source}: key {key!r} is missing")
    return tuple(state[key].shape)


def _count(state, pattern):
    """How many consecutive indices i have a key matching pattern.format(i)."""
    i = 0
    while any(re.fullmatch(pattern.format(i), k) for k in state):
        i += 1
    return i


def architecture(state, source):
    """The ModelConfig fields a published state dict determines: arch, backbone, num_classes, seg_feat_channels,
    stacked_convs, num_grids, mask_feat_channels; and the naming scheme."""
    scheme = scheme_of(state, source)
    head = head_of(state, scheme, source)
    refuse_unsupported(state, source, head)
    prefix, names = SCHEMES[scheme]["head"], SCHEMES[scheme]["names"]
    bottleneck = "backbone.layer1.0.conv3.weight" in state
    blocks = _count(state, r"backbone\.layer3\.{}\.conv1\.weight")
    depth = RESNET_DEPTHS.get((bottleneck, blocks))
    if depth is None:
        raise ConversionError(f"{source}: a ResNet body with {blocks} {'bottleneck' if bottleneck else 'basic'} "
                              f"blocks in layer3 (backbone.layer3.*); ResNet-18, 34, 50 and 101 are supported")
    cate_out = f"{prefix}{layer_name(scheme, 'cate_out', head)}.weight"
    num_classes = _shape(state, cate_out, source)[0] + 1
    stacked_convs = _count(state, re.escape(f"{prefix}{names['cate_tower']}.") + r"{}\.conv\.weight")
    seg_feat_channels = _shape(state, f"{prefix}{names['cate_tower']}.0.conv.weight", source)[0]
    fields = dict(arch=head, backbone=f"resnet{depth}", num_classes=num_classes, stacked_convs=stacked_convs,
                  seg_feat_channels=seg_feat_channels)
    if head == "solo":
        levels = _count(state, re.escape(f"{prefix}{names['solo_out']}.") + r"{}\.weight")
        fields["num_grids"] = tuple(math.isqrt(_shape(state, f"{prefix}{names['solo_out']}.{i}.weight", source)[0])
                                    for i in range(levels))
    elif head == "decoupled":
        levels = _count(state, re.escape(f"{prefix}{names['x_out']}.") + r"{}\.weight")
        fields["num_grids"] = tuple(_shape(state, f"{prefix}{names['x_out']}.{i}.weight", source)[0]
                                    for i in range(levels))
    else:
        fields["num_grids"] = PUBLISHED_GRIDS
        fields["mask_feat_channels"] = _shape(state, f"{prefix}{names['kernel_out']}.weight", source)[0]
    return scheme, fields


def rename_rules(scheme, head):
    """[(compiled pattern of their key, replacement giving ours)] for a scheme and head."""
    spec = SCHEMES[scheme]
    head_prefix = re.escape(spec["head"])
    rules = [(r"backbone\.(.+)", r"backbone.body.\1"),
             (r"neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)", r"backbone.fpn.inner_blocks.\1.0.\2"),
             (r"neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)", r"backbone.fpn.layer_blocks.\1.0.\2")]
    for layer in HEAD_LAYERS[head]:
        theirs, ours = f"{head_prefix}{re.escape(layer_name(scheme, layer, head))}", f"head.{OURS[layer]}"
        if layer in TOWERS:  # ConvModule: .conv (no bias: GN follows) and .gn -> our Sequential's 0 and 1
            rules += [(theirs + r"\.(\d+)\.conv\.weight", ours + r".\1.0.weight"),
                      (theirs + r"\.(\d+)\.gn\.(weight|bias)", ours + r".\1.1.\2")]
        elif layer == "cate_out" or layer == "kernel_out":
            rules.append((theirs + r"\.(weight|bias)", ours + r".\1"))
        else:  # one output conv per level
            rules.append((theirs + r"\.(\d+)\.(weight|bias)", ours + r".\1.\2"))
    if head == "solov2":
        feat = re.escape(spec["feat_head"])
        rules += [(feat + r"convs_all_levels\.(\d+)\.conv(\d+)\.conv\.weight", _level_conv("0.weight")),
                  (feat + r"convs_all_levels\.(\d+)\.conv(\d+)\.gn\.(weight|bias)", _level_conv("1.{}")),
                  (feat + spec["conv_pred"] + r"\.conv\.weight", "head.mask_feat_branch.out.0.weight"),
                  (feat + spec["conv_pred"] + r"\.gn\.(weight|bias)", r"head.mask_feat_branch.out.1.\1")]
    return [(re.compile(pattern), ours) for pattern, ours in rules]


def _level_conv(part):
    """Their mask-feature level i's conv j is our level i's Sequential entry 2j (each conv is followed by its x2
    upsampling there, as in theirs)."""
    def replace(match):
        last = part.format(match.group(3)) if "{}" in part else part
        return f"head.mask_feat_branch.levels.{match.group(1)}.{2 * int(match.group(2))}.{last}"
    return replace


def convert_state(state, scheme, head, expected, source):
    """Their state dict -> ours: every tensor renamed by the scheme's rules, the BatchNorm eps folded into
    running_var, num_batches_tracked dropped. `expected` is our model's state dict (names and shapes).
    ConversionError naming the key for a key no rule knows, a shape that does not fit, or a key ours needs that
    the file lacks."""
    rules = rename_rules(scheme, head)
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        ours = next((pattern.sub(repl, key) for pattern, repl in rules if pattern.fullmatch(key)), None)
        if ours is None or ours not in expected:
            raise ConversionError(f"{source}: unexpected key {key!r} for a {scheme} {head} model"
                                  + (f" (it would be our {ours!r}, which this architecture does not have)" if ours
                                     else " (no layer of ours uses it)"))
        if tuple(value.shape) != tuple(expected[ours].shape):
            raise ConversionError(f"{source}: key {key!r} has shape {tuple(value.shape)}, expected "
                                  f"{tuple(expected[ours].shape)} (our {ours}) for the architecture the file's other "
                                  f"layers give")
        if key.startswith("backbone.") and key.endswith("running_var"):
            value = value + THEIR_BN_EPS  # our FrozenBatchNorm2d of a converted backbone has eps 0
        out[ours] = value.detach().to(expected[ours].dtype).clone()
    missing = [k for k in expected if k not in out]
    if missing:
        raise ConversionError(f"{source}: {len(missing)} weights missing for a {scheme} {head} model, e.g. our "
                              f"{missing[0]!r} (no key of the file maps to it)")
    return out


def read_published(path):
    """The object a published .pth file holds, read without running pickled code (torch.load weights_only, in
    the zip format or the legacy one mmdetection's publish_model.py writes). Their meta may hold numpy scalars:
    numpy's scalar and dtype classes, and only those, are allowed as well."""
    if not os.path.isfile(path):
        raise MissingFileError(f"published checkpoint {path!r}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        error = e
    try:
        with torch.serialization.safe_globals(numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        pass
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ConversionError(f"published checkpoint {path!r} cannot be read as a PyTorch checkpoint without running "
                          f"code it holds ({type(error).__name__}: {reason})")


def numpy_globals():
    """What a pickled numpy scalar needs: numpy's scalar reconstructor, np.dtype and its dtype classes."""
    scalar = _numpy_global("numpy._core.multiarray.scalar") or _numpy_global("numpy.core.multiarray.scalar")
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [np.dtype, *dtypes] + ([scalar] if scalar is not None else [])


def _numpy_global(name):
    """The numpy object a pickle names ("numpy._core.multiarray.scalar"), or None where this numpy lacks it."""
    module, _, attr = name.rpartition(".")
    try:
        with warnings.catch_warnings():  # numpy 2 warns on importing numpy.core
            warnings.simplefilter("ignore")
            return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
