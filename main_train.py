"""Train SOLO (CIS680 handout section 7) with the SOLO authors' schedule.

  CPU demo (reduced configuration on synthetic data, about 7 minutes on 2 cores; see DEMO below):
      python main_train.py --demo && python main_infer.py --checkpoint-dir checkpoints/demo --figures-dir figures/demo
  one GPU (the handout's setting: frozen COCO ResNet-50 FPN, 800x1088, batch 2 fits a 16 GB GPU):
      python main_train.py --data-dir data
      (speed flags for a tensor-core GPU: --amp --channels-last, and --compile after a warm-up of minutes;
      bench.py --device cuda with the same flags measures what they give)
  several GPUs on one machine (N processes, one per GPU; batch size is per GPU):
      torchrun --nproc_per_node=N main_train.py --data-dir data
  continue an interrupted run with its stored settings: python resume_train.py [--output-dir checkpoints/demo]
  (main_train.py --resume PATH also continues, but takes data and schedule flags from its own command line)

Learning rate: 0.01 for 16 images per iteration, scaled linearly with the total batch, i.e.
lr = 0.01 * batch_size * world_size / 16 (0.00125 for one GPU at batch 2) unless --lr is given. SGD, momentum 0.9,
weight decay 1e-4, 36 epochs; the lr is divided by 10 at the start of (0-based) epochs 27 and 33; a linear warm-up
over the first 500 iterations from lr/3; gradient-norm clipping at 35 (the authors' solo_r50_fpn_8gpu_3x.py).

Epochs are 0-based everywhere: epoch_000.pth is written after the first epoch and holds "epoch": 0.
Outputs: <output-dir>/checkpoint.pth (latest), <output-dir>/epoch_NNN.pth, <output-dir>/losses.csv (train losses,
the mean of each --log-every window), <output-dir>/test_losses.csv (one row per epoch),
<figures-dir>/loss_curve.png.
"""
import argparse
import math
import os
import random
import shutil
import sys
import tempfile
import zipfile
from contextlib import nullcontext

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DistributedSampler, Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataset import (BuildDataLoader, BuildDataset, dataset_paths, preprocess_batch, resolve_data_dir,  # noqa: E402
                     split_dataset, to_device)
from solo_head import MODEL_DEFAULTS, build_model  # noqa: E402

CHECKPOINT_FORMAT = "solo-checkpoint-v1"
CHECKPOINT_KEYS = ("format", "model", "model_cfg", "optimizer", "scheduler", "scaler", "epoch", "iteration",
                   "history", "rng", "args")
LOSS_NAMES = ("total_loss", "focal_loss", "dice_loss")  # total = focal + 3 dice (handout 6.9.1)
BASE_LR, BASE_BATCH = 0.01, 16  # the authors' lr for 16 images per iteration


