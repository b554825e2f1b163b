"""Helpers the scripts share: devices and mixed precision, distributed set-up, RNG states, the lr schedule,
checkpoints (atomic writes, loading with errors that name the file, the newest of a run folder) and the loss logs.
"""
import contextlib
import errno
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import uuid
import zipfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from solo_head import ModelConfig, build_model  # noqa: E402

CHECKPOINT_FORMAT = "solo-checkpoint-v1"
CHECKPOINT_KEYS = ("format", "model", "model_cfg", "optimizer", "scheduler", "scaler", "epoch", "iteration",
                   "history", "rng", "args")
LOSS_NAMES = ("total_loss", "focal_loss", "dice_loss")  # total = focal + 3 dice (handout 6.9.1)
BASE_LR, BASE_BATCH = 0.01, 16  # the authors' lr for 16 images per iteration
LR_GAMMA = 0.1  # the lr is multiplied by this at each of the lr steps (handout 7.1: divided by 10)
WARMUP_FACTOR = 1 / 3  # the authors' linear warm-up starts at lr / 3
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")

# The reduced configuration that learns on a CPU in minutes (README, "The demo"): main_train.py --demo sets
# these flag values as its defaults. Same target, loss and post-processing code as the full model; what shrinks
# is the input (128x192), the backbone (random ResNet-18 FPN), the head (2 convs of 64 channels per tower,
# smaller grids, 64 SOLOv2 mask feature channels) and the data (synthetic, no tiny objects).
DEMO = dict(data_dir="data", synthetic=600, synthetic_min_size=30, input_height=128, backbone="resnet18",
            backbone_weights="none", stacked_convs=2, seg_feat_channels=64, mask_feat_channels=64,
            num_grids=[16, 12, 10, 8, 6],
            batch_size=8, epochs=8, lr=0.06, lr_steps=[7], warmup_iters=30, device="cpu", log_every=10,
            output_dir="checkpoints/demo")
# The demo's lr for heads that diverge at DEMO's: SOLOv2's kernel branch is one conv shared by every cell, so all
# positive cells pull it the same way at once; at lr 0.06 the kernels turn negative on the (non-negative) mask
# features within a few iterations, every mask goes to 0 and the dice loss stays at 1 (README, departures)
DEMO_ARCH_LR = dict(solov2=0.01)


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, not a SOLO checkpoint, or does not fit the model."""


class RunFolderError(RuntimeError):
    """A run folder that another process is writing to, or that holds another run's checkpoints."""


class DeviceError(RuntimeError):
    """The device asked for is not there (--device cuda without CUDA)."""


class WriteError(OSError):
    """A file could not be written (a full disk, a lost mount): the message names the file and the cause."""

    def __str__(self):
        return self.strerror


# ----------------------------------------------------------------------------------------------------
# Devices, mixed precision, distributed mode
# ----------------------------------------------------------------------------------------------------
def init_distributed(device):
    """(rank, world_size, device) from torchrun's RANK/WORLD_SIZE/LOCAL_RANK (each process takes
    cuda:LOCAL_RANK); (0, 1, device) without them."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device(device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.device(device).type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device(device), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    return rank, world_size, device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def is_main_process():
    """True in the one process that writes files and prints (rank 0, or the only process)."""
    return not is_distributed() or dist.get_rank() == 0


def prepare_device(device, fixed_input_size):
    """torch.device(device); a GPU is made the current device (--device cuda:1: the loader's pinning thread and
    default allocations follow it), and with fixed_input_size cuDNN times its algorithms for the first batches
    and keeps the fastest (with sizes that change it would time them again for each new size).
    DeviceError when CUDA is asked for and absent."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device}, but CUDA is not available here: pass --device cpu")
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


