"""Benchmark SOLO on whatever device is present: prints one table of timings. A benchmark, not a test.

  CPU:  python bench.py --device cpu [--quick]     (about 3-4 minutes on 2 cores; --quick < 1 minute)
  GPU:  python bench.py --device cuda [--amp] [--channels-last] [--compile]

Every figure is the median of --repeats runs after --warmup runs (--quick: 1 run, 1 warm-up), timed with
torch.cuda.synchronize() around each phase on CUDA. On the CPU the 800x1088 rows run less often (inference 2
runs after 1 warm-up, --quick 1 run; the training step 1 run): the top line says how often, and which of --amp,
--channels-last and --compile ran. With --compile every figure has at least one warm-up run (the first call
compiles), and the backbone and the head are compiled as two modules so that the phases stay apart (main_train.py
compiles them as one model). Inputs come from a synthetic dataset (300x400 images, 1-5 objects each) written to a
temp dir.
Rows:
  train demo      one training step of main_train.DEMO's model (random ResNet-18 FPN, 2 x 64-channel towers) at
                  input height 128 (128x192), batch 8, split into data to device (main_train.batch_to_device: on
                  CUDA the raw uint8 batch preprocessed there, main_train.py's default; on the CPU the
                  preprocessed batch), backbone forward, head forward, target (compact form), loss, backward and
                  optimizer step (zero_grad, grad clipping, SGD), as compute_losses and train_one_epoch do them;
                  then the whole step in images/s, the target + loss share of it, and the first (untimed) step,
                  which with --compile includes compiling.
  train 800       the same for the handout's model (ResNet-50 FPN, 7 x 256-channel towers) at 800x1088, batch
                  --batch-800, with RANDOM, trainable backbone weights (no COCO file offline), so the backbone also
                  runs backward: with the handout's frozen COCO backbone that part shrinks. Skipped with --quick; on
                  the CPU a single run without warm-up.
  target 800      SOLOHead.target for 16 images at 800x1088 (real masks and boxes; prediction shapes as the head
                  makes them), per image, in the compact (training) form and the handout's layout; the number
                  of ATen operations (kernel launches or views on a GPU) the compact form runs for the batch.
  infer 800       batch 1 at 800x1088 (handout model, eval) as SOLO.infer runs it: backbone, head
                  (forward_features) and PostProcessFeat with POSTPROCESS_MAP; then the dense path (forward
                  eval=True, PostProcess) for comparison. Random weights give next to no candidates, so
                  made-up category maps with 100 and --candidates (cell, class) scores above cate_thresh (a
                  trained model's load) are post-processed twice: by PostProcessFeat on the random weights' mask
                  features (their masks are noise over the whole image, the worst case for the resize to the
                  original frame) and by PostProcess on object-like blob masks. Then SOLO.infer on a batch of
                  --infer-batch (skipped with --quick).
  MatrixNMS       500 random binary masks of 200x272 (the stride-4 map of 800x1088), sorted scores, 3 labels.
  data loading    BuildDataset at 800 through BuildDataLoader (2 workers, batch 2) over --data-images images,
                  images/s once the workers are running: preprocessed items and raw uint8 items.
  peak memory     torch.cuda.max_memory_allocated on CUDA, else the process's max RSS (every row included).
"""
import argparse
import platform
import resource
import statistics
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dataset import BuildDataLoader, BuildDataset, dataset_paths
from main_train import (autocast_settings, batch_to_device, compile_module, model_cfg_from_args, optimizer_step,
                        parse_args, prepare_device, prepare_model, scaled_lr)
from solo_head import POSTPROCESS_MAP, build_model
from synthetic import write_synthetic_dataset

PHASES = ("data to device", "backbone forward", "head forward", "target", "loss", "backward", "optimizer step")


def get_args_parser():
    parser = argparse.ArgumentParser(description="SOLO benchmark: a table of timings for this device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=str,
                        help="'cuda' or 'cpu'")
    parser.add_argument("--quick", action="store_true",
                        help="1 run per figure, 20 images for data loading, no 800x1088 training step")
    parser.add_argument("--repeats", default=5, type=int, help="timed runs per figure (the median is shown)")
    parser.add_argument("--warmup", default=1, type=int, help="untimed runs before the timed ones")
    parser.add_argument("--amp", action="store_true", help="autocast as main_train.py --amp does")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and images in channels_last, as main_train.py --channels-last")
    parser.add_argument("--compile", action="store_true",
                        help="compile the backbone and the head (main_train.py --compile compiles them as one model)")
    parser.add_argument("--candidates", default=1000, type=int,
                        help="(cell, class) scores above cate_thresh in the second made-up PostProcessFeat row")
    parser.add_argument("--batch-800", default=2, type=int, help="batch size of the 800x1088 training step")
    parser.add_argument("--infer-batch", default=8, type=int, help="batch size of the batched SOLO.infer row")
    parser.add_argument("--data-images", default=40, type=int, help="images read in the data loading row")
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


