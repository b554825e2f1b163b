"""The compute path (compute_path.py): bfloat16 autocast and channels_last where the CPU computes bfloat16
natively, float32 NCHW elsewhere and on GPUs unless asked, each forced either way; the scripts' switches; a
training run stores the path it took and a resumed run keeps it."""
import pytest
import torch

import compute_path
import main_infer
import report
from checkpoint import CHECKPOINT_KEYS
from compute_path import choose_path, cpu_info, is_channels_last, memory_format
from conftest import parse_train
from errors import CheckpointError
from model import build_model

AMX = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16"}
AVX2 = {"avx2", "fma"}


@pytest.mark.parametrize("flags, native", [(AMX, "amx_bf16"), (AVX512_BF16, "avx512_bf16")])
def test_a_cpu_with_native_bfloat16_gets_bfloat16_and_channels_last(flags, native):
    path = choose_path("cpu", flags=flags)
    assert (path.amp, path.channels_last) == (True, True)
    assert str(path) == f"bfloat16 autocast, channels_last (auto: the CPU has {native})"


def test_a_cpu_without_native_bfloat16_stays_float32_nchw():
    for flags in (AVX2, set()):
        path = choose_path("cpu", flags=flags)
        assert (path.amp, path.channels_last) == (False, False)
        assert str(path) == "float32, NCHW (auto: the CPU has no native bfloat16)"


@pytest.mark.parametrize("flags", [AMX, AVX2])
def test_each_switch_forces_its_half_either_way(flags):
    assert (choose_path("cpu", "on", "on", flags=flags).amp, choose_path("cpu", "on", "on", flags=flags)
            .channels_last) == (True, True)
    off = choose_path("cpu", "off", "off", flags=flags)
    assert (off.amp, off.channels_last, off.why) == (False, False, "as asked")
    # one forced, the other auto: the auto half follows the CPU
    native = flags is AMX
    assert choose_path("cpu", "off", flags=flags) == choose_path("cpu", False, "auto", flags=flags)
    assert choose_path("cpu", "off", flags=flags).channels_last is native
    assert choose_path("cpu", "auto", "off", flags=flags).amp is native
    assert choose_path("cpu", True, flags=flags).amp  # a stored bool is a forced switch


def test_on_a_gpu_auto_is_off_and_on_is_obeyed():
    assert choose_path("cuda", flags=AMX) == compute_path.ComputePath(False, False, "cuda: auto is off")
    assert choose_path("cuda:1", "on", flags=AVX2).amp and not choose_path("cuda:1", "on", flags=AVX2).channels_last


def test_bad_values_name_the_switch_or_the_device():
    with pytest.raises(ValueError, match=r"--amp takes auto, on or off, got 'yes'"):
        choose_path("cpu", "yes")
    with pytest.raises(ValueError, match=r"--channels-last takes auto, on or off, got 1"):
        choose_path("cpu", "on", 1)
    with pytest.raises(ValueError, match=r"--device gpu: expected cpu, cuda or cuda:N"):
        choose_path("gpu")


def test_the_flags_are_read_from_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2GHz\nflags\t\t: fpu avx2 amx_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Some CPU @ 2GHz\nflags\t\t: fpu avx2 amx_bf16\n")
    assert cpu_info(str(info)) == ("Some CPU @ 2GHz", {"fpu", "avx2", "amx_bf16"})
    assert cpu_info(str(tmp_path / "absent"))[1] == set()


def test_apply_puts_the_convolutions_in_the_layout_and_keeps_the_weights():
    model = build_model(dict(backbone="resnet18", backbone_weights="none", stacked_convs=1, seg_feat_channels=32,
                             num_grids=(4, 3, 2, 2, 2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = model.backbone.body.conv1.weight
    choose_path("cpu", "off", "on").apply(model)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    choose_path("cpu", "off", "off").apply(model)
    assert model.backbone.body.conv1.weight.is_contiguous()


@pytest.mark.parametrize("script", [main_infer, report])
def test_the_inference_scripts_take_auto_on_off_and_a_bare_amp(script, capsys):
    parse = script.get_args_parser().parse_args
    assert (parse([]).amp, parse([]).channels_last) == ("auto", "auto")
    assert (parse(["--amp"]).amp, parse(["--amp", "off", "--channels-last", "on"]).channels_last) == ("on", "on")
    with pytest.raises(SystemExit):
        parse(["--amp", "yes"])
    assert "argument --amp: invalid choice: 'yes'" in capsys.readouterr().err


def test_training_resolves_the_path_from_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(compute_path, "cpu_info", lambda: ("AMX CPU", AMX))
    args = parse_train(["--demo"])
    assert (args.amp, args.channels_last) == (True, True)
    args = parse_train(["--demo", "--amp", "off"])
    assert (args.amp, args.channels_last) == (False, True)
    monkeypatch.setattr(compute_path, "cpu_info", lambda: ("AVX2 CPU", AVX2))
    assert (parse_train(["--demo"]).amp, parse_train(["--demo", "--amp"]).amp) == (False, True)
    assert parse_train(["--demo", "--device", "cuda", "--amp", "auto"]).amp is False


def tiny_checkpoint(path, **stored):
    """A run's checkpoint as resume_args reads it (settings only)."""
    torch.save({**dict.fromkeys(CHECKPOINT_KEYS), "format": "solo-checkpoint-v1", "epoch": 0, "iteration": 1,
                "args": dict(input_height=64, synthetic=12, device="cpu", **stored)}, path)
    return str(path)


def test_a_resumed_run_keeps_its_stored_path_whatever_this_cpu_would_choose(monkeypatch, tmp_path):
    monkeypatch.setattr(compute_path, "cpu_info", lambda: ("AMX CPU", AMX))
    stored = parse_train(["--resume", tiny_checkpoint(tmp_path / "a.pth", amp=False, channels_last=False)])
    assert (stored.amp, stored.channels_last) == (False, False)
    old = parse_train(["--resume", tiny_checkpoint(tmp_path / "b.pth", amp=True)])  # from before the layout choice
    assert (old.amp, old.channels_last) == (True, False)
    assert parse_train(["--resume", str(tmp_path / "a.pth"), "--amp", "off"]).amp is False
    with pytest.raises(CheckpointError, match=r"these differ: --amp \(the run has False, the command line True\)"):
        parse_train(["--resume", str(tmp_path / "a.pth"), "--amp", "auto"])


def test_is_channels_last_reads_back_the_layout_memory_format_sets():
    x = torch.randn(2, 3, 4, 5)
    assert not is_channels_last(x) and is_channels_last(x.contiguous(memory_format=memory_format(True)))
    one_channel = torch.randn(2, 1, 4, 5).contiguous(memory_format=memory_format(True))  # both layouts describe it
    assert not is_channels_last(one_channel)