def device_name(device):
    """The GPU, or the CPU model with the instruction sets that decide its speed (from /proc/cpuinfo on Linux)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, compute capability {torch.cuda.get_device_capability(device)}"
    model, flags = platform.processor() or platform.machine(), set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    features = " ".join(f for f in CPU_FEATURES if f in flags) or "none of " + " ".join(CPU_FEATURES)
    return (f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; {features}; torch kernels "
            f"{torch.backends.cpu.get_cpu_capability()}")


# ----------------------------------------------------------------------------------------------------
# RNG states and the lr schedule
# ----------------------------------------------------------------------------------------------------
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


def scaled_lr(batch_size, world_size=1):
    """The linear scaling rule: 0.01 for 16 images per iteration (the authors' 8 GPUs x 2 images)."""
    return BASE_LR * batch_size * world_size / BASE_BATCH


def lr_factor(iteration, iters_per_epoch, lr_steps=(27, 33), warmup_iters=500):
    """Multiplier of the base lr at a global iteration (0-based): LR_GAMMA for each of lr_steps the epoch has
    reached, times a linear warm-up from WARMUP_FACTOR at iteration 0 to 1 at iteration warmup_iters."""
    epoch = iteration // iters_per_epoch
    factor = LR_GAMMA ** sum(epoch >= step for step in lr_steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= WARMUP_FACTOR * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer, iters_per_epoch, lr_steps, warmup_iters):
    """Per-iteration LambdaLR (step() after every iteration, so last_epoch counts the iterations done); its
    state_dict resumes it exactly."""
    def lr_lambda(iteration):
        return lr_factor(iteration, iters_per_epoch, lr_steps, warmup_iters)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


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


def _os_error(error):
    """The OSError in an error's chain (torch.save reports a full disk as a RuntimeError of its zip writer), or
    None."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def write_error(path, error):
    """WriteError naming the file and the operating system's reason (e.g. 'No space left on device')."""
    cause = _os_error(error)
    reason = cause.strerror if cause is not None and cause.strerror else str(error)
    return WriteError(getattr(cause, "errno", None), f"cannot write {path}: {reason}")


def atomic_write(path, write):
    """Call write(file) on a temporary file in path's folder, fsync it, then rename it onto path: a crash leaves
    either the old file or the new one, never half of one. Temporary names start with '.' and end with '.tmp'; the
    temporary file is removed on any failure, and a failure of the operating system's (a full disk, a lost mount)
    is reported as a WriteError naming path and the cause."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the usual permissions, after the umask
    except OSError as e:
        raise write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, Exception) and not isinstance(e, WriteError) and _os_error(e) is not None:
            raise write_error(path, e) from e
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
    run loads on a machine without a GPU."""
    state = _to_host(state)
    atomic_write(path, lambda f: torch.save(state, f))


def training_checkpoint(model, model_cfg, optimizer, scheduler, scaler, epoch, history, args, iters_per_epoch,
                        world_size):
    """The checkpoint of a training run after `epoch`: CHECKPOINT_KEYS, plus iters_per_epoch and world_size (the
    lr schedule's epoch length). model is the unwrapped module; args a namespace of plain values."""
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_cfg": vars(model_cfg).copy(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "epoch": epoch,
            "iteration": scheduler.last_epoch, "history": history, "rng": get_rng_state(), "args": vars(args).copy(),
            "iters_per_epoch": iters_per_epoch, "world_size": world_size}


def restore_training(checkpoint, source, model, optimizer, scheduler, scaler):
    """training_checkpoint's state back into the model, optimizer, scheduler, scaler and the RNGs (CheckpointError
    naming `source` when the model does not fit). Returns (history, the next epoch)."""
    load_model_state(model, checkpoint["model"], source)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler.is_enabled() and checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    return checkpoint["history"], checkpoint["epoch"] + 1


def link_checkpoint(src, dst):
    """dst becomes the same file as src: a hard link (no second copy on disk), or a copy where the file system
    has no hard links (some network and FUSE mounts); atomically either way."""
    directory = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(directory, f".{os.path.basename(dst)}.link.tmp")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as f_src:
            atomic_write(dst, lambda f_dst: shutil.copyfileobj(f_src, f_dst, 1 << 24))
        return
    try:
        os.replace(tmp, dst)
    except OSError as e:
        os.unlink(tmp)
        raise write_error(dst, e) from e
    _fsync_dir(directory)


