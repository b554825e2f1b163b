"""Benchmark SOLO on whatever device is present: prints one table of timings, headed by the CPU or GPU it ran on.
A benchmark, not a test.

  CPU:  python bench.py --device cpu [--quick]     (several minutes on 2 cores; --quick about a minute)
  GPU:  python bench.py --device cuda [--amp] [--channels-last] [--compile]
  the heads side by side:  python bench.py --heads  (SOLO, Decoupled SOLO, SOLOv2; a few minutes on 2 cores)
  PyTorch against onnxruntime:  python bench.py --onnx  (each head exported and timed at the demo's input and 800x1088)
  another head, or a run's model:  --arch decoupled|solov2, or --checkpoint checkpoints/solov2/checkpoint.pth

Every figure is the median of --repeats runs after --warmup runs (--quick: 1 run, 1 warm-up), timed with
torch.cuda.synchronize() around each phase on CUDA. On the CPU the 800x1088 rows run less often (the top line
says how often). Inputs come from a synthetic dataset (300x400 images, 1-5 objects each) written to a temp dir.
Rows:
  GEMM            the rate of a 2048 x 2048 x 2048 matrix product (2 n^3 FLOPs) in float32 and bfloat16 (and
                  float16 where --amp uses it), timed in the same run: the practical limit of a dtype on this device.
                  The training and inference rows below give their achieved GFLOP/s (FLOPs counted once by
                  torch.utils.flop_counter) as a share of the rate of the dtype they compute in.
  train demo      one training step of the --demo model (random ResNet-18 FPN, 2 x 64-channel towers) at the
                  preset's input size (train_settings.DEMO_DATA), batch 8, as engine.train_step runs it, split into
                  data to device (on CUDA the raw uint8 batch preprocessed there, as main_train.py does), forward,
                  target, loss, backward and optimizer step; the whole step in images/s and the target + loss share
                  of it.
  train 800       the same for the handout's model (ResNet-50 FPN, 7 x 256-channel towers) at 800x1088, batch
                  --batch-800, with RANDOM, trainable backbone weights (no COCO file offline), so the backbone also
                  runs backward. Skipped with --quick.
  target 800      SOLOHead.target for 16 images at 800x1088: the whole batch at once (training) and one image at a
                  time, in ms and in torch operations called (on a GPU each is a kernel launch or a view).
  infer 800       batch 1 at 800x1088 (handout model, eval): backbone, head (forward eval=True), PostProcess with
                  POSTPROCESS_MAP. Random weights give next to no candidates, so made-up category maps with 100 and
                  --candidates (cell, class) scores above the threshold (a trained model's load) are
                  post-processed on the random model's mask features (noise over the whole image) and on
                  object-like blob masks (what a trained model gives), each also as a share of the backbone's
                  forward. Then SOLO.infer on a batch of --infer-batch (skipped with --quick).
  MatrixNMS       500 binary masks of 200x272 (the stride-4 map of 800x1088) as 0/1 floats (PostProcess's form),
                  3 classes, noise and blobs, beside a float32 product of the same masks (flat @ flat.T) timed in
                  the same run.
  data loading    BuildDataset at 800 through BuildDataLoader (2 workers, batch 2) over --data-images images,
                  images/s once the workers are running: preprocessed items (CPU training) and raw uint8 items
                  (GPU training); then the same images written as a COCO-format set (JPEG quality 95, RLE masks)
                  through COCODataset (decoded and preprocessed in the workers, on every device).
  peak memory     torch.cuda.max_memory_allocated on CUDA, else the process's max RSS (every row included).
The training and inference rows use the head of --arch (or of --checkpoint, whose model settings the 800x1088 rows
take). --heads prints instead, for each head, measured in a fresh process each so that the peak memory is its
own: parameters; the demo training step (images/s, peak memory); inference at the demo size and at 800x1088 as
forward(eval=True) plus the masks of 100 candidate cells (cell_masks, the one head-specific step of PostProcess);
forward GFLOPs at 800x1088 of the training outputs and of eval (torch.utils.flop_counter, multiply-adds x 2).
--amp, --channels-last and --compile are the knobs to measure before using: --amp as main_train.py --amp;
--channels-last puts the model in the NHWC layout; --compile compiles the backbone and the head (nn.Module.compile).
"""
import argparse
import math
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from bench_inputs import model_settings, shape_only_preds
from compute_path import autocast, autocast_settings, choose_path, device_name, is_channels_last, memory_format
from datafiles import dataset_paths
from dataset import BuildDataLoader, BuildDataset, COCODataset, course_to_coco
from engine import batch_to_device, optimizer_step
from errors import UserError, error_message
from model import ARCHS, ModelConfig, build_model
from solo_head import POSTPROCESS_MAP, SOLOHead, image_of
from synthetic import write_synthetic_dataset
from train_settings import DEMO, DEMO_ARCH_LR
from utils import build_optimizer, prepare_device, scaled_lr

