"""The settings of a training run as main_train.py resolves them: the --demo preset, the model settings set with
--set FIELD=VALUE, and a resumed run's stored settings (explicit flags win over the preset; a resumed run keeps
its own)."""
import argparse
import dataclasses
import os
import sys

from checkpoint import latest_checkpoint, load_checkpoint, stored_settings
from compute_path import choose_path
from dataset import DATA_SETTINGS, check_input_height
from errors import CheckpointError
from finetune import init_settings
from model import ModelConfig

# The reduced configuration that learns on a CPU in minutes (docs/demo.md): the same target, loss and
# post-processing code as the full model; what shrinks is the model (a random ResNet-18 FPN, 2 convs of 64
# channels per tower, smaller grids, 64 SOLOv2 mask feature channels), the data (160x224 inputs of synthetic
# scenes without tiny objects: the masks, at stride 4, are 40x56 maps) and the schedule.
DEMO_MODEL = dict(backbone="resnet18", backbone_weights="none", stacked_convs=2, seg_feat_channels=64,
                  mask_feat_channels=64, num_grids=(16, 12, 10, 8, 6))
DEMO_DATA = dict(data_dir="data", synthetic=600, synthetic_min_size=30, input_height=160, augment=["hflip"])
DEMO_RUN = dict(batch_size=8, epochs=12, lr=0.0015, warmup_iters=30, device="cpu", log_every=10,
                output_dir="checkpoints/demo")
# the preset's settings that are not flags (stored with the run): AdamW and a cosine lr, which train the random
# backbone in fewer epochs than SGD's steps (docs/demo.md's ablation)
DEMO_OPTIMISATION = dict(optimizer="adamw", schedule="cosine")
# The demo's lr for heads that diverge at DEMO_RUN's: SOLOv2's kernel branch is one conv shared by every cell, so
# all positive cells pull it the same way at once; at lr 0.06 the kernels turn negative on the (non-negative) mask
# features within a few iterations, every mask goes to 0 and the dice loss stays at 1 (docs/departures.md)
DEMO_ARCH_LR = dict(solov2=0.001)
DEMO = {**DEMO_DATA, **DEMO_MODEL, **DEMO_RUN, **DEMO_OPTIMISATION}  # the whole preset, as bench.py's rows read it
# settings a run stores that runs stored before them did not: the value they had then (resume_args)
STORED_SINCE = dict(channels_last=False, synthetic_palette=DATA_SETTINGS["synthetic_palette"], optimizer="sgd",
                    schedule="step")

AUGMENTATIONS = ("hflip", "multiscale")  # main_train.py --augment's choices: args.hflip, args.multiscale

# ModelConfig fields --set may set: the classes come from the data
SETTABLE = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("num_classes", "class_names"))
# settings a resumed run may change; every other one comes from the checkpoint (an explicit other value is an
# error): they change where and how fast it runs, not what it computes
RESUME_OVERRIDES = ("data_dir", "train_data", "val_data", "output_dir", "device", "workers", "epochs", "keep_epochs",
                    "tensorboard", "overwrite", "resume", "test_only")


class TrainingArgumentParser(argparse.ArgumentParser):
    """main_train.py's parser. parse_args returns the run's settings resolved: --demo's preset under the explicit
    flags, --set's model settings as attributes (one per ModelConfig field), a resumed run's stored settings
    (resume_args), each setting checked (a bad value is a usage error naming it)."""

    def parse_args(self, args=None, namespace=None):
        return resolve_args(self, sys.argv[1:] if args is None else list(args))


def demo_description():
    """The --demo preset in words, for main_train.py --help."""
    flags = {**DEMO_DATA, **DEMO_RUN, **{k: v for k, v in DEMO_MODEL.items() if k in ("backbone", "backbone_weights")}}
    words = [f"--{key.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"
             for key, value in flags.items() if key != "synthetic_min_size"]
    model = [f"{key}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for key, v in DEMO_MODEL.items()
             if key not in ("backbone", "backbone_weights")]
    lrs = ", ".join(f"--arch {arch}: --lr {lr}" for arch, lr in DEMO_ARCH_LR.items())
    return (f"--demo stands for {' '.join(words)} --set {' '.join(model)} ({lrs}), with AdamW and a cosine lr "
            f"instead of SGD's steps, on a synthetic set whose objects are at least "
            f"{DEMO_DATA['synthetic_min_size']} pixels (sqrt(w*h)); explicit flags and --set still win.")


def parse_model_settings(items):
    """--set's FIELD=VALUE words -> {field: value}, each value of its ModelConfig field's type (num_grids: five
    comma-separated integers; trainable_backbone: true or false). ValueError naming the word otherwise."""
    defaults = ModelConfig()
    settings = {}
    for item in items or []:
        field, sep, text = item.partition("=")
        if not sep or field not in SETTABLE:
            raise ValueError(f"--set {item}: expected FIELD=VALUE with FIELD one of {', '.join(SETTABLE)} (the "
                             f"classes come from the data)")
        default = getattr(defaults, field)
        try:
            if isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("not true or false")
                value = text.lower() in ("true", "1")
            elif isinstance(default, tuple):
                value = tuple(int(v) for v in text.split(","))
            else:
                value = type(default)(text)
        except ValueError:
            kind = _KINDS.get(type(default), type(default).__name__)
            raise ValueError(f"--set {item}: {field} takes {kind} values like {field}={_format(default)}") from None
        settings[field] = value
    return settings


_KINDS = {bool: "true or false", tuple: "comma-separated integer", int: "integer", str: "string"}


