"""How the model computes on a device: its autocast precision and memory layout, chosen by the CPU's instruction
sets (docs/performance.md has the measurements behind the rule), and the device's name in words."""
import dataclasses
import os
import platform

import torch

# the instruction sets that decide a CPU's speed, as device_name prints them
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# a CPU with one of these computes bfloat16 in hardware; elsewhere bfloat16 is emulated and slower than float32
NATIVE_BF16 = ("amx_bf16", "avx512_bf16")
SWITCHES = ("auto", "on", "off")


def cpu_info(path="/proc/cpuinfo"):
    """(model name, set of instruction-set flags) of this machine's CPU, read from /proc/cpuinfo (Linux); the
    platform's processor name and no flags where that file is absent."""
    model, flags = platform.processor() or platform.machine(), set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    return model, flags


def device_name(device):
    """The GPU, or the CPU model with the instruction sets that decide its speed."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, compute capability {torch.cuda.get_device_capability(device)}"
    model, flags = cpu_info()
    features = " ".join(f for f in CPU_FEATURES if f in flags) or "none of " + " ".join(CPU_FEATURES)
    return (f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; {features}; torch kernels "
            f"{torch.backends.cpu.get_cpu_capability()}")


# ----------------------------------------------------------------------------------------------------
# The path: precision and layout
# ----------------------------------------------------------------------------------------------------
def memory_format(channels_last):
    """torch's memory format for a model or input in the channels_last layout or not."""
    return torch.channels_last if channels_last else torch.contiguous_format


def is_channels_last(tensor):
    """Whether a 4-D tensor is laid out channels_last, memory_format's inverse (a tensor both layouts describe, as
    one of a single channel or pixel, counts as NCHW)."""
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


@dataclasses.dataclass(frozen=True)
class ComputePath:
    """amp: the network's forward under autocast (autocast_settings' dtype); channels_last: the model's
    convolution weights, hence its activations, in the channels_last layout. why: the words of the choice."""
    amp: bool
    channels_last: bool
    why: str = ""

    def apply(self, model):
        """The model in this path's layout (in place, as Module.to; the weights' values do not change)."""
        return model.to(memory_format=memory_format(self.channels_last))

    def __str__(self):
        words = f"{'bfloat16 autocast' if self.amp else 'float32'}, {'channels_last' if self.channels_last else 'NCHW'}"
        return f"{words} ({self.why})" if self.why else words


def switch(value, name="--amp"):
    """'auto', 'on' or 'off' from a switch's value; True / False (a stored setting, a caller's bool) are 'on' /
    'off'. ValueError naming the switch otherwise."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in SWITCHES:
        raise ValueError(f"{name} takes auto, on or off, got {value!r}")
    return value


def choose_path(device, amp="auto", channels_last="auto", flags=None):
    """The ComputePath for `device`. 'on' and 'off' are obeyed; 'auto' decides by the CPU's flags (default: this
    machine's, cpu_info): on a CPU with native bfloat16 (NATIVE_BF16), bfloat16 autocast and channels_last,
    3.6x faster at 800x1088 and 2.3x in the demo's training than NCHW float32 where measured; on other CPUs
    float32 and NCHW, as bfloat16 is emulated there and channels_last alone measured no faster (docs/performance.md).
    On a GPU 'auto' is 'off' for both: they are --amp and the default layout there, as before."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: expected cpu, cuda or cuda:N") from None
    amp, channels_last = switch(amp, "--amp"), switch(channels_last, "--channels-last")
    if device.type != "cpu":
        auto, why = False, f"{device.type}: auto is off"
    else:
        flags = cpu_info()[1] if flags is None else set(flags)
        native = [f for f in NATIVE_BF16 if f in flags]
        auto = bool(native)
        why = f"auto: the CPU has {native[0]}" if native else "auto: the CPU has no native bfloat16"
    if "auto" not in (amp, channels_last):
        why = "as asked"
    return ComputePath(amp=amp == "on" or (amp == "auto" and auto),
                       channels_last=channels_last == "on" or (channels_last == "auto" and auto), why=why)


def add_path_arguments(parser):
    """--amp and --channels-last, each auto / on / off (a bare --amp is on, as it was before auto), for the
    inference scripts."""
    parser.add_argument("--amp", default="auto", nargs="?", const="on", choices=SWITCHES,
                        help="the network under bfloat16 autocast (float16 on GPUs older than the A100); "
                             "post-processing stays float32. auto (the default): on where the CPU computes bfloat16 "
                             "natively (AMX, AVX512-BF16), off elsewhere and on GPUs; a bare --amp is on")
    parser.add_argument("--channels-last", default="auto", choices=SWITCHES,
                        help="the model in the channels_last layout; auto: with bfloat16 on such CPUs, as --amp")
    return parser


# ----------------------------------------------------------------------------------------------------
# Autocast
# ----------------------------------------------------------------------------------------------------
def autocast_settings(device, amp):
    """(autocast dtype or None, use a GradScaler): bfloat16 on CPUs (native with AVX512-BF16 or AMX, emulated
    otherwise) and on GPUs of compute capability 8+ (A100, H100); float16 + GradScaler on older GPUs (T4, V100:
    torch.cuda.is_bf16_supported() says True there too, for emulated bfloat16)."""
    if not amp:
        return None, False
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16, True
    return torch.bfloat16, False


def autocast(device, amp):
    """The mixed-precision context of a forward pass: torch.autocast in autocast_settings' dtype, or a context that
    changes nothing without amp."""
    dtype, _ = autocast_settings(device, amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