PHASES = ("data to device", "forward", "target", "loss", "backward and optimizer step")


def get_args_parser():
    parser = argparse.ArgumentParser(description="SOLO benchmark: a table of timings for this device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=str,
                        help="'cuda' or 'cpu'")
    parser.add_argument("--quick", action="store_true",
                        help="1 run per figure, 20 images for data loading, no 800x1088 training step")
    parser.add_argument("--repeats", default=5, type=int, help="timed runs per figure (the median is shown)")
    parser.add_argument("--warmup", default=1, type=int, help="untimed runs before the timed ones")
    parser.add_argument("--amp", action="store_true", help="autocast as main_train.py --amp does")
    parser.add_argument("--channels-last", action="store_true", help="the model in the channels_last layout")
    parser.add_argument("--compile", action="store_true", help="compile the backbone and the head")
    parser.add_argument("--candidates", default=1000, type=int,
                        help="(cell, class) scores above cate_thresh in the second made-up PostProcess rows")
    parser.add_argument("--batch-800", default=2, type=int, help="batch size of the 800x1088 training step")
    parser.add_argument("--infer-batch", default=8, type=int, help="batch size of the batched SOLO.infer row")
    parser.add_argument("--data-images", default=40, type=int, help="images read in the data loading row")
    parser.add_argument("--arch", default=None, choices=ARCHS,
                        help="the head of the training and inference rows (default: --checkpoint's, else solo)")
    parser.add_argument("--checkpoint", default=None, type=str,
                        help="a run's checkpoint: its model settings (head, towers, grids, classes; random weights) "
                             "for the 800x1088 rows and its head for the demo rows")
    parser.add_argument("--heads", action="store_true",
                        help="instead of the table: the heads side by side (parameters, GFLOPs, inference ms, "
                             "training step, peak memory), each measured in a fresh process")
    parser.add_argument("--onnx", action="store_true",
                        help="instead of the table: PyTorch eager against onnxruntime inference for each head at the "
                             "demo size and at 800x1088 (needs requirements-deploy.txt)")
    return parser


def clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait for them before reading the timer
    return time.perf_counter()


def median_ms(fn, device, repeats, warmup):
    """(median wall time of fn() in ms over `repeats` runs after `warmup` untimed ones, the last result)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock(device)
        out = fn()
        times.append(1000 * (clock(device) - start))
    return statistics.median(times), out


class TorchCalls(TorchFunctionMode):
    """Counts the torch operations called inside it: on a GPU each is a kernel launch or a view, several
    microseconds of host time, so their number bounds how fast a step of small operations can go."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def torch_calls(fn):
    with TorchCalls() as calls:
        fn()
    return calls.count


def bench_model(cfg, device, args):
    """A model of cfg on `device`, in channels_last and with its backbone and head compiled if asked."""
    model = build_model(cfg).to(device, memory_format=memory_format(args.channels_last))
    if args.compile:
        model.backbone.compile(dynamic=False)
        model.head.compile(dynamic=False)
    return model


