"""Exporting a SOLO model to ONNX: the graph (SOLO.forward(eval=True) with flat outputs), its output names, its
metadata, the export itself and the check of onnxruntime's outputs against PyTorch's. export.py is the command;
docs/deploy.md describes the exported model's inputs and outputs."""
import contextlib
import io
import json
import logging
import sys
import warnings

import numpy as np
import torch

from checkpoint import load_checkpoint, load_model, model_config, stored_settings
from dataset import DATA_SETTINGS
from decoupled_solo_head import DecoupledSOLOHead
from imagefiles import INPUT_MAX_SIDE, INPUT_MIN_SIDE
from solo_head import POSTPROCESS_HANDOUT, POSTPROCESS_MAP
from solov2_head import SOLOv2Head

OPSET = 18


class ExportGraph(torch.nn.Module):
    """SOLO.forward(eval=True) with its outputs as one flat tuple, in output_names(head) order."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        cate_pred_list, ins_pred_list = self.model(image, eval=True)
        head = self.model.head
        if isinstance(head, SOLOv2Head):
            mask = [kernel for kernel, _ in ins_pred_list] + [ins_pred_list[0][1]]
        elif isinstance(head, DecoupledSOLOHead):
            mask = list(ins_pred_list)
        else:  # the 1x1 output convs as graph outputs (a product with 1 gives each its own node)
            mask = list(ins_pred_list) + [conv.weight.flatten(1) * 1 for conv in head.ins_out_list] + \
                [conv.bias * 1 for conv in head.ins_out_list]
        return tuple(cate_pred_list) + tuple(mask)


def output_names(arch, num_levels=5):
    levels = range(num_levels)
    mask = dict(solo=[f"mask_feat_{l}" for l in levels] + [f"mask_weight_{l}" for l in levels]
                + [f"mask_bias_{l}" for l in levels],
                decoupled=[f"mask_xy_{l}" for l in levels],
                solov2=[f"kernel_{l}" for l in levels] + ["mask_feat"])[arch]
    return [f"cate_{l}" for l in levels] + mask


def metadata(model, arch, data_settings):
    head = model.head
    return dict(arch=arch, class_names=list(head.class_names), num_grids=list(head.seg_num_grids),
                strides=list(head.strides), input_height=data_settings["input_height"],
                postprocess=dict(handout=POSTPROCESS_HANDOUT, map=POSTPROCESS_MAP), data=data_settings)


def export_checkpoint(checkpoint_path, out_path, opset=OPSET):
    """Write the ONNX model of a checkpoint; returns its metadata."""
    checkpoint = load_checkpoint(checkpoint_path)
    arch = model_config(checkpoint, checkpoint_path).arch
    settings = stored_settings(checkpoint, checkpoint_path, DATA_SETTINGS, required=("input_height",))
    model = load_model(checkpoint, source=checkpoint_path)  # eval mode, CPU
    return export_model(model, arch, {k: settings.get(k, v) for k, v in DATA_SETTINGS.items()}, out_path, opset)


def export_model(model, arch, data_settings, out_path, opset=OPSET):
    """Write the ONNX model of a SOLO model (CPU, eval mode) with the run's data settings; returns its metadata."""
    example = torch.zeros(2, 3, 128, 192)
    batch = torch.export.Dim("batch", min=1, max=256)
    height, width = (torch.export.Dim(name, min=INPUT_MIN_SIDE // 32, max=INPUT_MAX_SIDE // 32)
                     for name in ("height32", "width32"))
    meta = metadata(model, arch, data_settings)
    chatter = io.StringIO()  # the exporter's progress lines, warnings and log records, shown only if it fails
    handler = logging.StreamHandler(chatter)  # with a handler, their log records skip logging's last resort
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(ExportGraph(model).eval(), (example,), dynamo=True, opset_version=opset,
                                        input_names=["image"], output_names=output_names(arch),
                                        dynamic_shapes={"image": {0: batch, 2: 32 * height, 3: 32 * width}})
            program.model.metadata_props["solo"] = json.dumps(meta)
            program.save(out_path)
    except Exception:
        print(chatter.getvalue(), file=sys.stderr)
        raise
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return meta


def check_export(model_path, checkpoint_path, sizes=((1, 128, 192), (3, 160, 224))):
    """The largest absolute difference between onnxruntime's outputs and PyTorch's, over random inputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    graph = ExportGraph(load_model(checkpoint_path)).eval()
    worst = 0.0
    for batch, height, width in sizes:
        image = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = graph(image)
        got = session.run(None, {"image": image.numpy()})
        worst = max([worst] + [float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected)])
    return worst
