"""Train SOLO (CIS680 handout section 7) with the SOLO authors' schedule.

  CPU demo (reduced configuration on synthetic data, minutes on 2 cores; `--help` prints its full command):
      python main_train.py --demo && python main_infer.py --checkpoint-dir checkpoints/demo --figures-dir figures/demo
  one GPU (the handout's setting: frozen COCO ResNet-50 FPN, 800x1088, batch 2 per GPU as the authors):
      python main_train.py --data-dir data --amp
  the successors, with the same commands and data: --arch decoupled (Decoupled SOLO) or --arch solov2 (SOLOv2)
      python main_train.py --data-dir data --amp --arch solov2 --output-dir checkpoints/solov2
  your own COCO-format data (a json and an image folder per split; without --val-data 20% of the training images):
      python main_train.py --train-data train.json train_images/ --val-data val.json val_images/ --amp
  fine-tune a trained or converted SOLO checkpoint on your data (its architecture; new classes, new category output):
      python main_train.py --init-from solo_r50.pth --train-data train.json train_images/ --output-dir runs/mine
  several GPUs on one machine (N processes, one per GPU; batch size is per GPU):
      torchrun --nproc_per_node=N main_train.py --data-dir data --amp
  continue an interrupted run with its stored settings (newest checkpoint of the folder, or a file):
      python main_train.py --resume checkpoints          (the same: python resume_train.py)
  the test-split losses of a checkpoint, no training:
      python main_train.py --resume checkpoints/epoch_035.pth --test-only

Learning rate: 0.01 for 16 images per iteration, scaled linearly with the total batch, i.e.
lr = 0.01 * batch_size * world_size / 16 (0.00125 for one GPU at batch 2) unless --lr is given. SGD, momentum 0.9,
weight decay 1e-4, 36 epochs; the lr is divided by 10 at the start of (0-based) epochs 27 and 33; a linear warm-up
over the first 500 iterations from lr/3; gradient-norm clipping at 35 (the authors' solo_r50_fpn_8gpu_3x.py).

Epochs are 0-based everywhere: epoch_000.pth is written after the first epoch and holds "epoch": 0.
Outputs in --output-dir: checkpoint.pth (the newest, a hard link to its epoch file), epoch_NNN.pth (the newest
--keep-epochs), losses.csv (train losses, the mean of each --log-every window), test_losses.csv (one row per
epoch), loss_curve.png; with --tensorboard, tensorboard/ (view with `tensorboard --logdir <output-dir>`).
The write-up of a run (figures, settings, mAP; report.html and report.pdf): python report.py --checkpoint-dir DIR
"""
import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from backbone import ARCHITECTURES
from checkpoint import (check_classes, link_checkpoint, load_checkpoint, model_config, restore_training,
                        save_checkpoint, training_checkpoint)
from coco_eval import map_summary
from dataset import BuildDataLoader, build_datasets, multiscale_heights, synthetic_options
from engine import evaluate, evaluate_map, train_one_epoch
from errors import NonFiniteLossError, RunFolderError, UserError, WriteError, error_message
from finetune import load_init_weights
from loss_log import LossLog
from model import ARCHS, ModelConfig, build_model
from run_folder import remove_old_epochs, run_folder, stopped_message
from train_settings import AUGMENTATIONS, RESUME_OVERRIDES, SETTABLE, TrainingArgumentParser, demo_description
from compute_path import SWITCHES, ComputePath, autocast_settings, device_name, memory_format
from utils import (build_optimizer, build_scheduler, deferred_stop, init_distributed,
                   is_main_process, prepare_device, scaled_lr, seed_everything, stop_on_sigterm)