def bench_train(cfg, run, batch, device, args, repeats, warmup):
    """Median ms of each phase of engine.train_step and of the whole step. run: the main_train.py settings it reads
    (amp, input_height, clip_grad, lr, optimizer). The phases are engine.train_step's parts (batch_to_device, the
    forward under autocast, SOLOHead.target and loss, optimizer_step) called one by one, with the device's clock
    read between them. result["gflop"]: the FLOPs of one forward and backward, counted once before the timed runs."""
    model = bench_model(cfg, device, args).train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], run.optimizer, run.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_settings(device, args.amp)[1])

    def forward_backward():
        img, label_list, mask_list, bbox_list = batch_to_device(batch, device, run.input_height)
        with autocast(device, run.amp):
            cate_pred_list, ins_pred_list = model(img)
        targets = model.head.target(ins_pred_list, bbox_list, label_list, mask_list, compact=True)
        model.head.loss(cate_pred_list, ins_pred_list, *targets)[2].backward()
    gflop, _ = counted_gflop(forward_backward)
    optimizer.zero_grad(set_to_none=True)
    runs = []
    for _ in range(warmup + repeats):
        marks = [clock(device)]
        img, label_list, mask_list, bbox_list = batch_to_device(batch, device, run.input_height)
        marks.append(clock(device))
        with autocast(device, run.amp):
            cate_pred_list, ins_pred_list = model(img)
        marks.append(clock(device))
        targets = model.head.target(ins_pred_list, bbox_list, label_list, mask_list, compact=True)
        marks.append(clock(device))
        _, _, total_loss = model.head.loss(cate_pred_list, ins_pred_list, *targets)
        marks.append(clock(device))
        optimizer_step(total_loss, optimizer, scaler, run.clip_grad)
        marks.append(clock(device))
        runs.append({name: 1000 * (end - start) for name, start, end in zip(PHASES, marks, marks[1:])})
    result = {name: statistics.median(r[name] for r in runs[warmup:]) for name in PHASES}
    result["step"] = statistics.median(sum(r.values()) for r in runs[warmup:])
    result["gflop"] = gflop
    return result


def host_batch(paths, input_height, num, raw):
    """The loader's batch of the first num images, on the host (raw: uint8, for preprocess_batch)."""
    dataset = BuildDataset(paths, input_height, raw=raw)
    return BuildDataLoader.collect_fn([dataset[i] for i in range(num)])


def made_up_cate(cate_pred_list, k, thresh):
    """Category maps like cate_pred_list [(1, S, S, C-1)], zero but for k random (cell, class) scores in
    (thresh, 1)."""
    sizes = [c.numel() for c in cate_pred_list]
    cate_all = torch.zeros(sum(sizes), device=cate_pred_list[0].device)  # (sum S^2 * (C-1),)
    chosen = torch.randperm(sum(sizes), device=cate_all.device)[:k]
    cate_all[chosen] = thresh + (1 - thresh) * torch.rand(k, device=cate_all.device)
    return [f.view(c.shape) for f, c in zip(cate_all.split(sizes), cate_pred_list)]


def blob_logits(n, size, device):
    """n soft round blobs (n, *size) as logits, radius 4-40 pixels, probabilities 0.02 to ~1: object-like masks."""
    ys, xs = torch.meshgrid(*(torch.arange(s, dtype=torch.float32, device=device) for s in size), indexing="ij")
    cy, cx, radius = (torch.rand(3, n, 1, 1, device=device) * torch.tensor([size[0], size[1], 1.0],
                                                                           device=device).view(3, 1, 1, 1))
    dist = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()  # (n, *size)
    return ((4 + 36 * radius - dist) / 2).clamp(min=math.log(0.02 / 0.98))


def blobs(n, size, device):
    """blob_logits' probabilities."""
    return torch.sigmoid(blob_logits(n, size, device))


def blob_model(num_grids, ins_pred_list, device):
    """(a SOLO head, mask features like ins_pred_list in its dtype and layout) whose every cell's mask is an
    object-like blob, so that PostProcess runs its real candidates' masks on what a trained model gives: each
    level's c features are the logits of c blobs (blob_logits at stride 4, resized to the level) and each cell's
    1x1 output conv picks one (cell i, feature i mod c)."""
    head = SOLOHead(num_grids=num_grids).to(device).eval()
    c, size = head.seg_feat_channels, tuple(2 * s for s in ins_pred_list[0].shape[-2:])
    logits = blob_logits(c, size, device)[None]  # (1, c, H/4, W/4)
    layout = memory_format(is_channels_last(ins_pred_list[0]))
    features = [F.interpolate(logits, size=level.shape[-2:], mode="bilinear", align_corners=False).to(
        level.dtype, memory_format=layout) for level in ins_pred_list]
    with torch.no_grad():
        for conv in head.ins_out_list:
            cells = torch.arange(conv.weight.shape[0], device=device)
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[cells, cells % c] = 1
    return head, features


GEMM_SIZE = 2048  # the matrix product whose rate stands for a dtype's practical limit on the device


