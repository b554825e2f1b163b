"""Continue a SOLO training run from its newest checkpoint, with the settings stored in the checkpoint.

  python resume_train.py                                    # newest complete checkpoint in checkpoints/
  python resume_train.py --output-dir checkpoints/demo      # ... of the demo run
  python resume_train.py --checkpoint checkpoints/epoch_010.pth --overwrite  # back to epoch 10: newer ones deleted
  python resume_train.py --output-dir runs/r50 --epochs 40   # train longer
  python resume_train.py --data-dir /content/data            # the data moved
  torchrun --nproc_per_node=N resume_train.py               # as many processes as the run had (keeps its lr steps)

This is `python main_train.py --resume <folder or checkpoint> [flags]`: this script runs exactly that command in
its own process. Every setting comes from the checkpoint; the flags main_train.py accepts on resume (--epochs,
--device, --workers, --data-dir, --keep-epochs, --overwrite, --test-only) are passed on, any other one that
differs from the run's is refused. The loss history, losses.csv, test_losses.csv and loss_curve.png continue
where the checkpoint left them (rows logged after it, by a run that then crashed, are dropped), and training goes
on at the checkpoint's epoch + 1 with the same model, optimizer, lr schedule, gradient scaler and RNG states, so
the result equals an uninterrupted run.
"""
import argparse
import os
import sys

MAIN_TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "main_train.py")


def get_args_parser():
    parser = argparse.ArgumentParser(description="Resume SOLO training from a checkpoint (main_train.py --resume); "
                                                 "other flags are passed on to main_train.py")
    parser.add_argument("--checkpoint", default=None, type=str,
                        help="checkpoint to continue from (default: the newest complete one in --output-dir)")
    parser.add_argument("--output-dir", default=None, type=str,
                        help="run folder to resume and write to (default: checkpoints, or --checkpoint's folder)")
    return parser


def main(args, rest=()):
    """The main_train.py command line (without the interpreter) that continues the run: args from
    get_args_parser().parse_known_args(), rest the flags passed on to main_train.py."""
    command = [MAIN_TRAIN, "--resume", args.checkpoint or args.output_dir or "checkpoints"]
    if args.output_dir and args.checkpoint:
        command += ["--output-dir", args.output_dir]
    return command + list(rest)


if __name__ == "__main__":
    command = [sys.executable, *main(*get_args_parser().parse_known_args())]
    os.execv(sys.executable, command)  # becomes main_train.py: same process, same exit code, same torchrun rank
