"""FPN backbones for SOLO (handout section 5, "backbone.py").

The course hands out the backbone of torchvision's COCO-trained Mask R-CNN (`maskrcnn_resnet50_fpn`): a
ResNet-50 body with a 256-channel feature pyramid. `Resnet50Backbone` returns exactly that module
(torchvision's `BackboneWithFPN`); `build_backbone` also offers a small ResNet-18 FPN for fast CPU demos, and the
ResNet-34 and ResNet-101 FPNs of the published SOLO models (convert.py; their weights come with the converted
checkpoint).

Output contract (every backbone here), for an input (bz, 3, H, W) with H and W multiples of 32:
    OrderedDict  "0"    (bz, 256, H/4,  W/4)    stride 4
                 "1"    (bz, 256, H/8,  W/8)    stride 8
                 "2"    (bz, 256, H/16, W/16)   stride 16
                 "3"    (bz, 256, H/32, W/32)   stride 32
                 "pool" (bz, 256, ceil(H/64), ceil(W/64))   stride 64 (max-pool of "3", kernel 1, stride 2)
    e.g. 800x1088 -> 200x272, 100x136, 50x68, 25x34, 13x17.

Weights:
  - pretrained=True (default) loads torchvision's COCO weights (`MaskRCNN_ResNet50_FPN_Weights.COCO_V1`) from
    torchvision's cache, torch.hub.get_dir()/checkpoints/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth, downloading it
    once if it is missing and the network allows; otherwise a WeightsUnavailableError (a RuntimeError) says how
    to get the file. `checkpoint_file` loads the weights from a file you name instead: a full Mask R-CNN state
    dict, a dict whose "backbone" entry is the backbone's state dict (the course's file), or a bare backbone
    state dict.
  - Trained weights are frozen by default (every parameter requires_grad=False, batch norm as torchvision's
    FrozenBatchNorm2d): keep such a backbone in eval mode and call it under torch.no_grad()
    (`backbone_is_frozen` tells). trainable=True fine-tunes it the way torchvision fine-tunes Mask R-CNN:
    ResNet stages layer2-layer4 and the FPN train, the stem, layer1 and the batch-norm statistics stay fixed.
  - pretrained=False gives random weights, which must be trained: ordinary BatchNorm2d (as torchvision builds
    without weights) and every parameter trainable; `eval` only picks the train/eval mode.

Usage:
    from backbone import Resnet50Backbone, build_backbone, backbone_is_frozen
    backbone = Resnet50Backbone()                          # COCO weights, frozen, eval mode
    with torch.no_grad():
        feats = backbone(img)                              # img (bz, 3, 800, 1088) -> feats["0"] (bz, 256, 200, 272)
    backbone = build_backbone("resnet18", pretrained=False)   # small, random, trainable: CPU demos

    python backbone.py                     # output shapes for an 800x1088 input (random weights if none cached)
    python backbone.py --name resnet18     # the same for the ResNet-18 FPN
    python backbone.py --checkpoint FILE   # weights from a file
"""
import argparse
import os
import socket
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from errors import MissingFileError, WeightsUnavailableError

FEATURE_KEYS = ("0", "1", "2", "3", "pool")
FEATURE_STRIDES = (4, 8, 16, 32, 64)
OUT_CHANNELS = 256

COCO_WEIGHTS = MaskRCNN_ResNet50_FPN_Weights.COCO_V1
COCO_FILE_NAME = os.path.basename(COCO_WEIGHTS.url)  # maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth
# ImageNet weights of the ResNet body alone, used only when already cached (the FPN on top is random anyway).
IMAGENET_WEIGHTS = {"resnet18": ResNet18_Weights.IMAGENET1K_V1}
ARCHITECTURES = ("resnet50", "resnet18", "resnet34", "resnet101")
# the bodies whose trained weights come only with a converted published SOLO checkpoint (convert.py)
CHECKPOINT_ONLY = ("resnet34", "resnet101")
FINETUNE_STAGES = 3  # trainable=True on trained weights: layer2-layer4 (+ FPN), torchvision's Mask R-CNN default
DOWNLOAD_TIMEOUT_S = 30  # per socket operation: a stalled download fails instead of hanging


def weights_cache_dir() -> str:
    """torchvision's weight cache, where `COCO_FILE_NAME` is looked for."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def backbone_is_frozen(backbone: nn.Module) -> bool:
    """True when no parameter is trained: keep the backbone in eval mode and call it under torch.no_grad()."""
    return not any(p.requires_grad for p in backbone.parameters())


def _read_torch_file(path: str):
    if not os.path.isfile(path):
        raise MissingFileError(f"backbone weights file {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"backbone weights file {path!r} is not a PyTorch checkpoint that torch.load can read "
                         f"({type(e).__name__}: {e})") from e


def _backbone_state(obj, source: str) -> dict:
    """The backbone's own state dict ("body.*", "fpn.*") out of any accepted layout of a loaded file."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"backbone weights file {source!r} holds a {type(obj).__name__}, not a state dict")
    for key in ("backbone", "model", "state_dict"):  # the course's file; usual training-checkpoint wrappers
        if isinstance(obj.get(key), Mapping):
            return _backbone_state(obj[key], source)
    prefix = "backbone."  # a full Mask R-CNN state dict: keep the backbone's entries, drop the heads'
    if any(isinstance(k, str) and k.startswith(prefix) for k in obj):
        return {k[len(prefix):]: v for k, v in obj.items() if isinstance(k, str) and k.startswith(prefix)}
    return dict(obj)


