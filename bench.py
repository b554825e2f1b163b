"""Benchmark SOLO on whatever device is present: prints one table of timings. A benchmark, not a test.

  CPU:  python bench.py --device cpu [--quick]     (about 3-4 minutes on 2 cores; --quick < 1 minute)
  GPU:  python bench.py --device cuda [--amp]

Every figure is the median of --repeats runs after --warmup runs (--quick: 1 run, 1 warm-up), timed with
torch.cuda.synchronize() around each phase on CUDA. On the CPU the 800x1088 rows run less often (inference 2
runs after 1 warm-up, --quick 1 run; the training step 1 run): the top line says how often. Inputs come from a
synthetic dataset (300x400 images, 1-5 objects each) written to a temp dir.
Rows:
  train demo      one training step of main_train.DEMO's model (random ResNet-18 FPN, 2 x 64-channel towers) at
                  input height 128 (128x192), batch 8, split into backbone forward, head forward, target, loss,
                  backward and optimizer step (zero_grad, grad clipping, SGD), as compute_losses and
                  train_one_epoch do them; then the whole step in images/s and the target + loss share of it.
  train 800       the same for the handout's model (ResNet-50 FPN, 7 x 256-channel towers) at 800x1088, batch 2,
                  with RANDOM, trainable backbone weights (no COCO file offline), so the backbone also runs
                  backward: with the handout's frozen COCO backbone that part shrinks. Skipped with --quick; on
                  the CPU a single run without warm-up.
  target 800      SOLOHead.target for 16 images at 800x1088 (real masks and boxes from BuildDataset; prediction
                  shapes as the head makes them), per image, and its share of a train-800 step per image.
  infer 800       batch 1 at 800x1088 (handout model, eval): backbone, head (forward eval=True), PostProcess
                  with POSTPROCESS_MAP. Random weights give next to no candidates, so PostProcess is also timed
                  alone on made-up predictions with --candidates (cell, class) scores above cate_thresh (the
                  pre_NMS_num best of them reach Matrix NMS): a loaded, trained-model-like case.
  MatrixNMS       500 random binary masks of 200x272 (the stride-4 map of 800x1088), sorted scores, 3 labels.
  data loading    BuildDataset at 800 through BuildDataLoader (2 workers, batch 2) over --data-images images,
                  images/s once the workers are running.
  peak memory     torch.cuda.max_memory_allocated on CUDA, else the process's max RSS (every row included).
Input images are on the device before a step is timed; masks and boxes stay on the CPU, as the loader gives
them, so `target` includes copying them to the device.
"""
import argparse
import platform
import resource
import statistics
import tempfile
import time

import torch

from dataset import BuildDataLoader, BuildDataset, dataset_paths
from main_train import autocast_settings, model_cfg_from_args, optimizer_step, parse_args, scaled_lr
from solo_head import POSTPROCESS_MAP, build_model
from synthetic import write_synthetic_dataset

PHASES = ("backbone forward", "head forward", "target", "loss", "backward", "optimizer step")


def get_args_parser():
    parser = argparse.ArgumentParser(description="SOLO benchmark: a table of timings for this device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=str,
                        help="'cuda' or 'cpu'")
    parser.add_argument("--quick", action="store_true",
                        help="1 run per figure, 20 images for data loading, no 800x1088 training step")
    parser.add_argument("--repeats", default=5, type=int, help="timed runs per figure (the median is shown)")
    parser.add_argument("--warmup", default=1, type=int, help="untimed runs before the timed ones")
    parser.add_argument("--amp", action="store_true", help="autocast as main_train.py --amp does")
    parser.add_argument("--candidates", default=1000, type=int,
                        help="(cell, class) scores above cate_thresh in the PostProcess-alone row")
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


def train_step(model, optimizer, scaler, batch, device, amp_dtype, clip):
    """One training step as compute_losses + train_one_epoch do it, with a clock between phases -> {phase: ms}."""
    img, label_list, mask_list, bbox_list = batch
    head, params = model.head, [p for p in model.parameters() if p.requires_grad]
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        t = [clock(device)]
        fpn_feat_list = model.backbone(img)  # 5 x (bz, 256, H/s, W/s); random weights: trainable, so with grad
        t.append(clock(device))
        cate_pred_list, ins_pred_list = head(fpn_feat_list)
        t.append(clock(device))
    targets = head.target(ins_pred_list, bbox_list, label_list, mask_list)
    t.append(clock(device))
    total_loss = head.loss(cate_pred_list, ins_pred_list, *targets)[2]
    t.append(clock(device))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total_loss).backward()
    t.append(clock(device))
    optimizer_step(optimizer, scaler, params, clip)
    t.append(clock(device))
    return {name: 1000 * (b - a) for name, a, b in zip(PHASES, t, t[1:])}


