"""The run folder: one training run's checkpoints and logs, held by one process at a time (its lock), its epoch
files pruned to the newest, and kept in a second place while a run trains (the Colab notebook's Drive copy)."""
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess

from atomic_files import remove_temporaries, temporary_path, write_error
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
    - A lock: an advisory lock (a POSIX record lock, _lock) on directory/.lock, which the operating system drops
      when the process ends in any way (a crash or kill -9 leaves nothing stuck, its DataLoader workers do not
      inherit it); a second process is refused while it is held.
    - A folder holding another run's checkpoints (not the one resumed_from, a checkpoint path), or checkpoints
      of this run newer than resumed_from, is refused: resume the newest or choose another folder; overwrite=True
      deletes them (and another run's logs) and starts over.
    - Temporary files of writes a crash interrupted ('.*.tmp') are removed.
    RunFolderError with what to do otherwise; WriteError naming the folder or its lock file where they cannot be
    written (a full disk)."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise write_error(directory, e) from e
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
        remove_temporaries(directory)
        yield


_HELD = {}  # (device, inode) of each lock file this process holds (_lock) -> its holder, 'process PID on HOST'


@contextlib.contextmanager
def _lock(path):
    """Hold the lock file `path` while the block runs. RunFolderError naming the holder (the line the file holds,
    'process PID on HOST') while another process holds it; WriteError naming the file when it cannot be created
    or written (a full disk), and a lock file this call created is removed again.

    A POSIX record lock (fcntl.lockf), not flock: a flock lock belongs to the open file description, which forked
    children share, so the DataLoader workers of a run killed with kill -9 held its folder for the seconds they
    lived on. A record lock belongs to the process: forks do not inherit it, and the operating system drops it
    when the process ends, however it ends. Its catch: closing any descriptor of the file drops the process's
    lock, so a process opens the file once: a second hold in the same process is refused from _HELD, without
    opening it. On a file system without locks: a warning, and the block runs unlocked."""
    try:
        import fcntl  # POSIX; elsewhere the folder is not locked
    except ImportError:
        yield
        return
    try:
        stat = os.stat(path)
    except OSError:
        stat = None
    if stat is not None and (stat.st_dev, stat.st_ino) in _HELD:
        raise _in_use(path, _HELD[stat.st_dev, stat.st_ino])
    fd, created = _open_lock_file(path)
    key = None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise _in_use(path, os.pread(fd, 4096, 0).decode(errors="replace").strip()) from None
            print(f"warning: cannot lock {path} ({e.strerror}): make sure no other run writes to this folder")
            locked = False
        if locked:
            holder = f"process {os.getpid()} on {socket.gethostname()}"
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{holder}\n".encode())
            except OSError as e:
                if created:  # removed while still locked: no other process holds it
                    with contextlib.suppress(OSError):
                        os.remove(path)
                raise write_error(path, e) from e
            stat = os.fstat(fd)
            key = (stat.st_dev, stat.st_ino)
            _HELD[key] = holder
        yield
    finally:
        if key is not None:
            del _HELD[key]
        os.close(fd)  # drops the lock


def _in_use(path, holder):
    return RunFolderError(f"{os.path.dirname(path)} is in use by a training run ({holder or 'another process'}): "
                          f"wait for it to end, or choose another --output-dir")


def _open_lock_file(path):
    """(descriptor, whether this call created the file) of the lock file path, opened to read and write (lockf
    needs write access); WriteError naming it where it cannot be."""
    try:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            return os.open(path, os.O_RDWR), False
    except OSError as e:
        raise write_error(path, e) from e


def copy_if_present(source, target):
    """shutil.copy2(source, target) through a temporary file in target's folder and os.replace, so an interrupted
    copy leaves target's old file whole and no temporary file (except after kill -9: the next mirror_folder removes
    it). Returns False, copying nothing, when source vanished (the run removed it, --keep-epochs)."""
    partial = temporary_path(target)
    try:
        shutil.copy2(source, partial)
        os.replace(partial, target)
    except FileNotFoundError:
        if os.path.exists(source):
            raise
        return False
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return True


def mirror_folder(src, dst):
    """Copy every file of src that dst lacks or holds another version of (size or modification time) into dst,
    each through a temporary file and os.replace, so an interrupted copy leaves dst's old file whole; the run
    folder's lock and temporary files are left out, and a file hard-linked to one already copied only once
    (checkpoint.pth links the newest epoch file: resuming and main_infer.py find that one). A file the run removes
    while it is listed or copied (an old epoch file, --keep-epochs) is skipped. Temporary files that earlier
    interrupted copies left in dst are removed before the copies into each folder. Epoch files of dst older than
    every epoch file src holds are removed after the copies (the run deleted them, --keep-epochs); an src without
    epoch files (a wiped local disk) removes nothing. Returns the names copied."""
    copied = []
    if not os.path.isdir(src):
        return copied
    for root, _, names in os.walk(src):
        target_root = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(target_root, exist_ok=True)
        remove_temporaries(target_root)  # earlier copies' only: this call has not started one here yet
        seen = set()  # (device, inode) of the linked files copied
        for name in sorted(names, key=lambda n: (n == "checkpoint.pth", n)):
            if name == ".lock" or name.endswith(".tmp"):
                continue
            source, target = os.path.join(root, name), os.path.join(target_root, name)
            try:
                stat = os.stat(source)
            except FileNotFoundError:  # removed since the listing
                continue
            if stat.st_nlink > 1:
                if (stat.st_dev, stat.st_ino) in seen:
                    continue
                seen.add((stat.st_dev, stat.st_ino))
            if os.path.exists(target) and (os.path.getsize(target), int(os.path.getmtime(target))) == (
                    stat.st_size, int(stat.st_mtime)):
                continue
            if copy_if_present(source, target):
                copied.append(os.path.relpath(target, dst))
    # only once the copies are whole: an interrupted copy leaves Drive its older epochs
    kept = epoch_files(src)
    for name in epoch_files(dst) if kept else []:
        if name < kept[0]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(dst, name))
    return copied