def load_checkpoint(path, map_location="cpu", keys=CHECKPOINT_KEYS, mmap=False):
    """The checkpoint dict in path (torch.load with weights_only=True; mmap reads tensors only when used).
    CheckpointError, naming the file, when it is missing, unreadable (truncated, not written by torch.save) or
    lacks any of `keys`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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


def model_config(checkpoint, source):
    """The ModelConfig stored in a checkpoint; CheckpointError naming `source` when it is not one."""
    stored = checkpoint["model_cfg"]
    if not isinstance(stored, dict):
        raise CheckpointError(f"checkpoint {source}: 'model_cfg' is a {type(stored).__name__}, not a dict")
    try:
        return ModelConfig(**stored)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {source}: its model settings are not valid ({e})") from None


def check_classes(data_classes, trained_classes, source, error=CheckpointError, data="the data"):
    """The data must have the classes checkpoint `source` was trained on, in its order (label k is the k-th
    class); `error` naming both lists otherwise."""
    if tuple(data_classes) != tuple(trained_classes):
        raise error(f"{data} has the classes {list(data_classes)}, but checkpoint {source} was trained on "
                    f"{list(trained_classes)}")


def stored_settings(checkpoint, source, defaults, required=()):
    """The run's arguments a checkpoint stores ("args"), checked against `defaults` (name -> default value): each
    stored setting that has a default must have its type (an int counts as a float; a list's items as the default
    list's), and the `required` ones must be there. CheckpointError naming `source` and the setting otherwise (a
    hand-edited file)."""
    stored = checkpoint["args"]
    if not isinstance(stored, dict):
        raise CheckpointError(f"checkpoint {source}: 'args' is a {type(stored).__name__}, not a dict")
    missing = [name for name in required if name not in stored]
    if missing:
        raise CheckpointError(f"checkpoint {source}: its stored settings lack {missing}")

    def fits(value, default):
        if default is None or value is None:
            return True
        if isinstance(default, list):
            return isinstance(value, list) and all(fits(v, default[0]) for v in value) if default else True
        if isinstance(default, bool) or isinstance(value, bool):
            return isinstance(value, bool) and isinstance(default, bool)
        if isinstance(default, float):
            return isinstance(value, (int, float))
        return isinstance(value, type(default))
    for name, default in defaults.items():
        if name in stored and not fits(stored[name], default):
            raise CheckpointError(f"checkpoint {source}: its stored setting {name}={stored[name]!r} is not a "
                                  f"{type(default).__name__} (like {default!r})")
    return stored


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
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"checkpoint {source} holds NaN or infinite weights ({len(broken)} tensors, the first "
                              f"{broken[0]}): it cannot be evaluated or trained on; use an earlier checkpoint")
    model.load_state_dict(state)


def load_model(path_or_checkpoint, device="cpu", source=None):
    """SOLO in eval mode with a checkpoint's weights (a path, or a dict from load_checkpoint with `source` the
    file it came from, for error messages)."""
    if isinstance(path_or_checkpoint, dict):
        checkpoint, source = path_or_checkpoint, source or "<checkpoint dict>"
    else:
        checkpoint, source = load_checkpoint(path_or_checkpoint, keys=("model", "model_cfg")), path_or_checkpoint
    model = build_model(model_config(checkpoint, source), load_backbone_weights=False)
    load_model_state(model, checkpoint["model"], source)
    return model.to(device).eval()


def is_checkpoint_name(name):
    """checkpoint.pth or epoch_NNN.pth, the names a run folder's checkpoints have."""
    return name == "checkpoint.pth" or (name.startswith("epoch_") and name.endswith(".pth") and name[6:-4].isdigit())


def checkpoint_progress(path):
    """(epoch, iteration) a complete checkpoint file stores (its tensors are not read), or None for a file that
    cannot be read as one (a truncated file has no zip central directory)."""
    if not (os.path.isfile(path) and zipfile.is_zipfile(path)):
        return None
    try:
        checkpoint = load_checkpoint(path, keys=("epoch", "iteration"), mmap=True)
    except CheckpointError:
        return None
    progress = (checkpoint["epoch"], checkpoint["iteration"])
    return progress if all(type(v) is int for v in progress) else None


