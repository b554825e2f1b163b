"""The training step never makes the host wait for the device: engine.train_step (forward, the compact targets,
the loss, backward and the SGD step with gradient clipping) queues its kernels without reading a device value back.

On the CPU nothing waits, so the test watches the operations instead: a TorchDispatchMode records every ATen
call, and the ones that synchronise on CUDA are flagged: reading a scalar (.item(), bool(t), int(t)), nonzero
and the boolean-mask indexing built on it (its output size depends on the data), unique, masked_select and
repeat_interleave without an output size. The only reads allowed are the logged losses, after the step.
"""
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import train_step
from model import ARCHS, build_model

aten = torch.ops.aten
DATA_DEPENDENT = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                  aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
                  aten.repeat_interleave.Tensor, aten.is_nonzero.default, aten.equal.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class SyncRecorder(TorchDispatchMode):
    """Records the ATen calls that would make the host wait for a CUDA device."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DATA_DEPENDENT and not (func == aten.repeat_interleave.Tensor and kwargs.get("output_size")):
            self.syncs.append(str(func))
        if func in INDEXING and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                    for i in args[1] if i is not None):
            self.syncs.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


def batch(seed, bz=2, height=128, width=192):
    """Images and 0-3 rectangle objects per image (an image without objects included)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(bz, 3, height, width, generator=g)
    labels, masks, boxes = [], [], []
    for b in range(bz):
        n = 0 if b == 0 else int(torch.randint(1, 4, (), generator=g))
        mask = torch.zeros(n, height, width)
        box = torch.zeros(n, 4)
        for o in range(n):
            y1, x1 = (int(torch.randint(0, s // 2, (), generator=g)) for s in (height, width))
            h, w = (int(torch.randint(8, s // 2, (), generator=g)) for s in (height, width))
            mask[o, y1:y1 + h, x1:x1 + w] = 1
            box[o] = torch.tensor([x1, y1, x1 + w, y1 + h])
        labels.append(torch.randint(1, 4, (n,), generator=g))
        masks.append(mask)
        boxes.append(box)
    return img, labels, masks, boxes


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    """Every head: SOLO, Decoupled SOLO and SOLOv2."""
    torch.manual_seed(0)
    return build_model(dict(arch=request.param, backbone="resnet18", backbone_weights="none", seg_feat_channels=32,
                            stacked_convs=2, mask_feat_channels=32, num_grids=(12, 10, 8, 6, 4))).train()


def optimizer(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                           weight_decay=1e-4)


def test_training_step_reads_nothing_back_from_the_device(model):
    step_settings = SimpleNamespace(amp=False, input_height=128, clip_grad=35.0)
    scaler, data, sgd = torch.amp.GradScaler("cpu", enabled=False), batch(0), optimizer(model)
    with SyncRecorder() as recorder:
        losses = train_step(model, data, sgd, scaler, torch.device("cpu"), step_settings)
    assert recorder.syncs == []
    assert losses[2].item() > 0  # objects were found: the mask loss ran on positive cells


def test_the_recorder_sees_the_handout_form_synchronise(model):
    # the handout's (S^2,) boolean targets need nonzero / boolean indexing: the check above can fail
    img, labels, masks, boxes = batch(0)
    with SyncRecorder() as recorder:
        cate_pred_list, ins_pred_list = model(img)
        targets = model.head.target(ins_pred_list, boxes, labels, masks)
        model.head.loss(cate_pred_list, ins_pred_list, *targets)[2].backward()
    assert any("nonzero" in s or "boolean" in s for s in recorder.syncs)
