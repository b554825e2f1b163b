"""Loss logs: the history a checkpoint stores, its CSV files, the loss curve and TensorBoard."""
import math
import os

import matplotlib.pyplot as plt
import numpy as np

from atomic_files import atomic_write, write_error

LOSS_NAMES = ("total_loss", "focal_loss", "dice_loss")  # total = focal + 3 dice (handout 6.9.1)


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