def _load_trained(backbone: BackboneWithFPN, state: dict, source: str, name: str, eps: float) -> None:
    layouts = ("a maskrcnn_resnet50_fpn state dict, {'backbone': <backbone state dict>} (the course's file), "
               "or a backbone state dict")
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # wrong shapes (another architecture) or entries that are not tensors
        raise ValueError(f"backbone weights file {source!r} does not fit the {name} FPN backbone: {e}") from e
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        raise ValueError(
            f"backbone weights file {source!r} does not hold {name} FPN backbone weights: {len(missing)} missing "
            f"keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). Expected {layouts}.")
    _set_frozen_bn_eps(backbone, eps)


def _set_frozen_bn_eps(backbone: nn.Module, eps: float) -> None:
    for module in backbone.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.eps = eps


def _coco_backbone_state() -> tuple:
    """(path, backbone state dict) of the COCO Mask R-CNN weights: from the cache, else one download attempt."""
    cache_dir = weights_cache_dir()
    path = os.path.join(cache_dir, COCO_FILE_NAME)
    if os.path.isfile(path):
        return path, _backbone_state(_read_torch_file(path), path)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        state = torch.hub.load_state_dict_from_url(COCO_WEIGHTS.url, model_dir=cache_dir, map_location="cpu",
                                                   check_hash=True, weights_only=True)
    except Exception as e:
        raise WeightsUnavailableError(
            f"The COCO-pretrained Mask R-CNN weights are not in torchvision's cache ({path}) and could not be "
            f"downloaded ({type(e).__name__}: {e}). To get them, either\n"
            "  - on a machine with internet run\n"
            "      python -c \"import torchvision; "
            "torchvision.models.detection.maskrcnn_resnet50_fpn(weights='COCO_V1')\"\n"
            f"    and copy the file {COCO_FILE_NAME} it saves (under torch.hub.get_dir()/checkpoints) "
            f"to {cache_dir}/, or\n"
            "  - pass checkpoint_file=FILE (python backbone.py --checkpoint FILE) with a Mask R-CNN state dict, the "
            "course's {'backbone': ...} file or a backbone state dict.\n"
            "pretrained=False gives a randomly initialised backbone instead (it must then be trained).") from e
    finally:
        socket.setdefaulttimeout(old_timeout)
    return path, _backbone_state(state, path)


