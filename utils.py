"""Helpers the scripts share: devices, distributed set-up, RNG states, the optimiser and lr schedule, and
how an error or a signal ends a script."""
import contextlib
import math
import os
import random
import signal
import threading

import numpy as np
import torch
import torch.distributed as dist

from errors import DeviceError, UserError

BASE_LR, BASE_BATCH = 0.01, 16  # the authors' lr for 16 images per iteration
LR_GAMMA = 0.1  # the lr is multiplied by this at each of the lr steps (handout 7.1: divided by 10)
WARMUP_FACTOR = 1 / 3  # the authors' linear warm-up starts at lr / 3


# ----------------------------------------------------------------------------------------------------
# Devices, distributed mode
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


# ----------------------------------------------------------------------------------------------------
# RNG states, the optimiser and the lr schedule
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


MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4  # SGD (handout 7.1)
ADAMW_WEIGHT_DECAY = 0.05  # AdamW's decoupled weight decay (the CPU demo's optimiser, docs/demo.md)
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")


def build_optimizer(params, name, lr):
    """SGD with momentum (the handout's and the authors'), or AdamW (the --demo preset's, for its random-weight
    backbone: a setting of the preset, stored with the run, not a flag). ValueError for another name."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def scaled_lr(batch_size, world_size=1):
    """The linear scaling rule: 0.01 for 16 images per iteration (the authors' 8 GPUs x 2 images)."""
    return BASE_LR * batch_size * world_size / BASE_BATCH


def lr_factor(iteration, iters_per_epoch, lr_steps=(27, 33), warmup_iters=500, schedule="step", total_iters=None):
    """Multiplier of the base lr at a global iteration (0-based): with schedule 'step' (the authors') LR_GAMMA for
    each of lr_steps the epoch has reached, with 'cosine' half a cosine from 1 to 0 over total_iters; times a
    linear warm-up from WARMUP_FACTOR at iteration 0 to 1 at iteration warmup_iters. ValueError for another
    schedule (a stored run's, edited by hand)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(iteration, total_iters) / total_iters))
    else:
        factor = LR_GAMMA ** sum(iteration // iters_per_epoch >= step for step in lr_steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= WARMUP_FACTOR * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer, iters_per_epoch, lr_steps, warmup_iters, schedule="step", total_iters=None):
    """Per-iteration LambdaLR of lr_factor (step() after every iteration, so last_epoch counts the iterations
    done); its state_dict resumes it exactly."""
    def lr_lambda(iteration):
        return lr_factor(iteration, iters_per_epoch, lr_steps, warmup_iters, schedule, total_iters)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)



# ----------------------------------------------------------------------------------------------------
# Ending a script: one line for an error, a signal as Ctrl-C
# ----------------------------------------------------------------------------------------------------
def stop_on_sigterm():
    """Make SIGTERM (what a scheduler or a notebook's stop sends) end the run as Ctrl-C does: a KeyboardInterrupt,
    so that the script can say which checkpoint to resume from (a checkpoint being written is finished first:
    deferred_stop)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")
    signal.signal(signal.SIGTERM, interrupt)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_stop():
    """Let a stop signal (SIGINT, SIGTERM) that arrives while the block runs take effect only after it: the block
    (writing a checkpoint) finishes, then the signal is delivered as it would have been (Ctrl-C's or
    stop_on_sigterm's KeyboardInterrupt; without a handler, the end of the process). A second stop signal during
    the block is delivered at once: the block is abandoned (atomic_write removes its temporary file), and an error
    that this causes inside the block is reported as the stop, chained to it, unless it is a UserError (a full
    disk), which says more.

    Why wait rather than let the signal interrupt the write: torch.save's zip writer turns a KeyboardInterrupt
    raised inside its file's write() into 'RuntimeError: [enforce fail at inline_container.cc] unexpected pos',
    which no script catches, so a stop during a checkpoint write ended in a traceback. Waiting costs at most one
    checkpoint's write (SIGTERM's senders wait longer before SIGKILL) and leaves that checkpoint whole, so the
    stopped run resumes from it. Only in the main thread (the one where Python runs signal handlers); signals that
    are ignored or handled outside Python are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous, received = {}, []

    def record(signum, frame):
        if received:  # the second: now
            _deliver(signum, previous[signum], frame)
        received.append(signum)

    for signum in STOP_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not None and handler != signal.SIG_IGN:
            previous[signum] = signal.signal(signum, record)
    try:
        yield
    except Exception as e:
        if not received or isinstance(e, UserError):
            raise
        _restore(previous)
        try:
            _deliver(received[0], previous[received[0]], None)
        except BaseException as stop:
            raise stop from e
        raise
    finally:
        _restore(previous)
    if received:
        _deliver(received[0], previous[received[0]], None)


def _restore(handlers):
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def _deliver(signum, handler, frame):
    """Act on signum as `handler` (the signal's disposition before deferred_stop) would have."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:  # the default action: the process ends by the signal
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