def get_args_parser(add_help=True):
    """The flags, grouped as torchvision's train.py groups them. Its parse_args resolves the run's settings
    (train_settings.resolve_args: --demo, --set, --resume)."""
    parser = TrainingArgumentParser(description="SOLO training (CIS680 handout section 7)", add_help=add_help,
                                    epilog=demo_description())
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="data", type=str, help="folder holding the four data files")
    data.add_argument("--train-data", default=None, type=str, nargs=2, metavar=("JSON", "IMAGES"),
                      help="your own COCO-format data instead: the training json and the folder of its images")
    data.add_argument("--val-data", default=None, type=str, nargs=2, metavar=("JSON", "IMAGES"),
                      help="with --train-data: the validation json and images (default: 20%% of --train-data's)")
    data.add_argument("--empty-images", default="skip", choices=("skip", "keep"),
                      help="with --train-data: training images without objects are left out (the SOLO authors') "
                           "or trained on as background")
    data.add_argument("--synthetic", default=0, type=int,
                      help="N > 0: train on a synthetic dataset of N images (written under --data-dir if missing)")
    data.add_argument("--input-height", default=800, type=int,
                      help="network input height, a multiple of 32; the width keeps the 4:3 aspect (800 -> "
                           "800x1066, padded 800x1088)")
    data.add_argument("--augment", default=None, nargs="+", action="extend", choices=AUGMENTATIONS,
                      help="train-split augmentation: hflip, random horizontal flips (p = 0.5); multiscale, the SOLO "
                           "authors' 3x recipe, each batch at an input height drawn from 0.8-1 x --input-height in "
                           "steps of 32 (800: 640, 672, ..., 800). Default: none, the handout's")
    # --hflip: the older spelling of --augment hflip, kept working for existing commands (not listed in --help)
    data.add_argument("--hflip", dest="augment", action="append_const", const="hflip", help=argparse.SUPPRESS)
    data.add_argument("--workers", default=2, type=int, help="data loading worker processes per training process")
    # the smallest object of a newly written synthetic set (sqrt(w*h), 300x400 pixels): the --demo preset's 30;
    # and its palette (synthetic.py: one for all classes); hflip and multiscale: --augment's two switches
    # (train_settings.resolve_args sets them)
    parser.set_defaults(synthetic_min_size=14, synthetic_palette="shared", hflip=False, multiscale=False)
    # the optimiser and the lr after warm-up: the authors' SGD and steps; the --demo preset's may differ
    parser.set_defaults(optimizer="sgd", schedule="step")

    model = parser.add_argument_group("model (model.ModelConfig; every field settable with --set)")
    model.add_argument("--arch", default=ModelConfig.arch, choices=ARCHS,
                       help="the head: 'solo' (the handout's), 'decoupled' (Decoupled SOLO) or 'solov2' (SOLOv2)")
    model.add_argument("--backbone", default=ModelConfig.backbone, choices=ARCHITECTURES, help="FPN backbone")
    model.add_argument("--backbone-weights", default=ModelConfig.backbone_weights, type=str,
                       help="'coco' (torchvision's COCO Mask R-CNN weights), 'none' (random) or a weights file")
    model.add_argument("--init-from", default=None, type=str, metavar="FILE",
                       help="start from this SOLO checkpoint's weights (a run's or convert.py's): its architecture, "
                            "every tensor whose shape fits, a new category output when the data's classes differ "
                            "(docs/training.md)")
    model.add_argument("--set", default=None, nargs="+", action="extend", metavar="FIELD=VALUE",
                       help="model settings, repeatable: " + ", ".join(SETTABLE[3:]) + " (e.g. --set stacked_convs=4 "
                            "num_grids=40,36,24,16,12 init=xavier cate_norm=mean trainable_backbone=true; "
                            "defaults: the handout's model, docs/departures.md for init and cate_norm)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch-size", default=2, type=int,
                       help="images per process and iteration (the authors use 2 per GPU)")
    optim.add_argument("--epochs", default=36, type=int, help="number of epochs")
    optim.add_argument("--lr", default=None, type=float,
                       help="initial lr (default: 0.01 * batch_size * world_size / 16)")
    optim.add_argument("--lr-steps", default=[27, 33], type=int, nargs="+",
                       help="0-based epochs at whose start the lr is divided by 10")
    optim.add_argument("--warmup-iters", default=500, type=int, help="linear warm-up iterations from lr/3 (0 = none)")
    optim.add_argument("--clip-grad", default=35.0, type=float, help="gradient-norm clipping (0 = off)")
    optim.add_argument("--amp", default="auto", nargs="?", const="on", choices=SWITCHES,
                       help="mixed precision: bfloat16 on CPUs and on GPUs from the A100 on, float16 with a GradScaler "
                            "on older GPUs (T4, V100). auto (the default): on, with the channels_last layout, where "
                            "the CPU computes bfloat16 natively (AMX, AVX512-BF16); off elsewhere and on GPUs. A bare "
                            "--amp is on. The run stores the path it took (docs/performance.md)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=str,
                     help="'cuda' or 'cpu'; under torchrun each process takes cuda:LOCAL_RANK")
    run.add_argument("--seed", default=0, type=int, help="seed of the initialisation, shuffling and flips")
    run.add_argument("--output-dir", default="checkpoints", type=str, help="the run folder: checkpoints and logs")
    run.add_argument("--log-every", default=100, type=int, help="log the mean losses every N iterations")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log the losses, the lr and, after each epoch, the test split's mask mAP (one "
                          "inference pass) to TensorBoard files in <output-dir>/tensorboard (needs tensorboard)")
    run.add_argument("--keep-epochs", default=3, type=int,
                     help="keep the newest N epoch_NNN.pth files (0 = all); checkpoint.pth is always the newest")
    run.add_argument("--resume", default=None, type=str,
                     help="continue the run of this checkpoint, or of the newest in this folder, with its stored "
                          "settings (only " + ", ".join("--" + k.replace("_", "-") for k in RESUME_OVERRIDES[:-3])
                          + " may change)")
    run.add_argument("--overwrite", action="store_true",
                     help="start the run even where --output-dir holds another run's checkpoints, deleting them and "
                          "its logs (default: refuse, so that no finished run is lost by mistake)")
    run.add_argument("--test-only", action="store_true",
                     help="print the test-split losses of the model (--resume's checkpoint) and stop")
    run.add_argument("--demo", action="store_true",
                     help="the CPU demo's preset of model, data and schedule (see the end of --help)")
    return parser