def latest_checkpoint(directory):
    """The newest complete checkpoint.pth or epoch_NNN.pth in directory, by the epoch and iteration it stores
    (modification times are equal or wrong in copied folders and on some network drives), or None. Temporary
    files of an interrupted save ('.*.tmp') and files that cannot be read are skipped; of two equally new ones
    the rolling checkpoint.pth is taken."""
    if not os.path.isdir(directory):
        return None
    candidates = []
    for name in os.listdir(directory):
        progress = checkpoint_progress(os.path.join(directory, name)) if is_checkpoint_name(name) else None
        if progress is not None:
            candidates.append((progress, name == "checkpoint.pth", name, os.path.join(directory, name)))
    return max(candidates)[-1] if candidates else None


def resolve_checkpoint(path, checkpoint_dir):
    """The checkpoint to use: path if given, else the newest complete one in checkpoint_dir."""
    if path:
        return path
    latest = latest_checkpoint(checkpoint_dir)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint found in {checkpoint_dir!r}: train one with main_train.py, or "
                                f"pass --checkpoint PATH")
    return latest


def epoch_files(directory):
    """The epoch_NNN.pth names in directory, oldest first."""
    return sorted(n for n in os.listdir(directory) if is_checkpoint_name(n) and n != "checkpoint.pth")


def remove_old_epochs(output_dir, keep):
    """Delete all but the newest `keep` epoch_NNN.pth files (keep <= 0: keep all)."""
    if keep <= 0:
        return
    for name in epoch_files(output_dir)[:-keep]:
        os.remove(os.path.join(output_dir, name))


LOG_NAMES = ("losses.csv", "test_losses.csv", "loss_curve.png")  # what a run writes beside its checkpoints


@contextlib.contextmanager
def run_folder(directory, resumed_from=None, overwrite=False):
    """Hold the run folder `directory` for one training process (the main one) while the block runs.
    - A lock: an advisory lock (flock) on directory/.lock, which the operating system drops when the process
      ends in any way (a crash or kill -9 leaves nothing stuck); a second process is refused while it is held.
    - A folder holding another run's checkpoints (not the one resumed_from, a checkpoint path), or checkpoints
      of this run newer than resumed_from, is refused: resume the newest or choose another folder; overwrite=True
      deletes them (and another run's logs) and starts over.
    - Temporary files of writes a crash interrupted ('.*.tmp') are removed.
    RunFolderError with what to do otherwise."""
    os.makedirs(directory, exist_ok=True)
    with _lock(os.path.join(directory, ".lock")):
        found = sorted(n for n in os.listdir(directory) if is_checkpoint_name(n))
        ours = resumed_from and os.path.samefile(os.path.dirname(os.path.abspath(resumed_from)), directory)
        if ours:  # the checkpoints after the one resumed from belong to a future this run will not have
            start = checkpoint_progress(resumed_from)
            found = [n for n in found if (checkpoint_progress(os.path.join(directory, n)) or start) > start]
        if found:
            if not overwrite:
                names = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
                if ours:
                    raise RunFolderError(f"{directory} holds checkpoints newer than {resumed_from} ({names}): continue "
                                         f"from the newest with `python main_train.py --resume {directory}`, or "
                                         f"pass --overwrite to delete them and go on from {resumed_from}")
                raise RunFolderError(f"{directory} holds the checkpoints of another run ({names}): continue it with "
                                     f"`python main_train.py --resume {directory}`, choose another --output-dir, or "
                                     f"pass --overwrite to delete them and start over")
            logs = [] if ours else [n for n in LOG_NAMES if os.path.exists(os.path.join(directory, n))]
            for name in found + logs:  # a resumed run rewrites its logs from the checkpoint's history
                os.remove(os.path.join(directory, name))
        for name in os.listdir(directory):
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(directory, name))
        yield