# --demo: a reduced configuration that learns on the CPU in minutes (README, "The demo"). Same target, loss and
# post-processing code as the full model; what shrinks is the input (128x192), the backbone (random ResNet-18
# FPN), the head (2 convs of 64 channels per tower, smaller grids) and the data (synthetic, no tiny objects).
DEMO = dict(data_dir="data", synthetic=600, synthetic_min_size=30, synthetic_max_objects=4, input_height=128,
            backbone="resnet18", backbone_weights="none", stacked_convs=2, seg_feat_channels=64,
            num_grids=[16, 12, 10, 8, 6], batch_size=8, epochs=8, lr=0.06, lr_steps=[7], warmup_iters=30,
            device="cpu", log_every=10, output_dir="checkpoints/demo", figures_dir="figures/demo")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, not a SOLO checkpoint, or does not fit the model."""


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or infinite loss; the last good checkpoint is left as it was."""


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="SOLO training (CIS680 handout section 7)", add_help=add_help)
    # data
    parser.add_argument("--data-dir", default="data", type=str, help="folder holding the four data files")
    parser.add_argument("--synthetic", default=0, type=int,
                        help="N > 0: train on a synthetic dataset of N images (written under --data-dir if missing)")
    parser.add_argument("--synthetic-min-size", default=14, type=int,
                        help="smallest object (sqrt(w*h), 300x400 pixels) of a newly written synthetic set")
    parser.add_argument("--synthetic-max-objects", default=5, type=int,
                        help="most objects per image of a newly written synthetic set")
    parser.add_argument("--input-height", default=800, type=int,
                        help="network input height, a multiple of 32; width follows the 4:3 aspect (800 -> 800x1066, "
                             "padded 800x1088)")
    parser.add_argument("--hflip", action="store_true", help="random horizontal flips of the train split (p = 0.5)")
    parser.add_argument("--limit-images", default=0, type=int,
                        help="use only the first N images of the train split (0 = all): tiny runs, overfit checks")
    parser.add_argument("--workers", default=2, type=int, help="data loading worker processes per training process")
    parser.add_argument("--device-preprocess", default=None, action=argparse.BooleanOptionalAction,
                        help="workers send uint8 300x400 images and masks, and each batch is resized, flipped, "
                             "normalised and padded on the device (dataset.preprocess_batch: the same tensors, 29x "
                             "fewer bytes through the loader at 800). Default: on for CUDA, off for the CPU, where "
                             "the workers preprocessing in parallel are faster")
    # model (the keys of solo_head.MODEL_DEFAULTS)
    parser.add_argument("--backbone", default=MODEL_DEFAULTS["backbone"], choices=("resnet50", "resnet18"),
                        help="FPN backbone")
    parser.add_argument("--backbone-weights", default=MODEL_DEFAULTS["backbone_weights"], type=str,
                        help="'coco' (torchvision's COCO Mask R-CNN weights), 'none' (random) or a weights file")
    parser.add_argument("--trainable-backbone", action="store_true",
                        help="fine-tune a pretrained backbone's layer2-4 and FPN (default: frozen, the handout's)")
    parser.add_argument("--seg-feat-channels", default=MODEL_DEFAULTS["seg_feat_channels"], type=int,
                        help="channels of both head towers (a multiple of 32: GroupNorm(32))")
    parser.add_argument("--stacked-convs", default=MODEL_DEFAULTS["stacked_convs"], type=int,
                        help="3x3 convs in each head tower")
    parser.add_argument("--num-grids", default=list(MODEL_DEFAULTS["num_grids"]), type=int, nargs=5,
                        metavar="S", help="grid size S of each of the 5 FPN levels")
    parser.add_argument("--init", default=MODEL_DEFAULTS["init"], choices=("solo", "xavier"),
                        help="head initialisation: 'solo' (authors', category prior 0.01) or 'xavier' (handout)")
    parser.add_argument("--cate-norm", default=MODEL_DEFAULTS["cate_norm"], choices=("positives", "mean"),
                        help="focal loss normalisation: 'positives' (authors') or 'mean' (handout 6.9.1)")
    # optimisation
    parser.add_argument("--batch-size", default=2, type=int,
                        help="images per process and iteration (2 fits a 16 GB GPU at 800x1088 with a frozen R50)")
    parser.add_argument("--epochs", default=36, type=int, help="number of epochs")
    parser.add_argument("--lr", default=None, type=float,
                        help="initial lr (default: 0.01 * batch_size * world_size / 16)")
    parser.add_argument("--momentum", default=0.9, type=float, help="SGD momentum")
    parser.add_argument("--weight-decay", default=1e-4, type=float, help="SGD weight decay")
    parser.add_argument("--lr-steps", default=[27, 33], type=int, nargs="+",
                        help="0-based epochs at whose start the lr is multiplied by --lr-gamma")
    parser.add_argument("--lr-gamma", default=0.1, type=float, help="lr factor at each of --lr-steps")
    parser.add_argument("--warmup-iters", default=500, type=int, help="linear warm-up iterations (0 = none)")
    parser.add_argument("--warmup-factor", default=1 / 3, type=float, help="lr factor at the first iteration")
    parser.add_argument("--clip-grad", default=35.0, type=float, help="gradient-norm clipping (0 = off)")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: bfloat16 on CPUs (fast with AVX512-BF16 or AMX) and on GPUs from the "
                             "A100 on, float16 with a GradScaler on older GPUs (T4, V100)")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and input images in the channels_last (NHWC) memory format: faster convolutions "
                             "under --amp on tensor-core GPUs; checkpoints are stored in the usual layout either way")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model's forward (backbone + head; targets and losses stay eager): "
                             "faster steps after a warm-up of tens of seconds to minutes")
    parser.add_argument("--max-iters", default=0, type=int,
                        help="stop after this many iterations in total, closing the epoch in progress (0 = off; "
                             "for tests and benchmarks)")
    # bookkeeping
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=str,
                        help="'cuda' or 'cpu'; under torchrun each process takes cuda:LOCAL_RANK")
    parser.add_argument("--seed", default=0, type=int, help="seed of the initialisation, shuffling and flips")
    parser.add_argument("--output-dir", default="checkpoints", type=str, help="checkpoints and loss CSVs")
    parser.add_argument("--figures-dir", default="figures", type=str, help="where loss_curve.png goes")
    parser.add_argument("--log-every", default=100, type=int, help="log the mean losses every N iterations")
    parser.add_argument("--test-loss", default=True, action=argparse.BooleanOptionalAction,
                        help="compute the test-split losses after every epoch")
    parser.add_argument("--save-every", default=1, type=int,
                        help="checkpoint (and loss plot) every N epochs and after the last one; 1 (default) lets a "
                             "crash cost at most one epoch, larger N suits tiny datasets of seconds-long epochs")
    parser.add_argument("--keep-epochs", default=0, type=int,
                        help="keep only the newest N epoch_NNN.pth files (0 = keep all)")
    parser.add_argument("--resume", default=None, type=str, help="continue from this checkpoint")
    parser.add_argument("--demo", action="store_true",
                        help="the CPU demo's reduced configuration as defaults (see DEMO); other flags still apply")
    return parser


