"""The branches only a GPU run takes, run on the CPU. Each test forces a branch that CUDA would take and checks it
against the CPU's own path or against its definition:

- prepare_device: a numbered GPU becomes the current device; cuDNN times its algorithms for a fixed input size.
- autocast_settings: bfloat16 only where the GPU computes it natively (compute capability 8+: A100, H100), float16
  with a GradScaler on older GPUs (Colab's T4, V100), which torch.cuda.is_bf16_supported() also calls "supported"
  because it can emulate bfloat16.
- The float16 + GradScaler training step of such a GPU: CPU autocast in float16, with group_norm in float32 as CUDA's
  autocast runs it. Finite float32 losses, the same SGD step as float32 (clipping sees unscaled gradients), and a
  step whose float16 gradients overflow is skipped, not applied.
- Matrix NMS's intersections: one float32 product for all classes on a GPU, one per class on the CPU; the same
  decayed scores, exact pixel counts under autocast.
- mask_ops.masks_to_original's batched product (every device but the CPU): in test_solo_head_postprocess.py, beside
  the CPU path's tests.
- The data path: bilinear interpolation only of floating tensors (CUDA's bilinear kernels have no uint8), and no
  pinned-memory query for a host destination (it initialises CUDA, which fails in a DataLoader worker forked after
  the parent initialised it).
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import compute_path
import dataset as ds
import engine
import utils
from conftest import ReportsCuda
from dataset import BuildDataLoader, BuildDataset
from mask_ops import mask_intersections
from model import build_model
from solo_head import SOLOHead

HEIGHT = 64  # input 64 x 85, padded to 64 x 96
TINY_MODEL = dict(backbone="resnet18", backbone_weights="none", stacked_convs=1, seg_feat_channels=32,
                  num_grids=[8, 6, 4, 3, 2])


# ----------------------------------------------------------------------------------------------------
# autocast_settings on GPUs of each generation
# ----------------------------------------------------------------------------------------------------
def pretend_gpu(monkeypatch, capability):
    """torch.cuda answering as one GPU of this compute capability would. Like torch's own is_bf16_supported, the
    fake says True below 8.0 unless including_emulation=False: a T4 can hold bfloat16 tensors (emulated), so
    torch calls it supported."""
    major, minor = capability
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=major, minor=minor, name=f"sm_{major}{minor}"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: major >= 8 or including_emulation)


class TestAutocastSettings:
    @pytest.mark.parametrize("capability, expected", [
        pytest.param((7, 5), (torch.float16, True), id="T4"),
        pytest.param((7, 0), (torch.float16, True), id="V100"),
        pytest.param((8, 0), (torch.bfloat16, False), id="A100"),
        pytest.param((9, 0), (torch.bfloat16, False), id="H100"),
    ])
    def test_bfloat16_only_where_the_gpu_computes_it_natively(self, monkeypatch, capability, expected):
        pretend_gpu(monkeypatch, capability)
        assert compute_path.autocast_settings(torch.device("cuda", 0), True) == expected
        assert compute_path.autocast_settings(torch.device("cuda", 0), False) == (None, False)

    def test_cpu(self):
        assert compute_path.autocast_settings(torch.device("cpu"), True) == (torch.bfloat16, False)
        assert compute_path.autocast_settings(torch.device("cpu"), False) == (None, False)


class TestPrepareDevice:
    def test_a_numbered_gpu_becomes_the_current_device(self, monkeypatch):
        # --device cuda:1 without torchrun: the loader's pinning thread and default allocations follow it
        pretend_gpu(monkeypatch, (9, 0))
        current = []
        monkeypatch.setattr(torch.cuda, "set_device", current.append)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
        assert utils.prepare_device("cuda:1", fixed_input_size=True) == torch.device("cuda", 1)
        assert current == [torch.device("cuda", 1)]
        assert utils.prepare_device("cuda", fixed_input_size=True) == torch.device("cuda") and len(current) == 1

    def test_cudnn_times_its_algorithms_only_for_a_fixed_input_size(self, monkeypatch):
        # training and the test split: one size; photos (main_infer --images): one per aspect ratio
        pretend_gpu(monkeypatch, (9, 0))
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
        utils.prepare_device("cuda", fixed_input_size=True)
        assert torch.backends.cudnn.benchmark
        utils.prepare_device("cuda", fixed_input_size=False)
        assert not torch.backends.cudnn.benchmark

    def test_cpu_is_left_as_it_is(self, monkeypatch):
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
        assert utils.prepare_device("cpu", fixed_input_size=True) == torch.device("cpu")
        assert not torch.backends.cudnn.benchmark

    def test_cuda_asked_for_without_cuda(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(RuntimeError, match=r"--device cuda:0, but CUDA is not available here: pass --device cpu"):
            utils.prepare_device("cuda:0", fixed_input_size=True)


# ----------------------------------------------------------------------------------------------------
# The float16 + GradScaler step (a GPU without native bfloat16)
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_batch(synthetic_paths):
    """A raw batch of 4 images (with objects, some flipped), as the CUDA default --device-preprocess feeds it."""
    raw = BuildDataset(synthetic_paths, input_height=HEIGHT, hflip=True, raw=True)
    torch.manual_seed(0)
    return BuildDataLoader.collect_fn([raw[i] for i in range(4)])


@pytest.fixture
def cuda_like_group_norm(monkeypatch):
    """CUDA's autocast runs group_norm in float32 (the CPU's in the input's float16): do as CUDA does."""
    real = F.group_norm

    def group_norm(x, *args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return real(x.float(), *args, **kwargs)
        return real(x, *args, **kwargs)
    monkeypatch.setattr(F, "group_norm", group_norm)


def one_step(batch, amp_dtype, scaler, clip_grad, monkeypatch):
    """engine.train_step with autocast in amp_dtype (None: float32) on a fresh seeded tiny model:
    ([total, focal, dice] losses, parameters before, parameters after, optimizer)."""
    torch.manual_seed(0)
    model = build_model(TINY_MODEL).train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    monkeypatch.setattr(compute_path, "autocast_settings", lambda device, amp: (amp_dtype, amp_dtype is torch.float16))
    settings = SimpleNamespace(amp=amp_dtype is not None, input_height=HEIGHT, clip_grad=clip_grad)
    losses = engine.train_step(model, batch, optimizer, scaler, torch.device("cpu"), settings)  # (3,) float32
    return losses, before, [p.detach() for p in params], optimizer


def test_float16_step_with_a_grad_scaler_is_the_float32_step(raw_batch, cuda_like_group_norm, monkeypatch):
    # clip_grad 1: clipping is active, so a clip of the scaled gradients (before unscale_) would shrink the step
    # by the scale (65536)
    plain = torch.amp.GradScaler("cpu", enabled=False)
    losses32, before, after32, _ = one_step(raw_batch, None, plain, 1.0, monkeypatch)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    losses16, _, after16, _ = one_step(raw_batch, torch.float16, scaler, 1.0, monkeypatch)
    for value, expected in zip(losses16, losses32):
        assert value.dtype == torch.float32 and torch.isfinite(value)
        torch.testing.assert_close(value, expected, rtol=1e-3, atol=1e-4)
    assert scaler.get_scale() == 2.0 ** 16  # no overflow: the step was taken
    names = [name for name, p in build_model(TINY_MODEL).named_parameters() if p.requires_grad]

    def step(after, part=""):
        return torch.cat([(a - b).flatten() for name, a, b in zip(names, after, before) if name.startswith(part)])
    step32 = step(after32)
    assert step32.norm() > 0
    # clipped to the same norm (a clip before unscale_ would leave a 65536 times shorter step), in the same
    # direction: float16 rounding moves the head's step a little, and that of the random backbone's BatchNorm
    # parameters more (their statistics of tiny batches are sensitive to it)
    assert abs(step(after16).norm() / step32.norm() - 1) < 0.01
    assert (step(after16, "head.") - step(after32, "head.")).norm() < 0.05 * step(after32, "head.").norm()
    assert (step(after16) - step32).norm() < 0.2 * step32.norm()


def test_a_float16_overflow_skips_the_step_and_backs_off(raw_batch, cuda_like_group_norm, monkeypatch):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # scaled gradients beyond float16's 65504
    losses, before, after, optimizer = one_step(raw_batch, torch.float16, scaler, 35.0, monkeypatch)
    assert all(torch.isfinite(v) for v in losses)  # the loss is finite: no NonFiniteLossError, only a skipped step
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert not optimizer.state  # no momentum buffer was created
    assert scaler.get_scale() == 2.0 ** 39


# ----------------------------------------------------------------------------------------------------
# Matrix NMS's intersections: one product on a GPU, one per class on the CPU
# ----------------------------------------------------------------------------------------------------
class TestIntersections:
    @pytest.mark.parametrize("n", [0, 1, 7, 40])
    def test_exact_pixel_counts_at_the_stride_4_size(self, n):
        # 200 x 272: the stride-4 masks of an 800 x 1088 input, as Matrix NMS gets them; full masks included
        g = torch.Generator().manual_seed(n)
        masks = torch.rand(n, 200, 272, generator=g) > torch.rand(n, 1, 1, generator=g)
        masks[:n // 4] = True
        flat = masks.flatten(1).double()
        expected = (flat @ flat.T).float()  # float64 sums: exact
        for dtype in (torch.bool, torch.uint8, torch.float32):
            out = mask_intersections(masks.to(dtype))
            assert out.dtype == torch.float32 and torch.equal(out, expected)

    @pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
    def test_exact_under_autocast(self, amp_dtype):
        masks = torch.rand(12, 200, 272, generator=torch.Generator().manual_seed(0)) > 0.3
        labels = torch.tensor([1, 2, 3] * 4)
        flat = masks.flatten(1).double()
        with torch.autocast("cpu", dtype=amp_dtype):
            out, per_class = mask_intersections(masks), mask_intersections(masks, labels)
        assert out.dtype == per_class.dtype == torch.float32 and torch.equal(out, (flat @ flat.T).float())
        assert torch.equal(per_class, out * (labels[:, None] == labels))

    def test_the_gpus_single_product_gives_the_cpus_decayed_scores(self):
        g = torch.Generator().manual_seed(3)
        masks = torch.rand(30, 50, 68, generator=g) > torch.rand(30, 1, 1, generator=g)
        scores = torch.rand(30, generator=g).sort(descending=True).values
        labels = torch.randint(1, 4, (30,), generator=g)
        per_class = SOLOHead.MatrixNMS(masks, scores, labels)
        one_product = SOLOHead.MatrixNMS(masks.as_subclass(ReportsCuda), scores, labels).as_subclass(torch.Tensor)
        assert torch.equal(one_product, per_class)


# ----------------------------------------------------------------------------------------------------
# The data path
# ----------------------------------------------------------------------------------------------------
class InterpolationDtypes(TorchDispatchMode):
    """Records the dtype of every tensor passed to an upsample (interpolate) kernel."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "upsample" in func.__name__:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_uint8_images_and_masks_are_interpolated_as_floats(raw_batch):
    # preprocess_batch and SOLOHead.target run on the GPU; CUDA's bilinear kernels take floating types only
    with InterpolationDtypes() as recorder:
        _, label_list, mask_list, bbox_list = ds.preprocess_batch(raw_batch, HEIGHT)
        head = SOLOHead(num_grids=TINY_MODEL["num_grids"], seg_feat_channels=32, stacked_convs=1)
        sizes = [torch.empty(4, s * s, *size) for s, size in zip(head.seg_num_grids, [(16, 24)] * 2 + [(8, 12)]
                                                                 + [(4, 6)] * 2)]
        head.target(sizes, bbox_list, label_list, mask_list, compact=True)
    assert len(recorder.dtypes) >= 4  # images, masks, two target sizes at least
    assert all(dtype.is_floating_point for dtype in recorder.dtypes), recorder.dtypes


def test_a_host_destination_never_asks_for_pinned_memory(synthetic_paths, raw_batch, monkeypatch):
    # DataLoader workers are forked after the training process initialised CUDA; Tensor.is_pinned and pin_memory
    # initialise CUDA, which fails there. Only copies bound for a GPU may pin.
    def forbidden(self, *args, **kwargs):
        raise AssertionError("pinned-memory call for a host destination")
    monkeypatch.setattr(torch.Tensor, "is_pinned", forbidden)
    monkeypatch.setattr(torch.Tensor, "pin_memory", forbidden)
    torch.manual_seed(0)
    flipping = BuildDataset(synthetic_paths, input_height=HEIGHT, hflip=True)
    for i in range(4):  # the workers' item path, flips included
        flipping[i]
    ds.preprocess_batch(raw_batch, HEIGHT, device="cpu")
    x = torch.zeros(3)
    assert ds.to_device(x, "cpu") is x and ds.to_device(x, torch.device("cpu"), non_blocking=True) is x
