"""The run folder: one training run's checkpoints and logs, held by one process at a time (its lock), its epoch
files pruned to the newest, and kept in a second place while a run trains (the Colab notebook's Drive copy)."""
import contextlib
import errno
import os
import shutil
import socket
import subprocess
import uuid

from checkpoint import checkpoint_progress, is_checkpoint_name, latest_checkpoint
from errors import RunFolderError

LOG_NAMES = ("losses.csv", "test_losses.csv", "loss_curve.png")  # what a run writes beside its checkpoints


def epoch_files(directory):
    """The epoch_NNN.pth names in directory, oldest first."""
    return sorted(n for n in os.listdir(directory) if is_checkpoint_name(n) and n != "checkpoint.pth")


def remove_old_epochs(output_dir, keep):
    """Delete all but the newest `keep` epoch_NNN.pth files (keep <= 0: keep all)."""
    if keep <= 0:
        return
    for name in epoch_files(output_dir)[:-keep]:
        os.remove(os.path.join(output_dir, name))




def stopped_message(output_dir, reason):
    """The one line a stopped training run ends with: why, and the checkpoint of output_dir to continue from."""
    newest = latest_checkpoint(output_dir) if output_dir else None
    if newest is None:
        return f"error: {reason}; no checkpoint was written"
    return f"error: {reason}; the newest checkpoint is {newest}: continue with python main_train.py --resume {newest}"

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
