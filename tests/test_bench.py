"""bench.py's limits rows: the rate of a matrix product per dtype, and each path's achieved GFLOP/s as a share of
the rate of the dtype it computes in; and its side tables run the path asked for. A benchmark's figures are not
asserted (they are the machine's), only that the table holds them, named, and that they are rates a CPU can
reach."""
import re

import pytest

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


@pytest.mark.slow
def test_the_heads_table_runs_the_path_asked_for(capsys):
    """--heads measures each head's inference on the path asked for, as the main table does: with --amp
    --channels-last the head's features come out channels_last in bfloat16 (its rows once ran NCHW)."""
    bench.main(bench.get_args_parser().parse_args(["--heads", "--amp", "--channels-last", "--device", "cpu",
                                                   "--repeats", "1", "--warmup", "0"]))
    out = capsys.readouterr().out
    path, = [line for line in out.splitlines() if "inference path run (NHWC: channels_last)" in line]
    assert path.split(")")[1].split() == ["NHWC", "bfloat16"] * 3  # SOLO, Decoupled, SOLOv2