def gemm_gflops(device, dtype, repeats, warmup):
    """GFLOP/s of a GEMM_SIZE^3 matrix product in dtype on device (2 n^3 FLOPs), the median of at least 3 runs."""
    a, b = (torch.randn(GEMM_SIZE, GEMM_SIZE, device=device).to(dtype) for _ in range(2))
    ms, _ = median_ms(lambda: a @ b, device, max(repeats, 3), max(warmup, 1))
    return 2 * GEMM_SIZE ** 3 / ms / 1e6


def counted_gflop(fn):
    """(GFLOPs fn() computes, as torch.utils.flop_counter counts them (a multiply-add is 2), its result)."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops() / 1e9, out


def limit_share(gflop, ms, rate):
    """'achieved GFLOP/s, % of rate' of gflop computed in ms."""
    achieved = gflop / ms * 1000
    return f"{achieved:.0f}, {100 * achieved / rate:.0f}"


def row(name, value, unit="", digits=1):
    value = f"{value:.{digits}f}" if isinstance(value, float) else value
    print(f"  {name:<62} {value:>10} {unit}", flush=True)


def main(args):
    handout_cfg = model_settings(args)
    big_model = f"{args.checkpoint}'s model settings" if args.checkpoint else f"handout model, --arch {args.arch}"
    device = prepare_device(args.device, fixed_input_size=True)
    gpu = device.type == "cuda"
    light = (1, 1) if args.quick else (args.repeats, args.warmup)  # (repeats, warm-up runs)
    # an 800x1088 forward takes seconds and a training step over a minute on 2 CPU cores
    heavy = light if gpu else (1, 0) if args.quick else (2, 1)
    train_800 = light if gpu else (1, 0)
    if args.compile:  # the first call compiles: never time it
        light, heavy, train_800 = [(repeats, max(warmup, 1)) for repeats, warmup in (light, heavy, train_800)]
    start = time.perf_counter()
    print(f"device {device}: {device_name(device)}; main_infer.py and main_train.py choose {choose_path(device)}")
    print(f"torch {torch.__version__}, amp {args.amp}, channels_last {args.channels_last}, compile {args.compile}; "
          f"median of {light[0]} runs after {light[1]} warm-up (800x1088 inference {heavy[0]} after {heavy[1]}, "
          f"training {train_800[0]} after {train_800[1]})")
    # the limit each path is measured against: a matrix product's rate in the dtype the network computes in
    dtype = autocast_settings(device, args.amp)[0] or torch.float32
    rates = {d: gemm_gflops(device, d, *light) for d in dict.fromkeys((torch.float32, torch.bfloat16, dtype))}
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"limits: a {GEMM_SIZE} x {GEMM_SIZE} x {GEMM_SIZE} matrix product on this device, per dtype")
    for d, rate in rates.items():
        row(f"{str(d).removeprefix('torch.')} matrix product", rate, "GFLOP/s", 0)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="solo_bench_")
    num_images = 20 if args.quick else args.data_images
    write_synthetic_dataset(tmp.name, num_images=max(num_images, 16, args.batch_800, args.infer_batch), seed=0)
    if args.heads or args.onnx:
        (compare_heads if args.heads else compare_onnx)(args, tmp.name)
        tmp.cleanup()
        print(f"total time {time.perf_counter() - start:.0f} s")
        return
    paths = dataset_paths(tmp.name)
    data_800 = BuildDataset(paths, input_height=800)  # for its sizes

    # 1. training steps, from the loader's host batch (raw on CUDA, as main_train.py loads it)
    demo_cfg = ModelConfig.from_args(SimpleNamespace(**DEMO, arch=args.arch))
    demo_run = SimpleNamespace(amp=args.amp, input_height=DEMO["input_height"], clip_grad=35.0,
                               lr=DEMO_ARCH_LR.get(args.arch, DEMO["lr"]), optimizer=DEMO["optimizer"])
    demo_batch = host_batch(paths, DEMO["input_height"], DEMO["batch_size"], gpu)
    demo = bench_train(demo_cfg, demo_run, demo_batch, device, args, *light)
    print(f"train demo: --demo --arch {args.arch} model, {'x'.join(map(str, demo_batch[0].shape[-2:]))}, "
          f"batch {DEMO['batch_size']}, "
          f"{'raw batch preprocessed on the device' if gpu else 'preprocessed batch copied'}")
    for phase in PHASES:
        row(phase, demo[phase], "ms")
    row("whole step", DEMO["batch_size"] * 1000 / demo["step"], "images/s", 2)
    row("target + loss share of the step", 100 * (demo["target"] + demo["loss"]) / demo["step"], "%")
    row(f"whole step: {demo['gflop']:.1f} GFLOP at GFLOP/s, % of the {dtype_name} GEMM",
        limit_share(demo["gflop"], demo["step"], rates[dtype]))

    if args.quick:
        print("train 800: skipped (--quick)")
    else:
        run_800 = SimpleNamespace(amp=args.amp, input_height=800, clip_grad=35.0, lr=scaled_lr(args.batch_800),
                                  optimizer="sgd")
        big = bench_train(handout_cfg, run_800, host_batch(paths, 800, args.batch_800, gpu), device, args,
                          *train_800)
        print(f"train 800: {big_model}, RANDOM backbone weights (trained too), 800x1088, "
              f"batch {args.batch_800}")
        for phase in PHASES:
            row(phase, big[phase], "ms")
        row("whole step", args.batch_800 * 1000 / big["step"], "images/s", 3)
        row(f"whole step: {big['gflop']:.0f} GFLOP at GFLOP/s, % of the {dtype_name} GEMM",
            limit_share(big["gflop"], big["step"], rates[dtype]))

    # 2. target building at 800x1088; the head's training layout is (bz, S^2, 2H_f, 2W_f) = (.., H/s * 2, ..)
    model = bench_model(handout_cfg, device, args).eval()
    head = model.head
    height, width = data_800.input_size
    ins_shapes = shape_only_preds(head, 16, height, width, device)
    _, label_list, mask_list, bbox_list = host_batch(paths, 800, 16, False)
    label_list, mask_list, bbox_list = ([t.to(device) for t in ts] for ts in (label_list, mask_list, bbox_list))

    def batch_at_once():
        return head.target(ins_shapes, bbox_list, label_list, mask_list, compact=True)

    def image_by_image():
        return [head.target(shape_only_preds(head, 1, height, width, device), [b], [lab], [m], compact=True)
                for b, lab, m in zip(bbox_list, label_list, mask_list)]

    print(f"target 800: batch 16 ({sum(len(lab) for lab in label_list)} objects), 800x1088, compact (training)")
    for name, fn in (("whole batch at once", batch_at_once), ("one image at a time", image_by_image)):
        row(f"target, {name}: ms / torch operations", f"{median_ms(fn, device, *light)[0]:.1f} / "
            f"{torch_calls(fn)}")

    # 3. inference at 800x1088
    img = host_batch(paths, 800, 1, False)[0]  # (1, 3, 800, 1088)
    img = img.to(device, memory_format=memory_format(args.channels_last))
    amp_dtype, _ = autocast_settings(device, args.amp)
    ori_size = data_800.ori_size

    def timed(fn, runs):
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return median_ms(fn, device, *runs)

    backbone_ms, fpn_feat_list = timed(lambda: model.backbone(img), heavy)
    head_ms, (cate_pred_list, ins_pred_list) = timed(lambda: head(fpn_feat_list, eval=True), heavy)
    post_ms, (scores_list, _, _) = timed(
        lambda: head.PostProcess(ins_pred_list, cate_pred_list, ori_size, POSTPROCESS_MAP), light)
    print(f"infer 800: {big_model} (random weights: {len(scores_list[0])} detections), batch 1, "
          f"800x1088")
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        forward_gflop, _ = counted_gflop(lambda: head(model.backbone(img), eval=True))
    row("backbone", backbone_ms, "ms")
    row("head (forward eval=True)", head_ms, "ms")
    row(f"backbone + head: {forward_gflop:.0f} GFLOP at GFLOP/s, % of the {dtype_name} GEMM",
        limit_share(forward_gflop, backbone_ms + head_ms, rates[dtype]))
    row("PostProcess (MAP cfg)", post_ms, "ms")
    row("total", backbone_ms + head_ms + post_ms, "ms/image")
    # made-up category maps with k (cell, class) scores in (cate_thresh, 1), a trained model's load: on the random
    # weights' mask features (noise over the whole image, the worst case for the resize to the original frame)
    # and on object-like blobs (SOLO's cell masks, computed as PostProcess computes them)
    blob_head, blob_features = blob_model(head.seg_num_grids, ins_pred_list, device)
    for k in (100, args.candidates):
        fake_cate = made_up_cate(cate_pred_list, k, POSTPROCESS_MAP["cate_thresh"])
        noise_ms, (noise_scores, _, _) = timed(
            lambda: head.PostProcess(ins_pred_list, fake_cate, ori_size, POSTPROCESS_MAP), light)
        blob_ms, (blob_scores, _, _) = timed(
            lambda: blob_head.PostProcess(blob_features, fake_cate, ori_size, POSTPROCESS_MAP), light)
        row(f"PostProcess, {k} candidates, noise masks ({len(noise_scores[0])} kept): ms, % of backbone",
            f"{noise_ms:.1f}, {100 * noise_ms / backbone_ms:.1f}")
        row(f"PostProcess, {k} candidates, blob masks ({len(blob_scores[0])} kept): ms, % of backbone",
            f"{blob_ms:.1f}, {100 * blob_ms / backbone_ms:.1f}")
    if not args.quick:
        bz = args.infer_batch
        batch_img = host_batch(paths, 800, bz, False)[0].to(device, memory_format=memory_format(args.channels_last))
        batch_ms = timed(lambda: model.infer(batch_img, ori_size, POSTPROCESS_MAP), heavy)[0]
        row(f"SOLO.infer, batch {bz}", bz * 1000 / batch_ms, "images/s", 2)

    # 4. Matrix NMS beside the float32 product of the same masks
    n = 500
    scores = torch.rand(n, device=device).sort(descending=True).values  # (500,)
    labels = torch.randint(1, 4, (n,), device=device)  # (500,)
    print(f"MatrixNMS: {n} masks of {(height // 4, width // 4)}, 3 classes")
    for name, masks in (("noise", torch.rand(n, height // 4, width // 4, device=device) > 0.5),
                        ("blobs", blobs(n, (height // 4, width // 4), device) > 0.5)):
        masks = masks.float()  # 0/1, as PostProcessImg passes its hard masks
        flat = masks.flatten(1)
        product_ms = median_ms(lambda: flat @ flat.T, device, *light)[0]
        nms_ms = median_ms(lambda: head.MatrixNMS(masks, scores, labels), device, *light)[0]
        agnostic_ms = median_ms(lambda: head.MatrixNMS(masks, scores), device, *light)[0]
        row(f"{name}: float32 product flat @ flat.T", product_ms, "ms")
        row(f"{name}: MatrixNMS class-wise / class-agnostic, x the product",
            f"{nms_ms / product_ms:.2f} / {agnostic_ms / product_ms:.2f}")

    # 5. data loading: the first pass starts the (persistent) workers and is not counted
    print(f"data loading at 800: BuildDataLoader, 2 workers, batch 2, {num_images} images")
    for raw, what in ((False, "preprocessed items (CPU training)"), (True, "raw uint8 items (GPU training)")):
        dataset = BuildDataset(paths, input_height=800, raw=raw)
        loader = BuildDataLoader(torch.utils.data.Subset(dataset, range(num_images)), 2, False, 2).loader()
        pass_ms = median_ms(lambda loader=loader: [None for _ in loader], torch.device("cpu"), 1 if args.quick else 2,
                            1)[0]
        row(what, num_images * 1000 / pass_ms, "images/s")
        del loader
    coco_json, _ = course_to_coco(paths, os.path.join(tmp.name, "coco"), image_format="jpg")  # the same images
    coco = COCODataset(coco_json, os.path.join(tmp.name, "coco", "images"), input_height=800)
    loader = BuildDataLoader(torch.utils.data.Subset(coco, range(min(num_images, len(coco)))), 2, False, 2).loader()
    pass_ms = median_ms(lambda loader=loader: [None for _ in loader], torch.device("cpu"), 1 if args.quick else 2, 1)[0]
    row("COCO-format JPEG items (json + image folder, any device)", min(num_images, len(coco)) * 1000 / pass_ms,
        "images/s")
    del loader

    # 6. peak memory
    row(f"peak memory ({'max_memory_allocated' if gpu else 'max RSS of this process'})", peak_memory_mib(device),
        "MiB")
    tmp.cleanup()
    print(f"total time {time.perf_counter() - start:.0f} s")


# ----------------------------------------------------------------------------------------------------
# --heads: the heads side by side
# ----------------------------------------------------------------------------------------------------
def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # KiB on Linux


def head_train_costs(arch, data_dir, args):
    """In a fresh process: the --demo training step of head `arch` (ms, peak memory of the process)."""
    device = prepare_device(args.device, fixed_input_size=True)
    cfg = ModelConfig.from_args(SimpleNamespace(**DEMO, arch=arch))
    run = SimpleNamespace(amp=args.amp, input_height=DEMO["input_height"], clip_grad=35.0,
                          lr=DEMO_ARCH_LR.get(arch, DEMO["lr"]), optimizer=DEMO["optimizer"])
    batch = host_batch(dataset_paths(data_dir), DEMO["input_height"], DEMO["batch_size"], device.type == "cuda")
    step = bench_train(cfg, run, batch, device, args, args.repeats, args.warmup)["step"]
    return dict(step=step, memory=peak_memory_mib(device))


def head_infer_costs(arch, data_dir, input_height, model_settings, args, candidates=100):
    """In a fresh process: parameters, forward GFLOPs (training outputs / eval) and inference ms of head `arch`
    at input_height, batch 1: forward(eval=True) and the masks of `candidates` cells (cell_masks, the one
    head-specific step of PostProcess), peak memory of the process."""
    device = prepare_device(args.device, fixed_input_size=True)
    torch.manual_seed(0)
    layout = memory_format(args.channels_last)  # and autocast below: the path the main table measures
    model = build_model(ModelConfig(**model_settings, arch=arch)).to(device, memory_format=layout).eval()
    img = host_batch(dataset_paths(data_dir), input_height, 1, False)[0].to(device, memory_format=layout)
    amp_dtype, _ = autocast_settings(device, args.amp)
    repeats = (args.repeats, args.warmup) if device.type == "cuda" or input_height < 800 else (2, 1)
    cells = torch.randperm(sum(s * s for s in model.head.seg_num_grids), device=device)[:candidates].sort().values
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        forward_ms, (_, ins_pred_list) = median_ms(lambda: model(img, eval=True), device, *repeats)
        ins_img = [image_of(level, 0) for level in ins_pred_list]
        masks_ms = median_ms(lambda: model.head.cell_masks(ins_img, cells), device, *repeats)[0]
        memory = peak_memory_mib(device)  # before the training-mode forward below, which holds every mask
        flops = []
        for eval_mode in (False, True):
            with FlopCounterMode(display=False) as counter:
                model(img, eval=eval_mode)
            flops.append(counter.get_total_flops() / 1e9)
    feature = ins_pred_list[0]  # the path as the forward ran it, read off the head's mask features
    feature = feature[-1] if isinstance(feature, tuple) else feature  # SOLOv2's: (kernels, mask features)
    return dict(params=sum(p.numel() for p in model.parameters()) / 1e6,
                head_params=sum(p.numel() for p in model.head.parameters()) / 1e6, gflops=flops,
                forward=forward_ms, masks=masks_ms, memory=memory,
                path=f"{'NHWC' if is_channels_last(feature) else 'NCHW'} {str(feature.dtype).removeprefix('torch.')}")


def in_fresh_process(fn, *fn_args):
    """fn(*fn_args) in a new process, so that its peak memory is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *fn_args).result()