class OperationCount(TorchDispatchMode):
    """Counts the ATen operations run inside it: on a GPU each is a kernel launch or a view, several
    microseconds of host time, so their number bounds how fast a step of small operations can go."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def train_step(model, optimizer, scaler, batch, device, amp_dtype, channels_last, input_height, clip):
    """One training step as compute_losses + train_one_epoch do it, with a clock between phases -> {phase: ms}.
    batch: the loader's, on the host (raw on CUDA, as main_train.py's --device-preprocess default)."""
    head, params = model.head, [p for p in model.parameters() if p.requires_grad]
    t = [clock(device)]
    img, label_list, mask_list, bbox_list = batch_to_device(batch, device, channels_last, input_height)
    t.append(clock(device))
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        fpn_feat_list = model.backbone(img)  # 5 x (bz, 256, H/s, W/s); random weights: trainable, so with grad
        t.append(clock(device))
        cate_pred_list, ins_pred_list = head(fpn_feat_list)
        t.append(clock(device))
    targets = head.target(ins_pred_list, bbox_list, label_list, mask_list, compact=True)
    t.append(clock(device))
    total_loss = head.loss(cate_pred_list, ins_pred_list, *targets)[2]
    t.append(clock(device))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total_loss).backward()
    t.append(clock(device))
    optimizer_step(optimizer, scaler, params, clip)
    t.append(clock(device))
    return {name: 1000 * (b - a) for name, a, b in zip(PHASES, t, t[1:])}


def bench_model(model_args, device, args):
    """The model of model_args as main_train.py prepares it for args.channels_last; with args.compile, the backbone
    and the head compiled as two modules, so that their phases can be timed apart."""
    model = prepare_model(build_model(model_cfg_from_args(model_args)), device, args.channels_last)
    if args.compile:
        compile_module(model.backbone)
        compile_module(model.head)
    return model


def bench_train(model_args, batch, device, args, repeats, warmup):
    """Median ms of each phase and of the whole step (median of the per-run sums), and the first step's ms."""
    model = bench_model(model_args, device, args).train()
    lr = model_args.lr or scaled_lr(model_args.batch_size)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                                momentum=model_args.momentum, weight_decay=model_args.weight_decay)
    amp_dtype, use_scaler = autocast_settings(device, args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    runs = [train_step(model, optimizer, scaler, batch, device, amp_dtype, args.channels_last,
                       model_args.input_height, model_args.clip_grad)
            for _ in range(warmup + repeats)]
    result = {name: statistics.median(r[name] for r in runs[warmup:]) for name in PHASES}
    result["step"] = statistics.median(sum(r.values()) for r in runs[warmup:])
    result["first step"] = sum(runs[0].values())
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


def blob_masks(cate_pred_list, num_grids, size):
    """ins_pred_list [(1, S^2, *size)] as forward(eval=True) gives it: a soft round blob (radius 4-40) in every
    channel with a category score above 0, background 0.02 elsewhere."""
    ys, xs = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=cate_pred_list[0].device) for n in size),
                            indexing="ij")
    ins_pred_list = []
    for cate, num_grid in zip(cate_pred_list, num_grids):
        masks = torch.full((1, num_grid ** 2, *size), 0.02, device=cate.device)
        for cell in (cate[0].reshape(num_grid ** 2, -1) > 0).any(1).nonzero()[:, 0].tolist():
            cy, cx, radius = torch.rand(3).tolist()
            dist = ((ys - cy * size[0]) ** 2 + (xs - cx * size[1]) ** 2).sqrt()
            masks[0, cell] = torch.sigmoid((4 + 36 * radius - dist) / 2)
        ins_pred_list.append(masks)
    return ins_pred_list


def row(name, value, unit="", digits=1):
    value = f"{value:.{digits}f}" if isinstance(value, float) else value
    print(f"  {name:<58} {value:>10} {unit}", flush=True)