def main(args):
    rank, world_size, device = init_distributed(args.device)
    try:
        return train(args, rank, world_size, prepare_device(device, fixed_input_size=True))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world_size, device):
    if args.lr is None:
        args.lr = scaled_lr(args.batch_size, world_size)
    seed_everything(args.seed + 1000 * rank)
    checkpoint = load_checkpoint(args.resume) if args.resume else None

    # data: the same 80/20 split as every script; each process reads its share of the shuffled train split. On a
    # GPU the workers send uint8 images for the device to preprocess (dataset.preprocess_batch). Process 0 goes
    # first, so that a missing synthetic dataset is written once.
    if rank > 0:
        dist.barrier()
    train_set, test_set = build_datasets(args.data_dir, args.synthetic, args.input_height, args.hflip,
                                         synthetic_options(vars(args)), raw=device.type == "cuda",
                                         train_data=args.train_data, val_data=args.val_data,
                                         empty_images=args.empty_images)
    if rank == 0 and world_size > 1:
        dist.barrier()
    train_sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    test_sampler = DistributedSampler(test_set, num_replicas=world_size, rank=rank, shuffle=False)
    iters_per_epoch = math.ceil(len(train_sampler) / args.batch_size)
    test_loader = BuildDataLoader(test_set, args.batch_size, False, args.workers, sampler=test_sampler).loader()

    # model, optimizer, schedule; on resume the model's settings are the checkpoint's
    class_names = train_set.dataset.class_names  # the classes come from the data
    model_cfg = model_config(checkpoint, args.resume) if checkpoint else dataclasses.replace(
        ModelConfig.from_args(args), num_classes=len(class_names) + 1, class_names=class_names)
    check_classes(class_names, model_cfg.class_names, args.resume)  # a resumed run's data
    init_from = None if checkpoint else getattr(args, "init_from", None)  # a resumed run has its own weights
    model = build_model(model_cfg, load_backbone_weights=checkpoint is None and not init_from)
    if init_from:
        report = load_init_weights(model, model_cfg, init_from)
        if is_main_process():
            print(report)
    model = model.to(device, memory_format=memory_format(args.channels_last))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, args.optimizer, args.lr)
    scheduler = build_scheduler(optimizer, iters_per_epoch, args.lr_steps, args.warmup_iters, args.schedule,
                                args.epochs * iters_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_settings(device, args.amp)[1])
    history, start_epoch = None, 0
    if checkpoint:
        history, start_epoch = restore_training(checkpoint, args.resume, model, optimizer, scheduler, scaler)
        if is_main_process() and checkpoint.get("iters_per_epoch", iters_per_epoch) != iters_per_epoch:
            print(f"warning: {iters_per_epoch} iterations per epoch now, {checkpoint['iters_per_epoch']} in the "
                  f"checkpoint (another number of processes): the lr steps move")
        del checkpoint
    model_without_ddp = model  # the module whose state dict is saved
    if world_size > 1:
        # every parameter gets a gradient in every step (each level's mask output is in the loss, with a zero
        # weight when the batch has no object), so DDP needs no search for unused parameters
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    if args.test_only:
        test_loss = evaluate(model_without_ddp, test_loader, device, args)
        if is_main_process():
            print(f"test losses of {args.resume or 'the initial model'}: total {test_loss[0]:.4f}, focal "
                  f"{test_loss[1]:.4f}, dice {test_loss[2]:.4f}")
        return dict(test_loss=test_loss)

    # the run folder is this run's while it trains: locked, another run's checkpoints refused (main process)
    with contextlib.ExitStack() as held:
        refused = None
        if is_main_process():
            try:
                held.enter_context(run_folder(args.output_dir, args.resume, args.overwrite))
            except RunFolderError as e:
                refused = e
        if world_size > 1:  # every process stops, not only the main one
            box = [str(refused) if refused else None]
            dist.broadcast_object_list(box, src=0)
            refused = RunFolderError(box[0]) if box[0] else None
        if refused:
            raise refused
        log = held.enter_context(contextlib.closing(LossLog(args.output_dir, history, write=is_main_process(),
                                                              tensorboard=args.tensorboard)))
        device_label = f"{world_size} x {device_name(device)}" if world_size > 1 else device_name(device)
        if is_main_process():
            print(f"SOLO training: {len(train_set)} train / {len(test_set)} test images, {world_size} process(es) "
                  f"x batch {args.batch_size}, {iters_per_epoch} iterations per epoch, lr {args.lr:g}, device "
                  f"{device} ({ComputePath(args.amp, args.channels_last)}), epochs {start_epoch}..{args.epochs - 1}")
            if start_epoch >= args.epochs:
                print(f"nothing to train: the checkpoint has finished epoch {start_epoch - 1} of 0..{args.epochs - 1}"
                      f" (pass a larger --epochs to go on)")
        summary = dict(epoch=start_epoch - 1, iteration=scheduler.last_epoch, checkpoint=args.resume, test_loss=None,
                       train_loss=log.history["train"][-1][1:] if log.history["train"] else None)

        for epoch in range(start_epoch, args.epochs):
            # the epoch's randomness is a function of (seed, epoch, rank) only, so a resumed run repeats it exactly
            seed_everything(args.seed + epoch + 1000 * rank)
            train_sampler.set_epoch(epoch)  # shuffles with seed + epoch, the same order on every process
            # a fresh loader per epoch: its workers draw their seeds from the RNG just seeded
            train_loader = BuildDataLoader(train_set, args.batch_size, False, args.workers, sampler=train_sampler,
                                           heights=multiscale_heights(args.input_height) if args.multiscale
                                           else None).loader()
            started = time.perf_counter()
            train_one_epoch(model, optimizer, scheduler, scaler, train_loader, device, epoch, args, log)
            del train_loader
            log.end_epoch(epoch, scheduler.last_epoch, time.perf_counter() - started, device_label)
            test_loss = evaluate(model_without_ddp, test_loader, device, args) if len(test_set) else None
            if test_loss is not None:
                if not all(math.isfinite(v) for v in test_loss):  # as a non-finite train loss: stop, write nothing
                    raise NonFiniteLossError(f"non-finite test loss after epoch {epoch}: total {test_loss[0]}, focal "
                                             f"{test_loss[1]}, dice {test_loss[2]}. Stopped; the newest checkpoint in "
                                             f"{args.output_dir} is the last good one.")
                log.test(epoch, test_loss)
                if is_main_process():
                    print(f"epoch {epoch}: test losses total {test_loss[0]:.4f}, focal {test_loss[1]:.4f}, "
                          f"dice {test_loss[2]:.4f}")
            if args.tensorboard and len(test_set) and is_main_process():
                metrics = map_summary(evaluate_map(model_without_ddp, test_set, device, args.batch_size,
                                                   args.workers, args.amp))
                log.test_map(epoch, metrics["AP"], metrics["AP50"], metrics["AP75"])
            if is_main_process():
                epoch_path = os.path.join(args.output_dir, f"epoch_{epoch:03d}.pth")
                with deferred_stop():  # Ctrl-C or SIGTERM now stops the run once the checkpoint is whole
                    save_checkpoint(training_checkpoint(model_without_ddp, model_cfg, optimizer, scheduler, scaler,
                                                        epoch, log.history, args, iters_per_epoch, world_size),
                                    epoch_path)
                    link_checkpoint(epoch_path, os.path.join(args.output_dir, "checkpoint.pth"))
                    remove_old_epochs(args.output_dir, args.keep_epochs)
                log.plot()
            if world_size > 1:
                dist.barrier()  # no process races ahead of the checkpoint
            summary.update(epoch=epoch, iteration=scheduler.last_epoch, test_loss=test_loss,
                           checkpoint=os.path.join(args.output_dir, "checkpoint.pth"),
                           train_loss=log.history["train"][-1][1:])
    return summary


if __name__ == "__main__":
    stop_on_sigterm()
    args = None
    try:
        args = get_args_parser().parse_args()
        main(args)
    except KeyboardInterrupt as e:
        sys.exit(stopped_message(args and args.output_dir, e.args[0] if e.args else "interrupted (Ctrl-C)"))
    except WriteError as e:
        sys.exit(stopped_message(args and args.output_dir, e.strerror))
    except UserError as e:
        sys.exit(f"error: {error_message(e)}")