class TrainingStopped(KeyboardInterrupt):
    """run_mirrored's interrupt (the notebook's stop button), raised once the command has ended and the run folder
    is mirrored: a KeyboardInterrupt that a notebook cell shows as its one line, `error: ...` (IPython shows an
    exception's _render_traceback_ in place of its traceback)."""

    def _render_traceback_(self):
        return [f"error: {self}"]


def stop_process(process, grace=60):
    """End a child process after an interrupt and return its exit code: a second for it to stop by itself (a
    terminal's Ctrl-C and Jupyter's interrupt reach its process group too; Colab's stop button only this process),
    then the interrupt forwarded (SIGINT: main_train.py stops and names its newest checkpoint) and the child waited
    for; killed when it has not ended `grace` seconds later, or on a second interrupt."""
    try:
        try:
            return process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        if os.name == "nt":
            process.terminate()  # no SIGINT for a child on Windows
        else:
            process.send_signal(signal.SIGINT)
        return process.wait(timeout=grace)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        process.kill()
        return process.wait()


def run_mirrored(command, src, dst, every=60, grace=60):
    """Run command (a list) and, while it runs, mirror_folder(src, dst) every `every` seconds (a failed copy, e.g.
    Drive gone for a moment, is a warning line: the next one catches up); then, in every case, mirror once more after
    the command ended. Returns the command's exit code. An interrupt (Ctrl-C; the notebook's stop button sends
    SIGINT to this process only) is forwarded to the command, which is waited for (stop_process: killed after
    `grace` seconds), the folder mirrored, and TrainingStopped raised: the notebook cell shows one line, `error:
    ...` with the newest checkpoint. Any other error here stops the command the same way before it is raised."""
    process, interrupted = subprocess.Popen(command), None
    try:
        while True:
            try:
                process.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                pass
            if dst:
                try:
                    mirror_folder(src, dst)
                except OSError as e:
                    print(f"warning: copying {src} to {dst} failed ({e}); trying again in {every} s", flush=True)
    except KeyboardInterrupt as e:
        interrupted = e
    finally:  # the command never runs on unwatched, and its last files are always copied
        code = stop_process(process, grace)
        if dst:
            mirror_folder(src, dst)
    if interrupted is not None:
        newest = latest_checkpoint(dst or src)  # the copy's: what the next session resumes from
        reason = f"training interrupted{f' ({interrupted})' if str(interrupted) else ''}, exit code {code}"
        raise TrainingStopped(f"{reason}; the newest checkpoint is {newest}: run the notebook again to resume from it"
                              if newest else f"{reason}; no checkpoint was written") from None
    return code
