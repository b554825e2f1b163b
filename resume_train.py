"""Continue a SOLO training run from its newest checkpoint, with the settings stored in the checkpoint.

  python resume_train.py                                    # newest complete checkpoint in checkpoints/
  python resume_train.py --checkpoint checkpoints/epoch_010.pth
  python resume_train.py --output-dir runs/r50 --epochs 40   # another run folder; train longer
  torchrun --nproc_per_node=N resume_train.py               # as many processes as the run had (keeps its lr steps)

Every main_train.py setting comes from the checkpoint's "args"; only the flags below override them. The loss
history, losses.csv, test_losses.csv and figures/loss_curve.png continue where the checkpoint left them (rows
logged after it, by a run that then crashed, are dropped). Training goes on at the checkpoint's epoch + 1 with the
same model, optimizer, lr schedule, gradient scaler and RNG states, so the result equals an uninterrupted run.
"""
import argparse
import os
import sys

import main_train
from main_train import CheckpointError, NonFiniteLossError, latest_checkpoint, load_checkpoint


def get_args_parser():
    parser = argparse.ArgumentParser(description="Resume SOLO training from a checkpoint")
    parser.add_argument("--checkpoint", default=None, type=str,
                        help="checkpoint to continue from (default: the newest complete one in --output-dir)")
    parser.add_argument("--output-dir", default=None, type=str,
                        help="run folder to search and to write to (default: checkpoints, or --checkpoint's folder)")
    parser.add_argument("--epochs", default=None, type=int, help="override the total number of epochs")
    parser.add_argument("--device", default=None, type=str, help="override the device ('cuda' or 'cpu')")
    parser.add_argument("--workers", default=None, type=int, help="override the data loading workers")
    parser.add_argument("--max-iters", default=None, type=int, help="override --max-iters (0 = off)")
    parser.add_argument("--figures-dir", default=None, type=str, help="override where loss_curve.png goes")
    # the speed flags change no result (the --compile and --channels-last runs equal the plain one up to float
    # rounding); --device-preprocess is decided again for the device unless given
    for flag in ("--device-preprocess", "--channels-last", "--compile"):
        parser.add_argument(flag, default=None, action=argparse.BooleanOptionalAction,
                            help=f"override main_train.py's {flag}")
    return parser


OVERRIDES = ("epochs", "device", "workers", "max_iters", "figures_dir", "device_preprocess", "channels_last",
             "compile")


def resume_args(args):
    """main_train's args for continuing: the checkpoint's stored args, --resume set, overrides applied."""
    directory = args.output_dir or "checkpoints"
    path = args.checkpoint or latest_checkpoint(directory)
    if path is None:
        raise CheckpointError(f"no checkpoint to resume in {directory!r} (looked for checkpoint.pth and "
                              f"epoch_NNN.pth): start a run with main_train.py, or pass --checkpoint FILE")
    stored = load_checkpoint(path)["args"]
    train_args = main_train.get_args_parser().parse_args([])  # defaults for flags newer than the checkpoint
    unknown = set(stored) - set(vars(train_args))
    vars(train_args).update({k: v for k, v in stored.items() if k not in unknown})
    train_args.resume = path
    train_args.output_dir = args.output_dir or os.path.dirname(path) or "."
    for name in OVERRIDES:
        if getattr(args, name) is not None:
            setattr(train_args, name, getattr(args, name))
    return train_args


def main(args):
    return main_train.main(resume_args(args))


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (NonFiniteLossError, CheckpointError) as e:
        sys.exit(f"error: {e}")