def parse_args(argv=None):
    """get_args_parser().parse_args, with DEMO as the defaults when --demo is given (explicit flags win)."""
    parser = get_args_parser()
    if parser.parse_args(argv).demo:  # parsed twice so that an abbreviation (--dem) counts too
        parser.set_defaults(**DEMO)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Small helpers: model settings, schedule, RNG, distributed setup
# ----------------------------------------------------------------------------------------------------
def model_cfg_from_args(args):
    """The build_model dict for the flags (every MODEL_DEFAULTS key)."""
    return dict(backbone=args.backbone, backbone_weights=args.backbone_weights,
                trainable_backbone=args.trainable_backbone, num_classes=MODEL_DEFAULTS["num_classes"],
                seg_feat_channels=args.seg_feat_channels, stacked_convs=args.stacked_convs,
                num_grids=list(args.num_grids), init=args.init, cate_norm=args.cate_norm)


def scaled_lr(batch_size, world_size=1):
    """The linear scaling rule: 0.01 for 16 images per iteration (the authors' 8 GPUs x 2 images)."""
    return BASE_LR * batch_size * world_size / BASE_BATCH


def lr_factor(iteration, iters_per_epoch, lr_steps=(27, 33), lr_gamma=0.1, warmup_iters=500, warmup_factor=1 / 3):
    """Multiplier of the base lr at a global iteration (0-based): step decay by epoch times a linear warm-up
    from warmup_factor at iteration 0 to 1 at iteration warmup_iters."""
    epoch = iteration // iters_per_epoch
    factor = lr_gamma ** sum(epoch >= step for step in lr_steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer, iters_per_epoch, args):
    """Per-iteration LambdaLR (call step() after every iteration); its state_dict resumes it exactly."""
    def lr_lambda(iteration):
        return lr_factor(iteration, iters_per_epoch, args.lr_steps, args.lr_gamma, args.warmup_iters,
                         args.warmup_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # also every CUDA device


def get_rng_state():
    """RNG states of python, numpy, torch and CUDA as tensors and plain types (weights_only-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                       "gauss_next": py_gauss},
            "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate((state["python"]["version"], tuple(state["python"]["state"].tolist()),
                     state["python"]["gauss_next"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_distributed(device):
    """(distributed, rank, world_size, local_rank, device) from torchrun's RANK/WORLD_SIZE/LOCAL_RANK."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False, 0, 1, 0, torch.device(device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.device(device).type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device(device), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    return True, rank, world_size, local_rank, device


def prepare_device(device, fixed_input_size):
    """torch.device(device); a GPU is made the current device (--device cuda:1: the loader's pinning thread and
    default allocations follow it), and with fixed_input_size cuDNN times its algorithms for the first batches
    and keeps the fastest (with sizes that change it would time them again for each new size).
    RuntimeError when CUDA is asked for and absent."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}, but CUDA is not available here: pass --device cpu")
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = fixed_input_size
    return device


def autocast_settings(device, amp):
    """(autocast dtype or None, use a GradScaler): bfloat16 on CPUs (native with AVX512-BF16 or AMX, emulated
    otherwise: README says when --amp pays) and on GPUs of compute capability 8+ (A100, H100); float16 + GradScaler
    on older GPUs (T4, V100: torch.cuda.is_bf16_supported() says True there too, for emulated bfloat16)."""
    if not amp:
        return None, False
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16, True
    return torch.bfloat16, False


def _layout(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def compile_module(module):
    """Compile module's forward in place (nn.Module.compile, as the PyTorch docs advise over torch.compile(module)):
    the module stays what it was, with the same state dict keys (no wrapper, no "_orig_mod." prefix).
    dynamic=False: a run's input size is fixed, so each batch size met (a smaller last batch, evaluation) gets its
    own static-shape graph rather than one graph with a symbolic batch size."""
    module.compile(dynamic=False)
    return module


def prepare_model(model, device, channels_last=False, compile_forward=False):
    """model on `device`; with channels_last its 4-D weights in NHWC order (cuDNN's tensor-core convolutions work
    in NHWC, so under AMP they skip a transpose around every convolution); with compile_forward its forward
    compiled: backbone (frozen under no_grad, or trained) and head, where the FLOPs are. Targets and losses have
    data-dependent shapes and stay eager."""
    model = model.to(device, memory_format=_layout(channels_last))
    return compile_module(model) if compile_forward else model


def batch_to_device(batch, device, channels_last=False, input_height=None):
    """A loader batch (img, label_list, mask_list, bbox_list) on `device`; a raw batch (BuildDataset(raw=True),
    five parts) is preprocessed there for input_height (dataset.preprocess_batch). The loader pins its batches
    when CUDA is present (dataset.to_device pins any other host tensor), so the copies are asynchronous: the host
    goes on to launch the forward while they run. The lists are copied here too, so that SOLOHead.target's own
    .to(device) is a no-op."""
    if len(batch) == 5:
        img, label_list, mask_list, bbox_list = preprocess_batch(batch, input_height, device)
    else:
        img, label_list, mask_list, bbox_list = batch
        img = to_device(img, device)  # (bz, 3, Hp, Wp)
        label_list = [to_device(label, device) for label in label_list]  # [(n,)]
        mask_list = [to_device(mask, device) for mask in mask_list]  # [(n, Hp, Wp)]
        bbox_list = [to_device(bbox, device) for bbox in bbox_list]  # [(n, 4)]
    # copied in the loader's (contiguous) layout, then made NHWC on the device
    return img.contiguous(memory_format=_layout(channels_last)), label_list, mask_list, bbox_list


def match_parameter_layout(optimizer):
    """Give every optimizer state tensor of a parameter's shape (SGD's momentum buffers) that parameter's memory
    layout. A checkpoint stores them contiguous; against channels_last parameters and gradients the multi-tensor
    (foreach) SGD step would leave its fast path, which needs equal strides."""
    for param, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                param_state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------
def _fsync_dir(directory):
    try:  # makes the rename durable; not possible on every platform / file system
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path, write):
    """Call write(file) on a temporary file in path's folder, fsync it, then rename it onto path: a crash leaves
    either the old file or the new one, never half of one. Temporary names start with '.' and end with '.tmp'."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's files are private (0600); give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def _to_host(obj):
    """obj with every tensor on the CPU in the standard contiguous layout (torch.save keeps devices and strides)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu().contiguous()
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def save_checkpoint(state, path):
    """torch.save(state, path), atomically. Tensors are stored on the CPU and contiguous, so a checkpoint of a GPU
    or --channels-last run (NHWC-strided convolution weights and momentum buffers) is the same as any other and
    loads on a machine without a GPU."""
    state = _to_host(state)
    _atomic_write(path, lambda f: torch.save(state, f))


def _copy_checkpoint(src, dst):
    with open(src, "rb") as f_src:
        _atomic_write(dst, lambda f_dst: shutil.copyfileobj(f_src, f_dst, 1 << 24))


def load_checkpoint(path, map_location="cpu", keys=CHECKPOINT_KEYS):
    """The checkpoint dict in path (torch.load with weights_only=True). CheckpointError, naming the file, when it
    is missing, unreadable (truncated, not written by torch.save) or lacks any of `keys`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read: it is truncated, not a file written by torch.save, "
                              f"or holds objects weights_only loading refuses ({type(e).__name__}: {reason})") from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} is not a SOLO checkpoint: it holds a {type(checkpoint).__name__}, "
                              f"not a dict")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = sorted(map(str, checkpoint))[:8]
        raise CheckpointError(f"checkpoint {path} is not a SOLO checkpoint (format {checkpoint.get('format')!r}, "
                              f"expected {CHECKPOINT_FORMAT!r}; its keys: {found})")
    missing = [k for k in keys if k not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {missing}")
    return checkpoint


def load_model_state(model, state, source):
    """model.load_state_dict(state) after checking every key and shape; CheckpointError naming `source` and the
    first mismatches otherwise. A 'module.' prefix (a state dict saved from DistributedDataParallel) is dropped."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {source}: 'model' is a {type(state).__name__}, not a state dict")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: checkpoint {tuple(getattr(state[k], 'shape', ()))}, model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and getattr(state[k], "shape", None) != v.shape]
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit the model built from its model_cfg "
                              f"({len(problems)} problems): " + "; ".join(problems[:4]))
    model.load_state_dict(state)


def load_model(path_or_checkpoint, device="cpu", source=None):
    """SOLO in eval mode with a checkpoint's weights (a path, or a dict from load_checkpoint with `source` the
    file it came from, for error messages)."""
    if isinstance(path_or_checkpoint, dict):
        checkpoint, source = path_or_checkpoint, source or "<checkpoint dict>"
    else:
        checkpoint, source = load_checkpoint(path_or_checkpoint, keys=("model", "model_cfg")), path_or_checkpoint
    model = build_model(checkpoint["model_cfg"], load_backbone_weights=False)
    load_model_state(model, checkpoint["model"], source)
    return model.to(device).eval()


def latest_checkpoint(directory):
    """The newest complete checkpoint.pth or epoch_NNN.pth in directory (by modification time), or None.
    Temporary files of an interrupted save ('.*.tmp') and files that are not complete zip archives are skipped."""
    if not os.path.isdir(directory):
        return None
    candidates = []
    for name in os.listdir(directory):
        is_epoch = name.startswith("epoch_") and name.endswith(".pth") and name[6:-4].isdigit()
        if name != "checkpoint.pth" and not is_epoch:
            continue
        path = os.path.join(directory, name)
        if os.path.isfile(path) and zipfile.is_zipfile(path):  # a truncated file has no zip central directory
            # newest first; on equal times the rolling checkpoint.pth, then the highest epoch
            candidates.append((os.path.getmtime(path), name == "checkpoint.pth", name, path))
    return max(candidates)[-1] if candidates else None


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------
def synthetic_options(args):
    """The synthetic scene settings of a run's args (a dict, as checkpoints store them)."""
    return dict(min_size=args.get("synthetic_min_size", 14), max_objects=args.get("synthetic_max_objects", 5))


