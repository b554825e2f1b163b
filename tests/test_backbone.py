"""Specification of backbone.py: output contract, weights (cache, files, offline error), frozen or trainable.

Every test runs offline against an empty, temporary torchvision cache: downloads are blocked by monkeypatching,
so nothing here touches the network or the user's real cache.
"""
import math
import os
import re
import socket
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from backbone import (ARCHITECTURES, COCO_FILE_NAME, FEATURE_KEYS, FEATURE_STRIDES, OUT_CHANNELS, Resnet50Backbone,
                      backbone_is_frozen, build_backbone)
from errors import WeightsUnavailableError

SIZES = [(128, 160), (64, 96)]  # multiples of 32, small enough for the CPU


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    """An empty torch hub dir and a network that refuses at once; returns (hub dir, list of attempted URLs)."""
    hub = tmp_path / "hub"
    attempts = []

    def blocked_download(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("network blocked by the test")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file", blocked_download)
    return hub, attempts


@pytest.fixture(scope="module")
def random_backbones():
    return {name: build_backbone(name, pretrained=False) for name in ARCHITECTURES}


@pytest.fixture(scope="module")
def reference_maskrcnn():
    """A torchvision Mask R-CNN with random weights and non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model.eval()


def expected_shape(height, width, stride):
    # "pool" is a max-pool (kernel 1, stride 2) of the stride-32 map: ceil, not floor
    if stride == 64:
        return (1, OUT_CHANNELS, math.ceil(height / 64), math.ceil(width / 64))
    return (1, OUT_CHANNELS, height // stride, width // stride)


def assert_same_weights(backbone, reference_state):
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, reference_state[key]), key


class TestOutputContract:
    @pytest.mark.parametrize("name", ARCHITECTURES)
    @pytest.mark.parametrize("height,width", SIZES)
    def test_keys_channels_strides(self, random_backbones, name, height, width):
        with torch.no_grad():
            feats = random_backbones[name](torch.randn(1, 3, height, width))
        assert tuple(feats.keys()) == FEATURE_KEYS
        for key, stride in zip(FEATURE_KEYS, FEATURE_STRIDES):
            assert tuple(feats[key].shape) == expected_shape(height, width, stride), key

    def test_800x1088_pool_level(self):
        # the handout's input size: 25x34 at stride 32, so the stride-64 level is 13x17
        assert expected_shape(800, 1088, 64) == (1, 256, 13, 17)
        assert expected_shape(800, 1088, 4) == (1, 256, 200, 272)

    def test_unknown_name(self):
        with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
            build_backbone("vgg16", pretrained=False)


class TestRandomWeights:
    @pytest.mark.parametrize("name", ARCHITECTURES)
    def test_trainable_with_batchnorm(self, random_backbones, name):
        backbone = random_backbones[name]
        assert all(p.requires_grad for p in backbone.parameters())
        assert not backbone_is_frozen(backbone)
        assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())

    def test_gradients_reach_the_stem(self):
        backbone = build_backbone("resnet18", pretrained=False, eval=False)
        feats = backbone(torch.randn(2, 3, 64, 96))
        sum(f.sum() for f in feats.values()).backward()
        assert backbone.body.conv1.weight.grad.abs().sum() > 0

    def test_same_modules_as_torchvision_without_weights(self, random_backbones, reference_maskrcnn):
        # torchvision builds maskrcnn_resnet50_fpn without weights with BatchNorm2d, everything trainable
        fresh = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone
        ours = random_backbones["resnet50"]
        assert [type(m) for m in ours.modules()] == [type(m) for m in fresh.modules()]
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
            {k: v.shape for k, v in fresh.state_dict().items()}

    @pytest.mark.parametrize("eval_mode", [True, False])
    def test_eval_flag_sets_mode_only(self, eval_mode):
        backbone = build_backbone("resnet18", pretrained=False, eval=eval_mode)
        assert backbone.training is not eval_mode
        assert not backbone_is_frozen(backbone)

    def test_random_backbone_cannot_be_frozen(self):
        with pytest.raises(ValueError, match="must be trained"):
            build_backbone("resnet50", pretrained=False, trainable=False)

    def test_resnet18_pretrained_without_cache_warns_and_is_random(self, offline_cache):
        with pytest.warns(UserWarning, match="ImageNet weights are not cached"):
            backbone = build_backbone("resnet18", pretrained=True)
        assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
        assert not backbone_is_frozen(backbone)
        assert offline_cache[1] == []  # no download attempted


class TestPretrainedWeights:
    def test_offline_without_cache_raises_clear_error(self, offline_cache):
        hub, attempts = offline_cache
        timeout = socket.getdefaulttimeout()
        with pytest.raises(WeightsUnavailableError) as info:
            build_backbone("resnet50", pretrained=True)
        message = str(info.value)
        assert isinstance(info.value, RuntimeError)
        assert COCO_FILE_NAME in message
        assert str(hub / "checkpoints") in message
        assert "maskrcnn_resnet50_fpn(weights='COCO_V1')" in message
        assert "checkpoint_file" in message and "pretrained=False" in message
        assert "network blocked by the test" in message
        assert len(attempts) == 1 and attempts[0].endswith(COCO_FILE_NAME)
        assert not (hub / "checkpoints" / COCO_FILE_NAME).exists()
        assert socket.getdefaulttimeout() == timeout  # the download timeout is restored

    def test_course_wrapper_raises_the_same(self):
        with pytest.raises(RuntimeError, match=re.escape(COCO_FILE_NAME)):
            Resnet50Backbone()

    def test_cached_coco_file_is_used_and_frozen(self, offline_cache, reference_maskrcnn):
        hub, attempts = offline_cache
        (hub / "checkpoints").mkdir(parents=True)
        torch.save(reference_maskrcnn.state_dict(), hub / "checkpoints" / COCO_FILE_NAME)
        backbone = Resnet50Backbone()
        assert attempts == []
        assert_same_weights(backbone, reference_maskrcnn.backbone.state_dict())
        assert backbone_is_frozen(backbone) and not backbone.training
        frozen_bns = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
        assert frozen_bns and all(m.eps == 0.0 for m in frozen_bns)  # torchvision's overwrite_eps for COCO_V1
        assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
        feats = backbone(torch.randn(1, 3, 64, 96))
        assert not any(f.requires_grad for f in feats.values())


class TestCheckpointFile:
    @pytest.mark.parametrize("layout", ["maskrcnn", "course_backbone_key", "bare", "model_wrapper"])
    def test_layouts_load_the_same_weights(self, tmp_path, reference_maskrcnn, layout):
        full = reference_maskrcnn.state_dict()
        bare = reference_maskrcnn.backbone.state_dict()
        content = {"maskrcnn": full, "course_backbone_key": {"backbone": bare}, "bare": bare,
                   "model_wrapper": {"model": full, "epoch": 3}}[layout]
        path = tmp_path / "weights.pth"
        torch.save(content, path)
        backbone = Resnet50Backbone(checkpoint_file=str(path))
        assert_same_weights(backbone, bare)
        assert backbone_is_frozen(backbone) and not backbone.training

    def test_outputs_match_the_source_model(self, tmp_path, reference_maskrcnn):
        # a BatchNorm2d model's file keeps its eps (1e-5), so the frozen copy computes the same features
        path = tmp_path / "maskrcnn.pth"
        torch.save(reference_maskrcnn.state_dict(), path)
        backbone = Resnet50Backbone(checkpoint_file=path)
        img = torch.randn(1, 3, 64, 96)
        with torch.no_grad():
            ours, theirs = backbone(img), reference_maskrcnn.backbone(img)
        for key in FEATURE_KEYS:  # features reach ~400 here: compare relative to their norm
            assert (ours[key] - theirs[key]).norm() <= 1e-5 * theirs[key].norm(), key

    def test_frozen_batchnorm_file_gets_eps_zero(self, tmp_path, reference_maskrcnn):
        path = tmp_path / "weights.pth"
        torch.save(reference_maskrcnn.state_dict(), path)
        frozen_state = Resnet50Backbone(checkpoint_file=path).state_dict()  # no num_batches_tracked entries
        torch.save({"backbone": frozen_state}, path)
        backbone = Resnet50Backbone(checkpoint_file=path)
        assert all(m.eps == 0.0 for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d))

    def test_trainable_fine_tunes_layer2_to_fpn(self, tmp_path, reference_maskrcnn):
        path = tmp_path / "weights.pth"
        torch.save({"backbone": reference_maskrcnn.backbone.state_dict()}, path)
        backbone = Resnet50Backbone(checkpoint_file=path, trainable=True, eval=False)
        assert not backbone_is_frozen(backbone) and backbone.training
        for name, p in backbone.named_parameters():
            trains = name.startswith(("body.layer2", "body.layer3", "body.layer4", "fpn."))
            assert p.requires_grad == trains, name
        assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())

    def test_resnet18_checkpoint(self, tmp_path, random_backbones):
        path = tmp_path / "r18.pth"
        state = random_backbones["resnet18"].state_dict()
        torch.save(state, path)
        backbone = build_backbone("resnet18", checkpoint_file=path)
        assert_same_weights(backbone, state)
        assert backbone_is_frozen(backbone)

    def test_resnet18_cached_imagenet_body(self, offline_cache):
        hub, attempts = offline_cache
        (hub / "checkpoints").mkdir(parents=True)
        body = torchvision.models.resnet18()
        torch.save(body.state_dict(), hub / "checkpoints" / "resnet18-f37072fd.pth")
        backbone = build_backbone("resnet18", pretrained=True)
        assert attempts == []
        assert torch.equal(backbone.body.conv1.weight, body.conv1.weight)
        assert not backbone.body.conv1.weight.requires_grad and backbone.fpn.inner_blocks[0][0].weight.requires_grad
        assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())

    def test_wrong_keys_name_the_file(self, tmp_path):
        path = tmp_path / "other.pth"
        torch.save({"classifier.weight": torch.zeros(3)}, path)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*missing keys"):
            Resnet50Backbone(checkpoint_file=str(path))

    def test_other_architecture_names_the_file(self, tmp_path, random_backbones):
        path = tmp_path / "r18.pth"
        torch.save(random_backbones["resnet18"].state_dict(), path)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            Resnet50Backbone(checkpoint_file=str(path))

    def test_not_a_torch_file_names_the_file(self, tmp_path):
        path = tmp_path / "notes.txt"
        path.write_text("not a checkpoint")
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a PyTorch checkpoint"):
            Resnet50Backbone(checkpoint_file=str(path))

    def test_not_a_state_dict_names_the_file(self, tmp_path):
        path = tmp_path / "tensor.pth"
        torch.save(torch.zeros(3), path)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a state dict"):
            Resnet50Backbone(checkpoint_file=str(path))

    def test_missing_file_names_the_file(self, tmp_path):
        path = os.path.join(tmp_path, "absent.pth")
        with pytest.raises(FileNotFoundError, match=re.escape(path)):
            Resnet50Backbone(checkpoint_file=path)

    def test_checkpoint_with_random_weights_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match="pretrained=False"):
            Resnet50Backbone(checkpoint_file=str(tmp_path / "w.pth"), pretrained=False)