def build_backbone(name: str = "resnet50", pretrained: bool = True, checkpoint_file: str | None = None,
                   trainable: bool | None = None, device="cpu", eval: bool = True,
                   load_weights: bool = True, weights_in_checkpoint: bool = False) -> BackboneWithFPN:
    """Build a ResNet FPN backbone: backbone(img (bz, 3, H, W)) -> OrderedDict of 5 maps, 256 channels each.

    Args:
        name: "resnet50" (the course's Mask R-CNN backbone), "resnet18" (small, for CPU demos), "resnet34" or
            "resnet101" (the published SOLO models' bodies: trained weights only from checkpoint_file or a SOLO
            checkpoint, load_weights=False).
        pretrained: resnet50: COCO Mask R-CNN weights (cache or download; WeightsUnavailableError when
            neither works). resnet18: ImageNet weights for the ResNet body if already cached, otherwise random
            with a warning (its FPN is random either way). False: random weights.
        checkpoint_file: load the weights from this file instead (see the module docstring for its layouts).
        trainable: None (default) = frozen if the whole backbone has trained weights, trainable otherwise.
            False on trained weights: no parameter requires grad. True on trained weights: layer2-layer4 and
            the FPN train (torchvision's fine-tuning default). A backbone with a random part must be trained,
            so trainable=False is refused there.
        device: where to put the module.
        eval: eval mode if True, train mode otherwise (no effect on a frozen backbone: FrozenBatchNorm2d,
            no dropout). The name follows the course's Resnet50Backbone signature.
        load_weights: False builds the trained backbone's architecture (FrozenBatchNorm2d with torchvision's
            eps 0, same frozen/trainable split) without reading any file: for a SOLO checkpoint that already
            holds the backbone's weights, so inference and resuming need no COCO file.
        weights_in_checkpoint: with load_weights=False, the trained architecture whatever `name` (a converted
            published model's backbone, whose weights its SOLO checkpoint holds: model.py's 'checkpoint' weights).

    Returns:
        torchvision BackboneWithFPN; its output keys are FEATURE_KEYS with strides FEATURE_STRIDES.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {ARCHITECTURES}")
    if weights_in_checkpoint and load_weights:
        raise ValueError("weights_in_checkpoint=True builds the architecture only: pass load_weights=False")
    if pretrained and load_weights and checkpoint_file is None and name in CHECKPOINT_ONLY:
        raise ValueError(f"{name}: no downloadable trained weights here; a {name} FPN gets its weights from a "
                         "converted published SOLO checkpoint (convert.py), from checkpoint_file, or is random "
                         "(pretrained=False)")
    if checkpoint_file is not None and not pretrained:
        raise ValueError(f"checkpoint_file={checkpoint_file!r} gives trained weights but pretrained=False asks for "
                         "random ones: drop one of the two")

    source = state = None
    if not load_weights and (checkpoint_file is not None or weights_in_checkpoint or
                             (pretrained and name == "resnet50")):
        source, state, eps = "<architecture only>", {}, 0.0
    elif checkpoint_file is not None:
        source = str(checkpoint_file)
        state = _backbone_state(_read_torch_file(source), source)
        # The course's and torchvision's files come from FrozenBatchNorm2d models with eps 0 (torchvision's
        # overwrite_eps); a file saved from an ordinary BatchNorm2d model (num_batches_tracked entries) used 1e-5.
        eps = 1e-5 if any(k.endswith("num_batches_tracked") for k in state) else 0.0
    elif pretrained and name == "resnet50":
        source, state = _coco_backbone_state()
        eps = 0.0  # as torchvision does for COCO_V1

    if state is not None:
        trainable = bool(trainable)  # None -> frozen
        backbone = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=FrozenBatchNorm2d,
                                       trainable_layers=FINETUNE_STAGES if trainable else 0)
        if load_weights:
            _load_trained(backbone, state, source, name, eps)
        else:
            _set_frozen_bn_eps(backbone, eps)
        if not trainable:
            backbone.requires_grad_(False)  # the FPN too, which trainable_layers=0 leaves trainable
    else:
        if trainable is False:
            raise ValueError(f"trainable=False with random weights ({name}, pretrained={pretrained}): a random "
                             "backbone must be trained")
        imagenet = IMAGENET_WEIGHTS.get(name) if pretrained else None
        if imagenet is not None and not os.path.isfile(
                os.path.join(weights_cache_dir(), os.path.basename(imagenet.url))):
            warnings.warn(f"{name}: ImageNet weights are not cached in {weights_cache_dir()}; using random weights")
            imagenet = None
        if imagenet is not None:  # cached: torchvision loads it without downloading; BN frozen, stem + layer1 fixed
            backbone = resnet_fpn_backbone(backbone_name=name, weights=imagenet, trainable_layers=FINETUNE_STAGES)
        else:  # torchvision's choice without weights: ordinary batch norm, everything trainable
            backbone = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=nn.BatchNorm2d,
                                           trainable_layers=5)
    backbone.to(device)
    backbone.train(not eval)
    return backbone


def Resnet50Backbone(checkpoint_file=None, device="cpu", eval=True, pretrained=True, trainable=None):
    """The course's backbone: the `.backbone` of torchvision's COCO-trained maskrcnn_resnet50_fpn.

    Same as build_backbone("resnet50", ...): frozen COCO weights by default, from torchvision's cache or
    `checkpoint_file`; pretrained=False for random trainable weights.
    """
    return build_backbone("resnet50", pretrained=pretrained, checkpoint_file=checkpoint_file,
                          trainable=trainable, device=device, eval=eval)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Print the FPN backbone's output shapes for one input.")
    parser.add_argument("--name", default="resnet50", type=str, choices=ARCHITECTURES, help="backbone")
    parser.add_argument("--checkpoint", default=None, type=str, help="weights file (default: torchvision's cache)")
    parser.add_argument("--random", action="store_true", help="random weights (pretrained=False)")
    parser.add_argument("--height", default=800, type=int, help="input height, a multiple of 32")
    parser.add_argument("--width", default=1088, type=int, help="input width, a multiple of 32")
    return parser


def main(args) -> None:
    try:
        backbone = build_backbone(args.name, pretrained=not args.random, checkpoint_file=args.checkpoint)
    except WeightsUnavailableError as e:
        print(f"note: {e}\nnote: using random weights instead\n")
        backbone = build_backbone(args.name, pretrained=False)
    n_params = sum(p.numel() for p in backbone.parameters())
    n_train = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    print(f"{args.name} FPN: {n_params / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M trainable, "
          f"frozen={backbone_is_frozen(backbone)}")

    img = torch.randn(1, 3, args.height, args.width)  # (1, 3, H, W)
    with torch.no_grad():
        feats = backbone(img)  # OrderedDict key -> (1, 256, H/stride, W/stride)
    print(f"input {tuple(img.shape)}")
    for (key, feat), stride in zip(feats.items(), FEATURE_STRIDES):
        print(f"  {key:>4}  stride {stride:2d}  {tuple(feat.shape)}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