def compare_heads(args, data_dir):
    """The --heads table: each head at the demo configuration (training step and inference at the preset's input) and
    at the handout's (inference at 800x1088), every figure from a fresh process."""
    demo_model = {k: v for k, v in DEMO.items() if k in ModelConfig.__dataclass_fields__}
    handout_model = dict(backbone_weights="none")
    memory = "max_memory_allocated" if args.device.startswith("cuda") else "max RSS of the process"
    print(f"heads: random weights; inference = forward(eval=True) + the masks of 100 candidate cells (cell_masks); "
          f"the rest of PostProcess is the same code for every head (see the full table); memory: {memory}")
    print(f"  {'':<44}" + "".join(f"{arch:>14}" for arch in ARCHS))
    results = {arch: dict(train=in_fresh_process(head_train_costs, arch, data_dir, args),
                          demo=in_fresh_process(head_infer_costs, arch, data_dir, DEMO["input_height"], demo_model,
                                                args),
                          big=in_fresh_process(head_infer_costs, arch, data_dir, 800, handout_model, args))
               for arch in ARCHS}

    def line(name, fn):
        print(f"  {name:<44}" + "".join(f"{fn(results[arch]):>14}" for arch in ARCHS), flush=True)
    line("demo: parameters (M), of which head", lambda r: "{params:.2f}, {head_params:.2f}".format(**r["demo"]))
    line("demo: train step, batch 8 (images/s)", lambda r: f"{DEMO['batch_size'] * 1000 / r['train']['step']:.2f}")
    line("demo: peak memory of the train step (MiB)", lambda r: f"{r['train']['memory']:.0f}")
    line("demo: inference forward + masks (ms/image)", lambda r: f"{r['demo']['forward'] + r['demo']['masks']:.1f}")
    line("inference path run (NHWC: channels_last)", lambda r: r["big"]["path"])
    line("800x1088: parameters (M), of which head", lambda r: "{params:.1f}, {head_params:.1f}".format(**r["big"]))
    line("800x1088: forward GFLOPs, training / eval", lambda r: "{:.0f} / {:.0f}".format(*r["big"]["gflops"]))
    line("800x1088: forward(eval=True) (ms)", lambda r: f"{r['big']['forward']:.0f}")
    line("800x1088: masks of 100 candidates (ms)", lambda r: f"{r['big']['masks']:.1f}")
    line("800x1088: peak memory of inference (MiB)", lambda r: f"{r['big']['memory']:.0f}")


