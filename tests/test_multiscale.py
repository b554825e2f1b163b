"""Specification of multi-scale training (the SOLO authors' 3x recipe, docs/training.md): the heights drawn, the items
and targets of a batch drawn at a height, on both data paths, and the exact resume of a multi-scale run.

On the CPU, with the 12-image synthetic set (conftest.synthetic_paths) and test_train.py's tiny run (3 images at
input height 64, whose multi-scale heights are 32 and 64)."""
import itertools

import pytest
import torch
from torch.utils.data import SequentialSampler

import engine
import main_train
from checkpoint import load_checkpoint
from conftest import assert_same_training_state, parse_train
from dataset import (BuildDataLoader, BuildDataset, COCODataset, MultiScaleBatchSampler, course_to_coco,
                     multiscale_heights, split_dataset)
from solo_head import SOLOHead
from test_dataset import assert_same_batch
from test_solo_head_targets import fake_ins_preds
from test_train import train_args

BASE = 128  # the demo's input height: multi-scale heights 96 and 128
BATCH_TO_DEVICE = engine.batch_to_device


def drawn_batches(dataset, heights, batch_size=2, seed=0, workers=0):
    """The batches of BuildDataLoader(dataset, ..., heights=heights) in order (no shuffle), with the torch RNG
    seeded as main_train seeds it before each epoch's loader."""
    torch.manual_seed(seed)
    return list(BuildDataLoader(dataset, batch_size, False, workers, heights=heights).loader())


def single_size_batch(paths, indices, height):
    """collect_fn of the items `indices` of the dataset built at input_height=height: what a multi-scale batch
    drawn at that height must be."""
    dataset = BuildDataset(paths, input_height=height)
    return BuildDataLoader.collect_fn([dataset[i] for i in indices])


