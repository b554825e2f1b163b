"""Export a trained SOLO checkpoint (any head) to ONNX, for inference without PyTorch (deploy.py, onnx_infer.py).

  python export.py --checkpoint checkpoints/demo/checkpoint.pth --out model.onnx      # checked by onnxruntime
  python deploy.py --model model.onnx --images my_photos/                          # then, no PyTorch needed

The graph (opset 18, torch.onnx's dynamo exporter) is the network up to what post-processing needs, batch size and
input size dynamic:
  input   image        float32 (batch, 3, H, W): normalised, zero-padded right/bottom, H and W multiples of 32
                       from 64 to 2048 (imagefiles.photo_input makes it from a photo)
  outputs cate_l       (batch, S_l, S_l, C-1) category probabilities after points NMS, for the FPN levels l = 0..4
          and the mask inputs of the head:
            solo       mask_feat_l (batch, c, H_l, W_l) the mask tower's features of level l, and the level's 1x1
                       output conv as constants mask_weight_l (S_l^2, c), mask_bias_l (S_l^2,)
            decoupled  mask_xy_l (batch, 2 S_l, 2 H_l, 2 W_l): the S sigmoid(X_j) maps, then the S sigmoid(Y_i)
            solov2     kernel_l (batch, E, S_l, S_l) the dynamic kernels, and mask_feat (batch, E, H/4, W/4)
The model's metadata (key "solo", json) holds what post-processing needs besides: head, class names, grids,
strides, input height, the post-processing settings (the handout's and the mAP ones) and the training run's data
settings, so that deploy.py can rebuild the test split.
"""
import argparse
import contextlib
import io
import json
import logging
import sys
import time
import warnings

import numpy as np
import torch

from dataset import DATA_SETTINGS
from solo_head import POSTPROCESS_HANDOUT, POSTPROCESS_MAP, DecoupledSOLOHead, SOLOv2Head
from utils import CheckpointError, error_message, load_checkpoint, load_model, model_config, stored_settings

OPSET = 18
MAX_SIDE = 2048  # the largest input side the exported graph admits (a multiple of 32)
CHECK_TOLERANCE = 1e-3  # the largest difference of an output from PyTorch's that --check accepts


class ExportError(RuntimeError):
    """The exported graph does not reproduce the model."""


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


def export(checkpoint_path, out_path, opset=OPSET):
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
    height, width = (torch.export.Dim(name, min=2, max=MAX_SIDE // 32) for name in ("height32", "width32"))
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


def check(model_path, checkpoint_path, sizes=((1, 128, 192), (3, 160, 224))):
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


def get_args_parser():
    parser = argparse.ArgumentParser(description="Export a SOLO checkpoint to ONNX (inference without PyTorch)")
    parser.add_argument("--checkpoint", required=True, type=str, help="the checkpoint to export")
    parser.add_argument("--out", default="model.onnx", type=str, help="the ONNX file to write")
    parser.add_argument("--opset", default=OPSET, type=int, help="ONNX opset")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing onnxruntime's outputs with PyTorch's on two random inputs")
    return parser


def main(args):
    start = time.perf_counter()
    meta = export(args.checkpoint, args.out, args.opset)
    print(f"wrote {args.out} ({meta['arch']} head, {len(meta['class_names'])} classes, input height "
          f"{meta['input_height']}) in {time.perf_counter() - start:.0f} s")
    if not args.no_check:
        worst = check(args.out, args.checkpoint)
        print(f"onnxruntime against PyTorch, batches of 1 and 3 at 128x192 and 160x224: largest difference "
              f"{worst:.2e}")
        if not worst <= CHECK_TOLERANCE:
            raise ExportError(f"{args.out}: onnxruntime's outputs differ from PyTorch's by {worst:.2e}, more than "
                              f"{CHECK_TOLERANCE:g}; the exported graph does not compute this model")


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (CheckpointError, ExportError, FileNotFoundError) as e:
        sys.exit(f"error: {error_message(e)}")
