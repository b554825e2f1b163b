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
import time

from errors import ExportError, run_script
from onnx_export import OPSET, check_export, export_checkpoint

CHECK_TOLERANCE = 1e-3  # the largest difference of an output from PyTorch's that --check accepts


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
    meta = export_checkpoint(args.checkpoint, args.out, args.opset)
    print(f"wrote {args.out} ({meta['arch']} head, {len(meta['class_names'])} classes, input height "
          f"{meta['input_height']}) in {time.perf_counter() - start:.0f} s")
    if not args.no_check:
        worst = check_export(args.out, args.checkpoint)
        print(f"onnxruntime against PyTorch, batches of 1 and 3 at 128x192 and 160x224: largest difference "
              f"{worst:.2e}")
        if not worst <= CHECK_TOLERANCE:
            raise ExportError(f"{args.out}: onnxruntime's outputs differ from PyTorch's by {worst:.2e}, more than "
                              f"{CHECK_TOLERANCE:g}; the exported graph does not compute this model")


if __name__ == "__main__":
    run_script(main, get_args_parser())