def onnx_costs(arch, data_dir, input_height, model_settings, args):
    """In a fresh process: SOLO.infer in PyTorch eager and the exported model in onnxruntime (onnx_infer) on one
    image at input_height, POSTPROCESS_MAP, median ms of each; the export's seconds. Eager runs in --channels-last's
    layout and under --amp's autocast, the exported model as exported (float32)."""
    from onnx_export import export_model
    from onnx_infer import ExportedSOLO

    torch.manual_seed(0)
    model = build_model(dict(model_settings, arch=arch)).eval()
    img = host_batch(dataset_paths(data_dir), input_height, 1, False)[0]  # (1, 3, H, W)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_model(model, arch, dict(input_height=input_height), os.path.join(tmp, "model.onnx"))
        seconds = time.perf_counter() - start
        session = ExportedSOLO(os.path.join(tmp, "model.onnx"))
        model = model.to(memory_format=memory_format(args.channels_last))
        dtype = autocast_settings(torch.device("cpu"), args.amp)[0]
        with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            eager = median_ms(lambda: model.infer(img, (300, 400), POSTPROCESS_MAP), torch.device("cpu"),
                              args.repeats, args.warmup)[0]
        onnx = median_ms(lambda: session.infer(img.numpy(), (300, 400), POSTPROCESS_MAP), torch.device("cpu"),
                         args.repeats, args.warmup)[0]
    return dict(eager=eager, onnx=onnx, export=seconds)