# ----------------------------------------------------------------------------------------------------
class TestHeights:
    def test_the_authors_heights_at_800_scaled_for_other_heights(self):
        assert multiscale_heights(800) == (640, 672, 704, 736, 768, 800)  # solo_r50_fpn_8gpu_3x.py's
        assert multiscale_heights(BASE) == (96, 128)  # 102.4 .. 122.88 round down to 96
        assert multiscale_heights(64) == (32, 64)
        assert multiscale_heights(32) == (32,)  # never below 32

    @pytest.mark.parametrize("input_height", [32, 64, 96, 128, 256, 512, 800, 1088, 1344])
    def test_every_height_is_a_multiple_of_32_within_the_range(self, input_height):
        heights = multiscale_heights(input_height)
        assert list(heights) == sorted(set(heights)) and heights[-1] == input_height
        lowest = max(32, int(0.8 * input_height) // 32 * 32)  # 4/5 of the height, rounded down
        assert all(h % 32 == 0 and lowest <= h <= input_height for h in heights), heights
        assert heights[0] == lowest

    @pytest.mark.parametrize("input_height, message", [
        (100, "input_height 100 is not a multiple of 32"), (0, "input_height 0 is not positive"),
        (-64, "input_height -64 is not positive: expected a positive multiple of 32")])
    def test_a_bad_input_height_is_refused_naming_it(self, input_height, message):
        with pytest.raises(ValueError, match=message):
            multiscale_heights(input_height)


class TestBatchSampler:
    def batches(self, seed, num=600, batch_size=4):
        sampler = MultiScaleBatchSampler(SequentialSampler(range(num)), batch_size, multiscale_heights(800),
                                         torch.Generator().manual_seed(seed))
        return sampler, list(sampler)

    def test_every_batch_is_drawn_at_one_height_of_the_set(self):
        sampler, batches = self.batches(seed=0, num=601)
        assert len(batches) == len(sampler) == 151  # the last batch keeps the one image left, as a DataLoader's
        assert [i for batch in batches for i, _ in batch] == list(range(601))  # the wrapped sampler's order
        heights = [{h for _, h in batch} for batch in batches]
        assert all(len(h) == 1 for h in heights)
        drawn = [h.pop() for h in heights]
        assert set(drawn) == set(multiscale_heights(800))  # every one of the authors' heights is drawn ...
        assert max(drawn.count(h) for h in set(drawn)) < 2.5 * len(drawn) / 6  # ... about as often as the others

    def test_the_draws_are_a_function_of_the_seed(self):
        assert self.batches(seed=1)[1] == self.batches(seed=1)[1]
        assert self.batches(seed=1)[1] != self.batches(seed=2)[1]

    @pytest.mark.parametrize("heights, batch_size, message", [
        ((96, 100), 2, "input_height 100 is not a multiple of 32"), ((0, 32), 2, "height 0 is not positive"),
        ((), 2, "heights is empty"), ((96,), 0, "batch_size 0: expected at least 1")])
    def test_bad_settings_are_refused_naming_the_value(self, heights, batch_size, message):
        with pytest.raises(ValueError, match=message):
            MultiScaleBatchSampler(range(4), batch_size, heights, torch.Generator())

    def test_the_loader_draws_from_the_torch_rng_it_is_built_after(self, synthetic_paths):
        train, _ = split_dataset(BuildDataset(synthetic_paths, input_height=BASE))
        heights = [[batch[0].shape[-2] for batch in drawn_batches(train, (96, 128), seed=seed)] for seed in (0, 0, 5)]
        assert heights[0] == heights[1] != heights[2]  # main_train seeds it from (seed, epoch, rank) every epoch


# ----------------------------------------------------------------------------------------------------
class TestItemsAtADrawnHeight:
    """A batch drawn at height h is the batch of the dataset built with input_height=h: the same images, masks and
    boxes, bit for bit, hence the same targets."""

    @pytest.mark.parametrize("height", multiscale_heights(800)[:2] + multiscale_heights(BASE))
    def test_an_item_asked_at_a_height_is_the_item_of_a_dataset_built_at_that_height(self, synthetic_paths, height):
        items = []
        for dataset, index in ((BuildDataset(synthetic_paths, input_height=BASE, hflip=True), (4, height)),
                               (BuildDataset(synthetic_paths, input_height=height, hflip=True), 4)):
            torch.manual_seed(1)  # the same flip draw
            items.append(dataset[index])
        assert items[0][0].shape[-2] == height
        assert_same_batch(*items)

    @pytest.mark.parametrize("raw", [False, True])
    def test_loader_batches_equal_single_size_batches_and_so_do_their_targets(self, synthetic_paths, raw):
        train, _ = split_dataset(BuildDataset(synthetic_paths, input_height=BASE, raw=raw))  # a Subset: 9 images
        head, drawn = SOLOHead(num_classes=4), set()
        for k, batch in enumerate(drawn_batches(train, multiscale_heights(BASE), batch_size=2)):
            if raw:  # the GPU path's batch, preprocessed as the device does, here on the CPU: bit for bit
                assert len(batch) == 6
                batch = engine.batch_to_device(batch, "cpu", BASE)
            height = batch[0].shape[-2]
            drawn.add(height)
            expected = single_size_batch(synthetic_paths, train.indices[2 * k:2 * k + 2], height)
            assert_same_batch(batch, expected)
            preds = fake_ins_preds(*batch[0].shape[-2:], bz=len(batch[0]))
            targets = [head.target(preds, b[3], b[1], b[2], compact=True) for b in (batch, expected)]
            for got, want in zip(*(itertools.chain.from_iterable(itertools.chain.from_iterable(t)) for t in targets)):
                assert torch.equal(got, want)
        assert drawn == {96, 128}

    def test_a_raw_batch_carries_its_height_and_its_items_agree(self, synthetic_paths):
        raw = BuildDataset(synthetic_paths, input_height=BASE, raw=True)
        batch = BuildDataLoader.collect_fn([raw[i, 96] for i in range(3)])
        assert len(batch) == 6 and batch[5] == 96 and batch[0].shape == (3, 3, 300, 400)  # uint8, original frame
        with pytest.raises(ValueError, match=r"different heights \[96, 128\]: expected one height per batch"):
            BuildDataLoader.collect_fn([raw[0, 96], raw[1, 128]])
        with pytest.raises(ValueError, match="input_height 100 is not a multiple of 32"):
            raw[0, 100]

    def test_coco_items_too(self, synthetic_paths, tmp_path):
        train_json, _ = course_to_coco(synthetic_paths, tmp_path)
        items = [COCODataset(train_json, tmp_path / "images", input_height=BASE)[0, 96],
                 COCODataset(train_json, tmp_path / "images", input_height=96)[0]]
        assert_same_batch(*items)


# ----------------------------------------------------------------------------------------------------
def multiscale_run(data_dir, run_dir, monkeypatch, *extra, resume=False):
    """A tiny run with multi-scale training (test_train.train_args, input height 64: heights 32 and 64, --hflip,
    one loader worker, seed 2), or with resume its continuation. Returns (summary, [(height, training)] of every
    batch the model saw, in order)."""
    seen = []

    def recording(batch, device, input_height):
        moved = BATCH_TO_DEVICE(batch, device, input_height)
        seen.append((moved[0].shape[-2], torch.is_grad_enabled()))  # the test losses run without gradients
        return moved
    monkeypatch.setattr(engine, "batch_to_device", recording)
    if resume:
        args = parse_train(["--resume", str(run_dir), *map(str, extra)])
        assert args.multiscale  # the checkpoint's setting
    else:
        # seed 2 draws 32, 64 | 64, 32
        args = train_args(data_dir, run_dir, "--workers", 1, "--seed", 2, "--augment", "multiscale", *extra)
    return main_train.main(args), seen


def test_a_run_stopped_after_an_epoch_and_resumed_equals_the_uninterrupted_one(three_images, tmp_path, monkeypatch):
    _, straight_seen = multiscale_run(three_images, tmp_path / "straight", monkeypatch, "--epochs", 2)
    train_heights = [h for h, training in straight_seen if training]
    assert len(train_heights) == 4 and set(train_heights) == {32, 64}  # 2 epochs of 2 iterations, both heights
    assert {h for h, training in straight_seen if not training} == {64}  # the test split at --input-height

    multiscale_run(three_images, tmp_path / "resumed", monkeypatch, "--epochs", 1)
    summary, resumed_seen = multiscale_run(three_images, tmp_path / "resumed", monkeypatch, "--epochs", 2,
                                           resume=True)
    assert summary["epoch"] == 1
    assert resumed_seen == straight_seen[3:]  # epoch 1 draws the same heights: (2 train, 1 test) batches per epoch

    straight, resumed = (load_checkpoint(tmp_path / name / "checkpoint.pth") for name in ("straight", "resumed"))
    assert resumed["args"]["multiscale"] is True
    assert_same_training_state(straight, resumed)

    # a checkpoint of a run from before multi-scale training (neither setting stored) resumes at the fixed size
    old = load_checkpoint(tmp_path / "resumed" / "epoch_000.pth")
    del old["args"]["multiscale"], old["args"]["augment"]
    torch.save(old, tmp_path / "old.pth")
    assert parse_train(["--resume", str(tmp_path / "old.pth")]).multiscale is False


def test_the_handouts_fixed_size_is_the_default():
    assert parse_train([]).multiscale is False and parse_train(["--demo"]).multiscale is False


def test_augment_switches_multiscale_and_flips_and_hflip_still_works(capsys):
    args = parse_train(["--augment", "multiscale"])
    assert (args.multiscale, args.hflip, args.augment) == (True, False, ["multiscale"])
    args = parse_train(["--hflip", "--augment", "multiscale"])  # the older spelling of --augment hflip
    assert (args.multiscale, args.hflip, args.augment) == (True, True, ["hflip", "multiscale"])
    with pytest.raises(SystemExit):
        parse_train(["--augment", "scale"])
    assert "argument --augment: invalid choice: 'scale' (choose from 'hflip', 'multiscale')" in capsys.readouterr().err


def test_the_raw_path_trains_to_the_float_paths_weights(three_images, tmp_path, monkeypatch):
    """A GPU run's data path (raw items, each batch preprocessed at its drawn height in engine.batch_to_device),
    forced on the CPU: the same batches bit for bit, hence the same weights as the CPU's float path. Without loader
    workers: a worker resizes an image with one thread, which differs from two in the last bit (both paths alike)."""
    float_summary, float_seen = multiscale_run(three_images, tmp_path / "float", monkeypatch, "--epochs", 1,
                                               "--workers", 0)
    build = BuildDataset.__init__

    def raw_dataset(self, *args, **kwargs):  # what main_train.py builds on a GPU
        build(self, *args, **{**kwargs, "raw": True})
    monkeypatch.setattr(BuildDataset, "__init__", raw_dataset)
    raw_summary, raw_seen = multiscale_run(three_images, tmp_path / "raw", monkeypatch, "--epochs", 1, "--workers", 0)
    assert raw_seen == float_seen and {h for h, _ in raw_seen} == {32, 64}
    assert raw_summary["train_loss"] == float_summary["train_loss"]
    weights = [load_checkpoint(tmp_path / name / "checkpoint.pth")["model"] for name in ("float", "raw")]
    assert all(torch.equal(value, weights[1][key]) for key, value in weights[0].items())