def _format(value):
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def resolve_args(parser, argv):
    """The run's settings from the command line argv: parsed, with the --demo preset under the explicit flags,
    --set's model settings as attributes and, with --resume, the checkpoint's stored settings (only
    RESUME_OVERRIDES may be given another value). A bad value is a parser error (usage, exit 2)."""
    args = argparse.ArgumentParser.parse_args(parser, argv)
    given = given_flags(parser, argv)
    try:
        model_settings = parse_model_settings(args.set)
    except ValueError as e:
        parser.error(str(e))
    given |= set(model_settings)
    if getattr(args, "init_from", None):  # the model settings are the file's: the preset's give way (finetune.py)
        model_settings = init_settings(args, given, model_settings)
    if args.demo:
        arch = model_settings.get("arch", args.arch)
        preset = {**DEMO_DATA, **DEMO_RUN, **DEMO_MODEL, **DEMO_OPTIMISATION,
                  "lr": DEMO_ARCH_LR.get(arch, DEMO_RUN["lr"])}
        for key, value in preset.items():
            if key not in given and key not in model_settings:
                setattr(args, key, list(value) if isinstance(value, list) else value)  # the preset's list stays its own
    args.augment = [name for name in AUGMENTATIONS if name in (args.augment or [])]  # in a fixed order, once each
    args.hflip, args.multiscale = "hflip" in args.augment, "multiscale" in args.augment
    defaults = ModelConfig()
    for field in SETTABLE:  # one attribute per model setting: --set's, a flag's, the preset's or the default
        value = model_settings.get(field, getattr(args, field, getattr(defaults, field)))
        setattr(args, field, list(value) if isinstance(value, tuple) else value)
    try:  # the compute path the run takes, as booleans: what the checkpoint stores and a resumed run keeps
        compute = choose_path(args.device, args.amp)
    except ValueError as e:
        parser.error(str(e))
    args.amp, args.channels_last = compute.amp, compute.channels_last
    if args.train_data and not args.resume:
        if "synthetic" in given and args.synthetic:
            parser.error("--synthetic and --train-data choose the data twice: give one of them")
        args.synthetic = 0  # --demo's synthetic set gives way to your own data
    if args.resume:
        args = resume_args(parser, args, given)
    if args.schedule == "cosine" and "lr_steps" in given:
        parser.error("--lr-steps: this run's lr follows a cosine over its epochs (the --demo preset's), no steps")
    if args.val_data and not args.train_data:
        parser.error("--val-data needs --train-data (the course files have their own split)")
    try:
        check_input_height(args.input_height)
    except ValueError as e:
        parser.error(str(e))
    if args.log_every < 1:
        parser.error(f"--log-every must be >= 1, got {args.log_every}")
    try:
        ModelConfig.from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.backbone_weights == "checkpoint" and not args.resume and not getattr(args, "init_from", None):
        parser.error("--backbone-weights checkpoint: the backbone's weights come with a SOLO checkpoint; start "
                     "from one with --init-from FILE (convert.py makes one from a published model)")
    return args


def given_flags(parser, argv):
    """The names of the settings the command line sets itself (not by a default)."""
    not_given = object()
    blank = argparse.Namespace(**{name: not_given for name in vars(argparse.ArgumentParser.parse_args(parser, []))})
    blank.set = blank.augment = None  # --set and --augment extend the list they find
    parsed = vars(argparse.ArgumentParser.parse_args(parser, argv, blank))
    return {name for name, value in parsed.items() if value is not not_given and value is not None}


def resume_args(parser, args, given):
    """args with the run's settings from --resume's checkpoint (a file, or the newest in a folder)."""
    path = args.resume
    if os.path.isdir(path):
        path = latest_checkpoint(path)
        if path is None:
            raise CheckpointError(f"--resume {args.resume}: no checkpoint in this folder (looked for checkpoint.pth "
                                  f"and epoch_NNN.pth): start a run with main_train.py, or pass a checkpoint file")
    defaults = {**vars(argparse.ArgumentParser.parse_args(parser, [])), **dataclasses.asdict(ModelConfig())}
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
    defaults.update(amp=False, channels_last=False)  # stored as the path the run took (resolve_args)
    checkpoint = load_checkpoint(path, mmap=True)
    if "converted_from" in checkpoint:
        raise CheckpointError(f"--resume {path}: a converted published model (convert.py), not a training run: "
                              f"start a new run from its weights with --init-from {path}")
    stored = stored_settings(checkpoint, path, defaults)
    refused = [f"{_flag(k)} (the run has {stored[k]!r}, the command line {getattr(args, k)!r})"
               for k in sorted(given) if k in stored and k not in RESUME_OVERRIDES and k not in ("demo", "set")
               and getattr(args, k) != stored[k]]
    if refused:
        raise CheckpointError(f"--resume {path}: a resumed run keeps its settings; these differ: {'; '.join(refused)}."
                              f" Start a new run (another --output-dir) to change them")
    merged = vars(args).copy()
    merged.update({k: v for k, v in stored.items() if k in merged and k not in given})
    merged.update({k: v for k, v in STORED_SINCE.items() if k not in stored})  # what an older run had
    merged.update(resume=path, overwrite=args.overwrite, test_only=args.test_only)  # this command's, not the run's
    if "output_dir" not in given:  # the run folder is the checkpoint's own
        merged["output_dir"] = os.path.dirname(path) or "."
    return argparse.Namespace(**merged)


def _flag(name):
    """How the command line sets a setting: its flag, or --set for a model setting without one."""
    return f"--set {name}" if name in SETTABLE and name not in ("arch", "backbone", "backbone_weights") \
        else "--" + name.replace("_", "-")
