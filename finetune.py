"""Fine-tuning: a new run's model settings and starting weights from a SOLO checkpoint (main_train.py --init-from)."""
import dataclasses

import torch
import torch.nn as nn

from checkpoint import load_checkpoint, model_config, without_module_prefix
from errors import CheckpointError
from model import ModelConfig
from solo_head import PRIOR_BIAS

EXPECTED = "--init-from takes a SOLO checkpoint written by main_train.py or convert.py"
# the model settings a fine-tuning run may choose itself; every other one is the file's architecture, and the
# classes come from the new run's data
OWN_SETTINGS = ("trainable_backbone", "cate_norm")
ARCH_SETTINGS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                      if f.name not in OWN_SETTINGS + ("num_classes", "class_names"))
CATE_OUT = ("head.cate_out.weight", "head.cate_out.bias")  # the category output: one channel per class


def read_init_checkpoint(path, mmap=True):
    """(checkpoint dict, its ModelConfig) of --init-from's file; CheckpointError naming it and what was expected."""
    try:
        checkpoint = load_checkpoint(path, keys=("model", "model_cfg"), mmap=mmap)
        return checkpoint, model_config(checkpoint, path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {EXPECTED}") from None


def init_settings(args, given, model_settings):
    """The model settings of a run started with --init-from (train_settings.resolve_args): model_settings (--set's)
    completed with the file's: its architecture always, trainable_backbone and cate_norm unless the command line
    sets them. An explicit setting that contradicts the file's architecture (--arch, --backbone, --backbone-weights,
    --set stacked_convs=... and so on), or --resume beside --init-from, is a CheckpointError naming the file."""
    path = args.init_from
    if args.resume:
        raise CheckpointError(f"--init-from {path} and --resume {args.resume}: a resumed run continues from its own "
                              f"checkpoint (whose start was its --init-from); give --resume to continue a run, or "
                              f"--init-from (with a new --output-dir) to start one")
    stored = dataclasses.asdict(read_init_checkpoint(path)[1])
    settings = {}
    contradictions = []
    for field in ARCH_SETTINGS + OWN_SETTINGS:
        settings[field] = stored[field]
        if field not in given:
            continue
        value = model_settings[field] if field in model_settings else getattr(args, field)
        if field in OWN_SETTINGS:
            settings[field] = value
        elif _plain(value) != _plain(stored[field]):
            flag = f"--{field.replace('_', '-')} " if field in ("arch", "backbone", "backbone_weights") else \
                f"--set {field}="
            contradictions.append(f"{flag}{_words(value)} (the file has {_words(stored[field])})")
    if contradictions:
        raise CheckpointError(f"--init-from {path}: the model's architecture is the file's, and the command line "
                              f"contradicts it: {'; '.join(contradictions)}. Drop those flags (only --set "
                              f"trainable_backbone=... and --set cate_norm=... may differ from the file)")
    return {**model_settings, **settings}


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _words(value):
    """A setting's value as the command line writes it."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclasses.dataclass
class InitReport:
    """What load_init_weights loaded: its str is the one summary a run prints."""
    source: str
    loaded: list  # the model's tensors that came from the file
    not_loaded: dict  # the model's other tensors -> why
    unused: list  # the file's tensors the model has no place for

    def __str__(self):
        total = len(self.loaded) + len(self.not_loaded)
        lines = [f"--init-from {self.source}: loaded {len(self.loaded)} of the model's {total} tensors"]
        reasons = {}
        for key, reason in self.not_loaded.items():
            reasons.setdefault(reason, []).append(key)
        for reason, keys in reasons.items():
            lines.append(f"  not loaded, {reason}: {_group(keys)}")
        if self.unused:
            lines.append(f"  the file's tensors without a place in the model: {_group(self.unused)}")
        return "\n".join(lines)


def _classes(names, most=3):
    """A list of class names in a few words: '3: vehicle, person, animal', '80: person, bicycle, car, ...'."""
    return f"{len(names)}: {', '.join(names[:most])}{', ...' if len(names) > most else ''}"


def _group(keys, most=6):
    """keys in a few words: the names themselves, or with more than `most` of them, a count per module prefix."""
    if len(keys) <= most:
        return ", ".join(keys)
    counts = {}
    for key in keys:
        prefix = ".".join(key.split(".")[:2])
        counts[prefix] = counts.get(prefix, 0) + 1
    return ", ".join(f"{prefix}.* ({n})" for prefix, n in counts.items())


def load_init_weights(model, model_cfg, path):
    """Start `model` (built from model_cfg by build_model(..., load_backbone_weights=False)) from --init-from's
    checkpoint `path`: every tensor whose name and shape fit is loaded. When model_cfg's classes differ from the
    file's (count, names or order), the category output (CATE_OUT) is re-initialised as the SOLO authors do:
    normal(std 0.01) weights and the prior bias (probability 0.01). Returns the InitReport; CheckpointError naming
    the file when it holds no fitting tensor, or NaN or infinite ones."""
    checkpoint, file_cfg = read_init_checkpoint(path)
    state = checkpoint["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"--init-from {path}: 'model' is a {type(state).__name__}, not a state dict; "
                              f"{EXPECTED}")
    state = without_module_prefix(state)
    new_classes = tuple(file_cfg.class_names) != tuple(model_cfg.class_names)
    fitting, not_loaded = {}, {}
    for key, value in model.state_dict().items():
        stored = state.get(key)
        if new_classes and key in CATE_OUT:
            not_loaded[key] = (f"re-initialised for the new classes (the file's {_classes(file_cfg.class_names)}; "
                               f"the data's {_classes(model_cfg.class_names)})")
        elif not torch.is_tensor(stored):
            not_loaded[key] = "not in the file (kept as built)"
        elif stored.shape != value.shape:
            not_loaded[key] = "shape differs from the file's (kept as built)"
        else:
            fitting[key] = stored
    if not fitting:
        raise CheckpointError(f"--init-from {path}: none of its tensors fits the model built from its model_cfg; "
                              f"{EXPECTED}")
    broken = [k for k, v in fitting.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"--init-from {path} holds NaN or infinite weights ({len(broken)} tensors, the first "
                              f"{broken[0]}): a run cannot start from it")
    model.load_state_dict(fitting, strict=False)
    if new_classes:
        nn.init.normal_(model.head.cate_out.weight, std=0.01)
        nn.init.constant_(model.head.cate_out.bias, PRIOR_BIAS)
    unused = [k for k in state if k not in fitting and k not in not_loaded]
    return InitReport(str(path), list(fitting), not_loaded, unused)
