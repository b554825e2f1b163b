"""bench.py's limits rows: the rate of a matrix product per dtype, and each path's achieved GFLOP/s as a share of
the rate of the dtype it computes in; and its side tables run the path asked for. A benchmark's figures are not
asserted (they are the machine's), only that the table holds them, named, and that they are rates a CPU can
reach."""
import re
from types import SimpleNamespace

import pytest
import torch

import bench


def rows(text, pattern):
    """The values of the table rows whose name matches pattern."""
    return [line.split()[-2:] for line in text.splitlines() if re.search(pattern, line)]


@pytest.mark.slow
@pytest.mark.parametrize("flags, dtype", [([], "float32"), (["--amp", "--channels-last"], "bfloat16")])
def test_the_table_gives_each_path_as_a_share_of_its_dtypes_gemm_rate(capsys, flags, dtype):
    bench.main(bench.get_args_parser().parse_args(["--quick", "--device", "cpu", *flags]))
    out = capsys.readouterr().out
    assert re.search(r"^device cpu: .+; torch kernels", out, re.M)  # the CPU model and its instruction sets
    for name in ("float32", "bfloat16"):
        (value, unit), = rows(out, rf"^  {name} matrix product")
        assert unit == "GFLOP/s" and float(value) > 1
    shares = rows(out, rf"GFLOP at GFLOP/s, % of the {dtype} GEMM")
    assert len(shares) == 2  # the demo training step and the 800x1088 forward
    for achieved, share in shares:
        assert float(achieved.rstrip(",")) > 0 and 0 < float(share) < 150


@pytest.mark.parametrize("amp, channels_last", [(False, False), (True, True)])
def test_the_heads_rows_run_the_path_asked_for(three_images, monkeypatch, amp, channels_last):
    """--heads measures each head's inference on the path the main table measures: the model and the image in
    channels_last with --channels-last, the forward under bfloat16 autocast with --amp (its rows once ran NCHW)."""
    seen = []

    def build_model(cfg):
        model = real_build_model(cfg)
        model.register_forward_pre_hook(lambda module, args: seen.append(dict(
            image=args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous(),
            weights=model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last),
            autocast=torch.is_autocast_enabled("cpu"))))
        return model
    real_build_model = bench.build_model
    monkeypatch.setattr(bench, "build_model", build_model)
    args = SimpleNamespace(device="cpu", amp=amp, channels_last=channels_last, repeats=1, warmup=0)
    tiny = dict(backbone="resnet18", backbone_weights="none", stacked_convs=1, seg_feat_channels=32,
                num_grids=[8, 6, 4, 3, 2])
    costs = bench.head_infer_costs("solo", three_images, 64, tiny, args, candidates=5)
    assert costs["forward"] > 0 and costs["masks"] > 0
    assert seen and all(call == dict(image=channels_last, weights=channels_last, autocast=amp) for call in seen)