def bench_train(model_args, batch, device, amp, repeats, warmup):
    """Median ms of each phase and of the whole step (median of the per-run sums)."""
    model = build_model(model_cfg_from_args(model_args)).to(device).train()
    lr = model_args.lr or scaled_lr(model_args.batch_size)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                                momentum=model_args.momentum, weight_decay=model_args.weight_decay)
    amp_dtype, use_scaler = autocast_settings(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    runs = [train_step(model, optimizer, scaler, batch, device, amp_dtype, model_args.clip_grad)
            for _ in range(warmup + repeats)][warmup:]
    result = {name: statistics.median(r[name] for r in runs) for name in PHASES}
    result["step"] = statistics.median(sum(r.values()) for r in runs)
    return result


def batch_of(dataset, num, device):
    img, label_list, mask_list, bbox_list = BuildDataLoader.collect_fn([dataset[i] for i in range(num)])
    return img.to(device), label_list, mask_list, bbox_list


def row(name, value, unit="", digits=1):
    value = f"{value:.{digits}f}" if isinstance(value, float) else value
    print(f"  {name:<46} {value:>10} {unit}", flush=True)


def main(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but CUDA is not available here: pass --device cpu")
    gpu = device.type == "cuda"
    light = (1, 1) if args.quick else (args.repeats, args.warmup)  # (repeats, warm-up runs)
    # an 800x1088 forward takes ~10 s and a training step over a minute on 2 CPU cores
    heavy = light if gpu else (1, 0) if args.quick else (2, 1)
    train_800 = light if gpu else (1, 0)
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if gpu else f"{platform.processor() or platform.machine()}, " \
                                                          f"{torch.get_num_threads()} threads"
    print(f"device {device} ({name}), torch {torch.__version__}, amp {args.amp}; median of {light[0]} runs after "
          f"{light[1]} warm-up (800x1088 inference {heavy[0]} after {heavy[1]}, training {train_800[0]} after "
          f"{train_800[1]})")
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="solo_bench_")
    num_images = 20 if args.quick else args.data_images
    write_synthetic_dataset(tmp.name, num_images=max(num_images, 16), seed=0)
    paths = dataset_paths(tmp.name)
    data_800 = BuildDataset(paths, input_height=800)

    # 1. training steps
    demo_args = parse_args(["--demo", "--device", args.device])
    demo = bench_train(demo_args, batch_of(BuildDataset(paths, demo_args.input_height), demo_args.batch_size,
                                           device), device, args.amp, *light)
    print(f"train demo: DEMO model, {demo_args.input_height}x192, batch {demo_args.batch_size}")
    for phase in PHASES:
        row(phase, demo[phase], "ms")
    row("whole step", demo_args.batch_size * 1000 / demo["step"], "images/s", 2)
    row("target + loss share of the step", 100 * (demo["target"] + demo["loss"]) / demo["step"], "%")

    handout_args = parse_args(["--backbone-weights", "none", "--batch-size", "2", "--device", args.device])
    big = None
    if args.quick:
        print("train 800: skipped (--quick)")
    else:
        big = bench_train(handout_args, batch_of(data_800, 2, device), device, args.amp, *train_800)
        print("train 800: handout model, RANDOM backbone weights (trained too), 800x1088, batch 2")
        for phase in PHASES:
            row(phase, big[phase], "ms")
        row("whole step", 2 * 1000 / big["step"], "images/s", 3)

    # 2. target building at 800x1088; the head's training layout is (bz, S^2, 2H_f, 2W_f) = (.., H/s * 2, ..)
    model = build_model(model_cfg_from_args(handout_args)).to(device).eval()
    head = model.head
    height, width = data_800.input_size
    ins_shapes = [torch.empty((), device=device).expand(16, s * s, 2 * height // st, 2 * width // st)
                  for s, st in zip(head.seg_num_grids, head.strides)]  # target reads only the sizes: no memory
    _, label_list, mask_list, bbox_list = BuildDataLoader.collect_fn([data_800[i] for i in range(16)])
    target_ms = median_ms(lambda: head.target(ins_shapes, bbox_list, label_list, mask_list), device, *light)[0] / 16
    print(f"target 800: batch 16 ({sum(len(l) for l in label_list)} objects), 800x1088")
    row("target per image", target_ms, "ms")
    row("share of a train-800 step per image", 100 * target_ms / (big["step"] / 2) if big else "n/a", "%")

    # 3. inference at 800x1088, batch 1
    img = data_800[0][0][None].to(device)  # (1, 3, 800, 1088)
    amp_dtype, _ = autocast_settings(device, args.amp)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        backbone_ms, fpn_feat_list = median_ms(lambda: model.backbone(img), device, *heavy)
        head_ms, (cate_pred_list, ins_pred_list) = median_ms(lambda: head(fpn_feat_list, eval=True), device, *heavy)
        # cate_pred_list [(1, S, S, C-1)], ins_pred_list [(1, S^2, H/4, W/4)]

    def post(cate_list, ins_list):
        return head.PostProcess(ins_list, cate_list, data_800.ori_size, POSTPROCESS_MAP)

    with torch.inference_mode():
        post_ms, (scores_list, _, _) = median_ms(lambda: post(cate_pred_list, ins_pred_list), device, *light)
        # made-up predictions: --candidates (cell, class) scores in (cate_thresh, 1), random mask probabilities
        sizes, thresh = [c.numel() for c in cate_pred_list], POSTPROCESS_MAP["cate_thresh"]
        cate_all = torch.zeros(sum(sizes), device=device)  # (sum S^2 * (C-1),)
        chosen = torch.randperm(sum(sizes), device=device)[:args.candidates]
        cate_all[chosen] = thresh + (1 - thresh) * torch.rand(len(chosen), device=device)
        fake_cate = [f.view(c.shape) for f, c in zip(cate_all.split(sizes), cate_pred_list)]
        fake_ins = [torch.rand(i.shape, device=device) for i in ins_pred_list]
        alone_ms, (fake_scores_list, _, _) = median_ms(lambda: post(fake_cate, fake_ins), device, *light)
    print("infer 800: handout model (random weights), batch 1, 800x1088")
    row("backbone", backbone_ms, "ms")
    row("head (eval forward)", head_ms, "ms")
    row(f"PostProcess (MAP cfg, {len(scores_list[0])} kept)", post_ms, "ms")
    row("total", backbone_ms + head_ms + post_ms, "ms/image")
    row(f"PostProcess alone, {args.candidates} candidates ({len(fake_scores_list[0])} kept)", alone_ms, "ms")

    # 4. Matrix NMS
    n = 500
    masks = torch.rand(n, height // 4, width // 4, device=device) > 0.5  # (500, 200, 272): stride 4
    scores = torch.rand(n, device=device).sort(descending=True).values  # (500,)
    labels = torch.randint(1, 4, (n,), device=device)  # (500,)
    nms_ms = median_ms(lambda: head.MatrixNMS(masks, scores, labels), device, *light)[0]
    print(f"MatrixNMS: {n} masks of {tuple(masks.shape[1:])}, 3 classes")
    row("MatrixNMS", nms_ms, "ms")

    # 5. data loading: the first pass starts the (persistent) workers and is not counted
    loader = BuildDataLoader(torch.utils.data.Subset(data_800, range(num_images)), 2, False, 2).loader()
    pass_ms = median_ms(lambda: [None for _ in loader], torch.device("cpu"), 1 if args.quick else 2, 1)[0]
    print(f"data loading: BuildDataset at 800, BuildDataLoader 2 workers, batch 2, {num_images} images")
    row("data loading", num_images * 1000 / pass_ms, "images/s")

    # 6. peak memory
    if gpu:
        row("peak memory (max_memory_allocated)", torch.cuda.max_memory_allocated(device) / 2 ** 20, "MiB")
    else:  # ru_maxrss is in KiB on Linux
        row("peak memory (max RSS of this process)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10,
            "MiB")
    del loader
    tmp.cleanup()
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