def main(args):
    device = prepare_device(args.device, fixed_input_size=True)
    gpu = device.type == "cuda"
    light = (1, 1) if args.quick else (args.repeats, args.warmup)  # (repeats, warm-up runs)
    # an 800x1088 forward takes ~10 s and a training step over a minute on 2 CPU cores
    heavy = light if gpu else (1, 0) if args.quick else (2, 1)
    train_800 = light if gpu else (1, 0)
    if args.compile:  # the first call compiles: never time it
        light, heavy, train_800 = [(repeats, max(warmup, 1)) for repeats, warmup in (light, heavy, train_800)]
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()}, " \
                                                          f"{torch.get_num_threads()} threads"
    print(f"device {device} ({name}), torch {torch.__version__}, amp {args.amp}, channels_last "
          f"{args.channels_last}, compile {args.compile}; median of {light[0]} runs after {light[1]} warm-up "
          f"(800x1088 inference {heavy[0]} after {heavy[1]}, training {train_800[0]} after {train_800[1]})")
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="solo_bench_")
    num_images = 20 if args.quick else args.data_images
    write_synthetic_dataset(tmp.name, num_images=max(num_images, 16, args.batch_800, args.infer_batch), seed=0)
    paths = dataset_paths(tmp.name)
    data_800 = BuildDataset(paths, input_height=800)  # for its sizes

    # 1. training steps, from the loader's host batch (raw on CUDA: main_train.py's --device-preprocess default)
    demo_args = parse_args(["--demo", "--device", args.device])
    demo = bench_train(demo_args, host_batch(paths, demo_args.input_height, demo_args.batch_size, gpu), device,
                       args, *light)
    print(f"train demo: DEMO model, {demo_args.input_height}x192, batch {demo_args.batch_size}, "
          f"{'raw batch preprocessed on the device' if gpu else 'preprocessed batch copied'}")
    for phase in PHASES:
        row(phase, demo[phase], "ms")
    row("whole step", demo_args.batch_size * 1000 / demo["step"], "images/s", 2)
    row("target + loss share of the step", 100 * (demo["target"] + demo["loss"]) / demo["step"], "%")
    row("first step (untimed; compiles with --compile)", demo["first step"], "ms", 0)

    handout_args = parse_args(["--backbone-weights", "none", "--batch-size", str(args.batch_800), "--device",
                               args.device])
    big = None
    if args.quick:
        print("train 800: skipped (--quick)")
    else:
        big = bench_train(handout_args, host_batch(paths, 800, args.batch_800, gpu), device, args, *train_800)
        print(f"train 800: handout model, RANDOM backbone weights (trained too), 800x1088, batch {args.batch_800}")
        for phase in PHASES:
            row(phase, big[phase], "ms")
        row("whole step", args.batch_800 * 1000 / big["step"], "images/s", 3)
        row("first step (untimed; compiles with --compile)", big["first step"], "ms", 0)

    # 2. target building at 800x1088; the head's training layout is (bz, S^2, 2H_f, 2W_f) = (.., H/s * 2, ..)
    model = bench_model(handout_args, device, args).eval()
    head = model.head
    height, width = data_800.input_size
    ins_shapes = [torch.empty((), device=device).expand(16, s * s, 2 * height // st, 2 * width // st)
                  for s, st in zip(head.seg_num_grids, head.strides)]  # target reads only the sizes: no memory
    _, label_list, mask_list, bbox_list = batch_to_device(host_batch(paths, 800, 16, False), device)
    print(f"target 800: batch 16 ({sum(len(l) for l in label_list)} objects), 800x1088")
    for compact, form in ((True, "compact (training)"), (False, "handout layout")):
        target_ms = median_ms(lambda: head.target(ins_shapes, bbox_list, label_list, mask_list, compact=compact),
                              device, *light)[0]
        row(f"target, {form}: batch of 16 / per image", f"{target_ms:.1f} / {target_ms / 16:.2f}", "ms")
    with OperationCount() as ops:
        head.target(ins_shapes, bbox_list, label_list, mask_list, compact=True)
    row("target, compact: ATen operations for the batch of 16", ops.count)
    row("target share of a train-800 step (compact, from its phases)",
        f"{100 * big['target'] / big['step']:.2f}" if big else "n/a", "%")

    # 3. inference at 800x1088: candidate-first (SOLO.infer's path) and the handout's dense path
    img = batch_to_device(host_batch(paths, 800, 1, False), device, args.channels_last)[0]  # (1, 3, 800, 1088)
    amp_dtype, _ = autocast_settings(device, args.amp)
    ori_size = data_800.ori_size

    def timed(fn, runs):
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return median_ms(fn, device, *runs)

    backbone_ms, fpn_feat_list = timed(lambda: model.backbone(img), heavy)
    head_ms, (cate_pred_list, ins_feat_list) = timed(lambda: head.forward_features(fpn_feat_list), heavy)
    post_ms, (scores_list, _, _) = timed(
        lambda: head.PostProcessFeat(ins_feat_list, cate_pred_list, ori_size, POSTPROCESS_MAP), light)
    dense_head_ms, (_, ins_pred_list) = timed(lambda: head(fpn_feat_list, eval=True), heavy)
    dense_post_ms = timed(lambda: head.PostProcess(ins_pred_list, cate_pred_list, ori_size, POSTPROCESS_MAP),
                          light)[0]
    del ins_pred_list  # (1, sum S^2, 200, 272): 840 MB
    print(f"infer 800: handout model (random weights: {len(scores_list[0])} detections), batch 1, 800x1088")
    row("backbone", backbone_ms, "ms")
    row("head (forward_features)", head_ms, "ms")
    row("PostProcessFeat (MAP cfg)", post_ms, "ms")
    row("total, candidate-first", backbone_ms + head_ms + post_ms, "ms/image")
    row("dense: head (forward eval=True) / PostProcess", f"{dense_head_ms:.0f} / {dense_post_ms:.0f}", "ms")
    # made-up category maps with k (cell, class) scores in (cate_thresh, 1), a trained model's load (random
    # weights give next to none): on the random weights' mask features, whose masks are noise over the whole
    # image (the worst case for the resize to the original frame), and, through PostProcess, on object-like
    # masks (round blobs of radius 4-40 at stride 4, soft edges)
    for k in (100, args.candidates):
        fake_cate = made_up_cate(cate_pred_list, k, POSTPROCESS_MAP["cate_thresh"])
        fake_ms, (fake_scores, _, _) = timed(
            lambda: head.PostProcessFeat(ins_feat_list, fake_cate, ori_size, POSTPROCESS_MAP), light)
        row(f"PostProcessFeat, {k} candidates, noise masks ({len(fake_scores[0])} kept)", fake_ms, "ms")
        blobs = blob_masks(fake_cate, head.seg_num_grids, (height // 4, width // 4))
        blob_ms, (blob_scores, _, _) = timed(
            lambda: head.PostProcess(blobs, fake_cate, ori_size, POSTPROCESS_MAP), light)
        row(f"PostProcess, {k} candidates, blob masks ({len(blob_scores[0])} kept)", blob_ms, "ms")
        del blobs
    if not args.quick:
        bz = args.infer_batch
        batch_img = batch_to_device(host_batch(paths, 800, bz, False), device, args.channels_last)[0]
        batch_ms = timed(lambda: model.infer(batch_img, ori_size, POSTPROCESS_MAP), heavy)[0]
        row(f"SOLO.infer, batch {bz}", bz * 1000 / batch_ms, "images/s", 2)

    # 4. Matrix NMS
    n = 500
    masks = torch.rand(n, height // 4, width // 4, device=device) > 0.5  # (500, 200, 272): stride 4
    scores = torch.rand(n, device=device).sort(descending=True).values  # (500,)
    labels = torch.randint(1, 4, (n,), device=device)  # (500,)
    nms_ms = median_ms(lambda: head.MatrixNMS(masks, scores, labels), device, *light)[0]
    print(f"MatrixNMS: {n} masks of {tuple(masks.shape[1:])}, 3 classes")
    row("MatrixNMS", nms_ms, "ms")

    # 5. data loading: the first pass starts the (persistent) workers and is not counted
    print(f"data loading at 800: BuildDataLoader, 2 workers, batch 2, {num_images} images")
    for raw, what in ((False, "preprocessed items (CPU training)"), (True, "raw uint8 items (--device-preprocess)")):
        dataset = BuildDataset(paths, input_height=800, raw=raw)
        loader = BuildDataLoader(torch.utils.data.Subset(dataset, range(num_images)), 2, False, 2).loader()
        pass_ms = median_ms(lambda: [None for _ in loader], torch.device("cpu"), 1 if args.quick else 2, 1)[0]
        row(what, num_images * 1000 / pass_ms, "images/s")
        del loader

    # 6. peak memory
    if gpu:
        row("peak memory (max_memory_allocated)", torch.cuda.max_memory_allocated(device) / 2 ** 20, "MiB")
    else:  # ru_maxrss is in KiB on Linux
        row("peak memory (max RSS of this process)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10,
            "MiB")
    tmp.cleanup()
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