def build_datasets(data_dir="data", synthetic=0, input_height=800, hflip=False, limit_images=0,
                   synthetic_options=None, raw=False):
    """(train Subset, test Subset) as every script builds them: dataset.split_dataset's 80/20 split; the flips
    (if any) only on the train split; limit_images > 0 keeps the first N images of the train split.
    synthetic > 0: a synthetic set of that many images with the scene settings synthetic_options.
    raw: BuildDataset(raw=True) items, for preprocess_batch on the device."""
    paths = dataset_paths(resolve_data_dir(data_dir, synthetic, **(synthetic_options or {})))
    train_set, _ = split_dataset(BuildDataset(paths, input_height=input_height, hflip=hflip, raw=raw))
    _, test_set = split_dataset(BuildDataset(paths, input_height=input_height, hflip=False, raw=raw))
    if limit_images > 0:
        train_set = Subset(train_set, range(min(limit_images, len(train_set))))
    return train_set, test_set


# ----------------------------------------------------------------------------------------------------
# Loss logging and plotting
# ----------------------------------------------------------------------------------------------------
def write_loss_csvs(history, output_dir):
    """Rewrite losses.csv (iteration + 3 losses) and test_losses.csv (epoch + 3 losses) from the history."""
    for name, first, rows in (("losses.csv", "iteration", history["train"]),
                              ("test_losses.csv", "epoch", history["test"])):
        def write(f, rows=rows, first=first):
            f.write((",".join((first,) + LOSS_NAMES) + "\n").encode())
            f.write("".join(_csv_line(row) for row in rows).encode())
        _atomic_write(os.path.join(output_dir, name), write)


