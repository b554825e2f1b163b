"""Checkpoints: the file format, atomic saving, loading with errors that name the file, the model a checkpoint
holds, and the newest complete checkpoint of a run folder."""
import os
import shutil
import zipfile

import torch

from atomic_files import atomic_write, fsync_dir, write_error
from errors import CheckpointError, MissingFileError
from model import ModelConfig, build_model
from utils import get_rng_state, set_rng_state

CHECKPOINT_FORMAT = "solo-checkpoint-v1"
CHECKPOINT_KEYS = ("format", "model", "model_cfg", "optimizer", "scheduler", "scaler", "epoch", "iteration",
                   "history", "rng", "args")


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


def converted_checkpoint(model, model_cfg, data_settings, converted_from):
    """The checkpoint of a converted published model (convert.py): CHECKPOINT_KEYS with no training state (no
    optimizer, epoch 0, empty history), the data settings inference needs (input_height, max_long_side), and
    'converted_from' (the source file, its naming scheme) that marks it: it predicts and starts new runs
    (main_train.py --init-from) but cannot be resumed."""
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_cfg": vars(model_cfg).copy(),
            "optimizer": None, "scheduler": None, "scaler": None, "epoch": 0, "iteration": 0,
            "history": {"train": [], "test": [], "test_map": [], "epoch_iters": [], "epoch_times": []},
            "rng": get_rng_state(), "args": dict(data_settings), "converted_from": dict(converted_from)}


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
    fsync_dir(directory)


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


def without_module_prefix(state):
    """A state dict without the 'module.' prefix DataParallel and DistributedDataParallel put on every key."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_model_state(model, state, source):
    """model.load_state_dict(state) after checking every key and shape; CheckpointError naming `source` and the
    first mismatches otherwise. A 'module.' prefix (a state dict saved from DistributedDataParallel) is dropped."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {source}: 'model' is a {type(state).__name__}, not a state dict")
    state = without_module_prefix(state)
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
        raise MissingFileError(f"no checkpoint found in {checkpoint_dir!r}: train one with main_train.py, or "
                               f"pass --checkpoint PATH")
    return latest