def compare_onnx(args, data_dir):
    """The --onnx table: PyTorch eager against onnxruntime, per image (batch 1), for each head at the demo
    configuration (the preset's input) and the handout's (800x1088), random weights, each in a fresh process."""
    demo_model = {k: v for k, v in DEMO.items() if k in ModelConfig.__dataclass_fields__}
    print(f"PyTorch eager (SOLO.infer, {torch.get_num_threads()} threads) against onnxruntime (export.py's graph, "
          f"onnx_infer's numpy post-processing, its default threads), batch 1, POSTPROCESS_MAP, random weights (few "
          f"candidates: the network's time)")
    print(f"  {'':<44}" + "".join(f"{arch:>14}" for arch in ARCHS))
    for name, height, settings in ((f"demo, input height {DEMO['input_height']}", DEMO["input_height"], demo_model),
                                   ("handout 800x1088", 800, dict(backbone_weights="none"))):
        results = {arch: in_fresh_process(onnx_costs, arch, data_dir, height, settings, args) for arch in ARCHS}
        for what, key in (("PyTorch eager (ms/image)", "eager"), ("onnxruntime (ms/image)", "onnx")):
            print(f"  {name + ': ' + what:<44}" + "".join(f"{results[a][key]:>14.1f}" for a in ARCHS), flush=True)
        print(f"  {name + ': export.py (s)':<44}" + "".join(f"{results[a]['export']:>14.0f}" for a in ARCHS))


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    if args.heads and args.onnx:
        parser.error("--heads and --onnx are two tables: run them one at a time")
    if (args.heads or args.onnx) and (args.arch or args.checkpoint):
        parser.error("--heads and --onnx compare every head on its own settings: they take no --arch or --checkpoint")
    try:
        main(args)
    except UserError as e:
        sys.exit(f"error: {error_message(e)}")