def _csv_line(row):
    return f"{int(row[0])}," + ",".join(f"{v:.6g}" for v in row[1:]) + "\n"


def append_loss_row(path, row):
    with open(path, "a", newline="") as f:
        f.write(_csv_line(row))


def plot_loss_curve(history, path):
    """Total, focal (category) and dice (mask) losses against the iteration: the train losses (means over each
    logging window) as lines, the test-split losses after each epoch as markers."""
    train = np.asarray(history["train"], dtype=float).reshape(-1, 4)  # (rows, [iteration, total, focal, dice])
    test = np.asarray(history["test"], dtype=float).reshape(-1, 4)  # (epochs, [epoch, total, focal, dice])
    epoch_end = dict((int(e), it) for e, it in history.get("epoch_iters", []))
    test_x = np.array([epoch_end.get(int(e), np.nan) for e in test[:, 0]])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k, (ax, name) in enumerate(zip(axes, ("total loss", "focal loss (category)", "dice loss (mask)"))):
        ax.plot(train[:, 0], train[:, k + 1], lw=1, label="train")
        if len(test):
            ax.plot(test_x, test[:, k + 1], "o-", ms=4, label="test (end of epoch)")
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------------
def compute_losses(model, head, batch, device, amp_dtype, channels_last=False, input_height=None):
    """(cate_loss, mask_loss, total_loss) of one batch; `model` may be DDP-wrapped, `head` is its SOLOHead.
    input_height: that of a raw batch (see batch_to_device). No host-device synchronisation: the targets come in
    SOLOHead.target's compact form."""
    img, label_list, mask_list, bbox_list = batch_to_device(batch, device, channels_last, input_height)
    with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
        cate_pred_list, ins_pred_list = model(img)  # training layout: [(bz, C-1, S, S)], [(bz, S^2, 2H_f, 2W_f)]
    ins_gts_list, ins_ind_gts_list, cate_gts_list = head.target(ins_pred_list, bbox_list, label_list, mask_list,
                                                                compact=True)
    return head.loss(cate_pred_list, ins_pred_list, ins_gts_list, ins_ind_gts_list, cate_gts_list)