@contextlib.contextmanager
def _lock(path):
    try:
        import fcntl  # POSIX; elsewhere the folder is not locked
    except ImportError:
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):  # no locks on this file system
                print(f"warning: cannot lock {path} ({e.strerror}): make sure no other run writes to this folder")
                yield
                return
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunFolderError(f"{os.path.dirname(path)} is in use by a training run ({holder}): wait for it "
                                 f"to end, or choose another --output-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield


def error_message(error):
    """An error's message in one line. A DataLoader worker's error comes back with the worker's traceback in its
    message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."); its last line is the
    original message."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in lines[1]:
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines)


def stop_on_sigterm():
    """Make SIGTERM (what a scheduler or a notebook's stop sends) end the run as Ctrl-C does: a KeyboardInterrupt,
    so that a checkpoint being written is abandoned cleanly (its temporary file removed) and the script can say
    which checkpoint to resume from."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")
    signal.signal(signal.SIGTERM, interrupt)


# ----------------------------------------------------------------------------------------------------
# Loss logs: the history a checkpoint stores, the CSV files and the curve
# ----------------------------------------------------------------------------------------------------
class LossLog:
    """The history of a run (a checkpoint's "history": {"train": [[iteration, total, focal, dice]],
    "test": [[epoch, total, focal, dice]], "epoch_iters": [[epoch, iteration at its end]], "epoch_times": [[epoch,
    seconds, device]], "test_map": [[epoch, AP, AP50, AP75]] (with --tensorboard)}) and, in the main process, its
    files: <output_dir>/losses.csv, <output_dir>/test_losses.csv, <output_dir>/loss_curve.png and, with
    tensorboard=True, TensorBoard event files in <output_dir>/tensorboard (losses and lr per logging window, test
    losses and mAP per epoch, against the iteration)."""

    def __init__(self, output_dir, history=None, write=True, tensorboard=False):
        self.output_dir = output_dir
        self.history = history or {"train": [], "test": [], "epoch_iters": []}
        for key in ("epoch_iters", "epoch_times", "test_map"):  # older checkpoints lack some
            self.history.setdefault(key, [])
        self.write = write
        self.writer = None
        if write:  # the CSVs restart from the history (rows a crashed run logged after its checkpoint go)
            for name, rows in (("losses.csv", self.history["train"]), ("test_losses.csv", self.history["test"])):
                first = "iteration" if name == "losses.csv" else "epoch"
                header = ",".join((first,) + LOSS_NAMES) + "\n"
                atomic_write(os.path.join(output_dir, name),
                             lambda f, rows=rows, header=header: f.write((header + "".join(map(_csv_line, rows)))
                                                                         .encode()))
            if tensorboard:
                self.writer = tensorboard_writer(os.path.join(output_dir, "tensorboard"), self.last_iteration())

    def last_iteration(self):
        """The iteration the history ends at (0 for a new run)."""
        ends = [row[1] for row in self.history["epoch_iters"]] + [row[0] for row in self.history["train"]]
        return int(max(ends, default=0))

    def _append(self, kind, row):
        self.history[kind].append(row)
        if self.write:
            path = os.path.join(self.output_dir, "losses.csv" if kind == "train" else "test_losses.csv")
            try:
                with open(path, "a") as f:
                    f.write(_csv_line(row))
            except OSError as e:
                raise write_error(path, e) from e

    def _scalars(self, prefix, names, values, iteration):
        if self.writer is not None:
            for name, value in zip(names, values):
                self.writer.add_scalar(f"{prefix}/{name}", value, iteration)

    def train(self, iteration, losses, lr=None):
        self._append("train", [iteration, *losses])
        self._scalars("train", LOSS_NAMES + ("lr",), [*losses] + ([lr] if lr is not None else []), iteration)

    def test(self, epoch, losses):
        self._append("test", [epoch, *losses])
        self._scalars("test", LOSS_NAMES, losses, self.last_iteration())

    def test_map(self, epoch, ap, ap50, ap75):
        """The epoch's mask mAP on the test split (kept in the history; TensorBoard's test/AP, AP50, AP75)."""
        self.history["test_map"].append([epoch, ap, ap50, ap75])
        self._scalars("test", ("AP", "AP50", "AP75"), (ap, ap50, ap75), self.last_iteration())

    def end_epoch(self, epoch, iteration, seconds=None, device=None):
        """The epoch ended at `iteration`; its training took `seconds` on `device` (utils.device_name's words)."""
        self.history["epoch_iters"].append([epoch, iteration])
        if seconds is not None:
            self.history["epoch_times"].append([epoch, float(seconds), device])

    def plot(self):
        if self.writer is not None:
            self.writer.flush()
        if self.write:
            return plot_loss_curve(self.history, os.path.join(self.output_dir, "loss_curve.png"))

    def close(self):
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer(log_dir, purge_step):
    """A TensorBoard SummaryWriter in log_dir. purge_step: events a crashed run wrote after its checkpoint's
    iteration are hidden, so a resumed run's curves do not double back."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"--tensorboard needs the tensorboard package ({e}): pip install tensorboard") from None
    return SummaryWriter(log_dir, purge_step=purge_step or None)


def _csv_line(row):
    return f"{int(row[0])}," + ",".join(f"{v:.6g}" for v in row[1:]) + "\n"


def loss_figure(history):
    """Total, focal (category) and dice (mask) losses against the iteration (handout 9.2): the train losses
    (means over each logging window) as lines, the test-split losses after each epoch as markers at the
    iteration that ended the epoch."""
    train = np.asarray(history["train"], dtype=float).reshape(-1, 4)  # (rows, [iteration, total, focal, dice])
    test = np.asarray(history["test"], dtype=float).reshape(-1, 4)  # (epochs, [epoch, total, focal, dice])
    epoch_end = dict((int(e), it) for e, it in history.get("epoch_iters", []))
    test_x = np.array([epoch_end.get(int(e), math.nan) for e in test[:, 0]])
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
    return fig


def plot_loss_curve(history, path):
    """loss_figure(history) written to path (atomically)."""
    fig = loss_figure(history)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# A run folder kept in a second place (the Colab notebook's Google Drive copy)
# ----------------------------------------------------------------------------------------------------
def mirror_folder(src, dst):
    """Copy every file of src that dst lacks or holds another version of (size or modification time) into dst,
    each through a temporary file and os.replace, so an interrupted copy leaves dst's old file whole; the run
    folder's lock and temporary files are left out, and a file hard-linked to one already copied only once
    (checkpoint.pth links the newest epoch file: resuming and main_infer.py find that one). Epoch files of dst
    older than every epoch file src holds are removed after the copies (the run deleted them, --keep-epochs); an
    src without epoch files (a wiped local disk) removes nothing. Returns the names copied."""
    copied = []
    if not os.path.isdir(src):
        return copied
    for root, _, names in os.walk(src):
        target_root = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(target_root, exist_ok=True)
        seen = set()  # (device, inode) of the linked files copied
        for name in sorted(names, key=lambda n: (n == "checkpoint.pth", n)):
            if name == ".lock" or name.endswith(".tmp"):
                continue
            source, target = os.path.join(root, name), os.path.join(target_root, name)
            stat = os.stat(source)
            if stat.st_nlink > 1:
                if (stat.st_dev, stat.st_ino) in seen:
                    continue
                seen.add((stat.st_dev, stat.st_ino))
            if os.path.exists(target) and (os.path.getsize(target), int(os.path.getmtime(target))) == (
                    stat.st_size, int(stat.st_mtime)):
                continue
            partial = os.path.join(target_root, f".{name}.{uuid.uuid4().hex}.tmp")
            try:
                shutil.copy2(source, partial)
                os.replace(partial, target)
            finally:
                if os.path.exists(partial):
                    os.remove(partial)
            copied.append(os.path.relpath(target, dst))
    # only once the copies are whole: an interrupted copy leaves Drive its older epochs
    kept = epoch_files(src)
    for name in epoch_files(dst) if kept else []:
        if name < kept[0]:
            os.remove(os.path.join(dst, name))
    return copied


def run_mirrored(command, src, dst, every=60):
    """Run command (a list) and, while it runs and once after, mirror_folder(src, dst) every `every` seconds.
    Returns the command's exit code."""
    process = subprocess.Popen(command)
    while True:
        try:
            code = process.wait(timeout=every)
        except subprocess.TimeoutExpired:
            code = None
        if dst:
            mirror_folder(src, dst)
        if code is not None:
            return code