def read_losses(losses, distributed):
    """The mean of `losses` (a device tensor) over the processes, as a list of floats: the training step's one
    host-device synchronisation (and, with several processes, its one extra collective)."""
    if distributed:
        dist.all_reduce(losses)
        losses /= dist.get_world_size()
    return losses.tolist()


def optimizer_step(optimizer, scaler, params, clip_grad):
    """The step after backward: unscale and clip the gradient norm (clip_grad > 0), SGD step, scaler update."""
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()


def train_one_epoch(model, head, optimizer, scheduler, scaler, loader, device, epoch, state, args, ctx):
    """One epoch. state: {"iteration", "history"} (updated in place). Raises NonFiniteLossError on a NaN/inf."""
    model.train()
    window, running = [], torch.zeros(3, dtype=torch.float64)
    progress = tqdm(loader, desc=f"epoch {epoch}/{args.epochs - 1}", disable=not ctx["is_main"], dynamic_ncols=True)
    for step, batch in enumerate(progress):
        cate_loss, mask_loss, total_loss = compute_losses(model, head, batch, device, ctx["amp_dtype"],
                                                          args.channels_last, args.input_height)
        losses = torch.stack([total_loss, cate_loss, mask_loss]).detach().float()  # (3,) on the device
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total_loss).backward()
        optimizer_step(optimizer, scaler, ctx["params"], args.clip_grad)
        scheduler.step()
        # The host reads the losses only now, with backward and the SGD step already queued, so the device is
        # never left idle waiting for it (this is the step's one CPU-GPU sync). A non-finite loss has then been
        # stepped into the model in memory, but no checkpoint of this epoch has been written yet, so the last
        # one on disk stays the last good one. Every process sees the same (mean) values and stops together.
        values = read_losses(losses, ctx["distributed"])
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, iteration {state['iteration'] + 1} (step {step + 1} of the "
                f"epoch): total {values[0]}, focal {values[1]}, dice {values[2]}. Stopped; the last good "
                f"checkpoint ({ctx['last_checkpoint'] or 'none yet'}) is left as it was.")
        state["iteration"] += 1

        window.append(values)
        running += torch.tensor(values, dtype=torch.float64)
        last = step + 1 == len(loader) or state["iteration"] == args.max_iters
        if state["iteration"] % args.log_every == 0 or last:  # the window's mean; the epoch's rest at its end
            row = [state["iteration"], *np.mean(window, axis=0).tolist()]
            state["history"]["train"].append(row)
            window = []
            if ctx["is_main"]:
                append_loss_row(os.path.join(args.output_dir, "losses.csv"), row)
        if ctx["is_main"]:
            mean = (running / (step + 1)).tolist()
            progress.set_postfix(total=f"{mean[0]:.3f}", focal=f"{mean[1]:.3f}", dice=f"{mean[2]:.3f}",
                                 lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if state["iteration"] == args.max_iters:
            break
    progress.close()


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype, distributed, channels_last=False, input_height=None):
    """Mean [total, focal, dice] losses over the loader's batches (every process's share), model in eval mode
    (frozen BatchNorm statistics), predictions in the training layout. A compiled model compiles its eval-mode
    forward on the first call."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # total, focal, dice, batches
    for batch in loader:
        cate_loss, mask_loss, total_loss = compute_losses(model, model.head, batch, device, amp_dtype, channels_last,
                                                          input_height)
        sums += torch.stack([total_loss, cate_loss, mask_loss, torch.ones_like(total_loss)]).double()
    if distributed:
        dist.all_reduce(sums)
    sums = sums.cpu()  # the one host-device sync of the evaluation
    return (sums[:3] / sums[3].clamp(min=1)).tolist()


def _plain(value):
    """args values as weights_only-safe plain types (tuples -> lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def main(args):
    distributed, rank, world_size, local_rank, device = init_distributed(args.device)
    is_main = rank == 0
    try:
        return _train(args, distributed, rank, world_size, device, is_main)
    finally:
        if distributed:
            dist.destroy_process_group()


def _train(args, distributed, rank, world_size, device, is_main):
    device = prepare_device(device, fixed_input_size=True)
    if args.lr is None:
        args.lr = scaled_lr(args.batch_size, world_size)
    if args.log_every < 1 or args.save_every < 1:
        raise ValueError(f"--log-every and --save-every must be >= 1, got {args.log_every} and {args.save_every}")
    seed_everything(args.seed + 1000 * rank)
    checkpoint = load_checkpoint(args.resume) if args.resume else None

    # data: the same 80/20 split as every script; each process reads its share of the shuffled train split.
    # Process 0 goes first, so that a missing synthetic dataset is written once.
    if distributed and not is_main:
        dist.barrier()
    # None (the default) is decided for the device here and stays None in the checkpoint's args, so that a run
    # resumed on another device decides again
    raw = device.type == "cuda" if args.device_preprocess is None else args.device_preprocess
    train_set, test_set = build_datasets(args.data_dir, args.synthetic, args.input_height, args.hflip,
                                         args.limit_images, synthetic_options(vars(args)), raw=raw)
    if distributed and is_main:
        dist.barrier()
    train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    test_sampler = DistributedSampler(test_set, num_replicas=world_size, rank=rank, shuffle=False)
    iters_per_epoch = math.ceil(len(train_sampler) / args.batch_size)
    if iters_per_epoch == 0:
        raise ValueError("the train split is empty")
    test_loader = BuildDataLoader(test_set, args.batch_size, False, args.workers, sampler=test_sampler).loader()

    # model; on resume its settings come from the checkpoint
    model_cfg = dict(checkpoint["model_cfg"]) if checkpoint else model_cfg_from_args(args)
    if checkpoint and is_main and model_cfg != model_cfg_from_args(args):
        print(f"note: resuming with the checkpoint's model settings {model_cfg}")
    model = prepare_model(build_model(model_cfg, load_backbone_weights=checkpoint is None), device,
                          args.channels_last, args.compile)  # compiled lazily: the first forward compiles
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = build_scheduler(optimizer, iters_per_epoch, args)
    amp_dtype, use_scaler = autocast_settings(device, args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    state = {"iteration": 0, "history": {"train": [], "test": [], "epoch_iters": []}}
    start_epoch, last_checkpoint = 0, None
    if checkpoint:
        load_model_state(model, checkpoint["model"], args.resume)  # copied into the parameters' own layout
        optimizer.load_state_dict(checkpoint["optimizer"])
        match_parameter_layout(optimizer)
        scheduler.load_state_dict(checkpoint["scheduler"])
        if use_scaler and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
        state = {"iteration": checkpoint["iteration"], "history": checkpoint["history"]}
        state["history"].setdefault("epoch_iters", [])
        start_epoch, last_checkpoint = checkpoint["epoch"] + 1, args.resume
        if is_main and checkpoint.get("iters_per_epoch", iters_per_epoch) != iters_per_epoch:
            print(f"warning: {iters_per_epoch} iterations per epoch now, {checkpoint['iters_per_epoch']} in the "
                  f"checkpoint (another batch size or number of processes): the lr steps move")
        set_rng_state(checkpoint["rng"])
        del checkpoint
    # the module whose state dict is saved; compiled in place (prepare_model), it has the usual keys
    model_without_ddp = model
    if distributed:
        # DDP wraps the module compiled in place, the order the PyTorch docs advise ("Where to apply
        # torch.compile?": compile the inner module, not the DDP wrapper). Dynamo still sees the DDP module
        # (DistributedDataParallel._get_active_ddp_module) and splits the graph at DDP's bucket boundaries
        # (DDPOptimizer), so gradient all-reduces overlap the backward as they do eagerly.
        # Parameters without grad (a frozen backbone) are skipped by DDP.
        # Every parameter gets a gradient in every step (the compact targets give every level's mask output a
        # slot, or a zero-weighted term when the batch has no object), so DDP needs no unused-parameter search.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    if is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        write_loss_csvs(state["history"], args.output_dir)  # the CSVs restart from the checkpoint's history
        print(f"SOLO training: {len(train_set)} train / {len(test_set)} test images, {world_size} process(es) x "
              f"batch {args.batch_size}, {iters_per_epoch} iterations per epoch, lr {args.lr:g}, device {device}, "
              f"epochs {start_epoch}..{args.epochs - 1}")
    if is_main and start_epoch >= args.epochs:
        print(f"nothing to train: the checkpoint has finished epoch {start_epoch - 1} of 0..{args.epochs - 1} "
              f"(pass a larger --epochs to go on)")
    ctx = dict(is_main=is_main, distributed=distributed, amp_dtype=amp_dtype, params=params,
               last_checkpoint=last_checkpoint)
    summary = dict(epoch=start_epoch - 1, iteration=state["iteration"], checkpoint=last_checkpoint,
                   train_loss=None, test_loss=None, output_dir=args.output_dir)

    for epoch in range(start_epoch, args.epochs):
        if args.max_iters and state["iteration"] >= args.max_iters:
            break
        # the epoch's randomness is a function of (seed, epoch, rank) only, so a resumed run repeats it exactly
        seed_everything(args.seed + epoch + 1000 * rank)
        train_sampler.set_epoch(epoch)  # shuffles with seed + epoch, the same order on every process
        # a fresh loader per epoch: (persistent) workers draw their seeds from the RNG just seeded
        train_loader = BuildDataLoader(train_set, args.batch_size, False, args.workers, sampler=train_sampler).loader()
        train_one_epoch(model, model_without_ddp.head, optimizer, scheduler, scaler, train_loader, device, epoch,
                        state, args, ctx)
        del train_loader
        state["history"]["epoch_iters"].append([epoch, state["iteration"]])
        if args.test_loss and len(test_set):
            test_loss = evaluate(model_without_ddp, test_loader, device, amp_dtype, distributed,
                                 args.channels_last, args.input_height)
            state["history"]["test"].append([epoch, *test_loss])
            summary["test_loss"] = test_loss
            if is_main:
                append_loss_row(os.path.join(args.output_dir, "test_losses.csv"), [epoch, *test_loss])
                print(f"epoch {epoch}: test losses total {test_loss[0]:.4f}, focal {test_loss[1]:.4f}, "
                      f"dice {test_loss[2]:.4f}")
        last = epoch == args.epochs - 1 or (args.max_iters and state["iteration"] >= args.max_iters)
        saving = (epoch + 1) % args.save_every == 0 or last
        if is_main and saving:
            checkpoint = {
                "format": CHECKPOINT_FORMAT, "model": model_without_ddp.state_dict(), "model_cfg": model_cfg,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else None, "epoch": epoch,
                "iteration": state["iteration"], "history": state["history"], "rng": get_rng_state(),
                "args": {k: _plain(v) for k, v in vars(args).items()}, "input_height": args.input_height,
                "iters_per_epoch": iters_per_epoch, "world_size": world_size}
            epoch_path = os.path.join(args.output_dir, f"epoch_{epoch:03d}.pth")
            save_checkpoint(checkpoint, epoch_path)
            _copy_checkpoint(epoch_path, os.path.join(args.output_dir, "checkpoint.pth"))
            del checkpoint
            _remove_old_epochs(args.output_dir, args.keep_epochs)
            plot_loss_curve(state["history"], os.path.join(args.figures_dir, "loss_curve.png"))
        if distributed:
            dist.barrier()  # no process races ahead of the checkpoint
        if saving:
            ctx["last_checkpoint"] = os.path.join(args.output_dir, "checkpoint.pth")
        summary.update(epoch=epoch, iteration=state["iteration"], checkpoint=ctx["last_checkpoint"],
                       train_loss=state["history"]["train"][-1][1:])
    return summary


def _remove_old_epochs(output_dir, keep):
    if keep <= 0:
        return
    names = sorted(n for n in os.listdir(output_dir)
                   if n.startswith("epoch_") and n.endswith(".pth") and n[6:-4].isdigit())
    for name in names[:-keep]:
        os.remove(os.path.join(output_dir, name))


if __name__ == "__main__":
    try:
        main(parse_args())
    except (NonFiniteLossError, CheckpointError) as e:
        sys.exit(f"error: {e}")
