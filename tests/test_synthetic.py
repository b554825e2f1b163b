"""Specification of synthetic.py: the real data's file format, learnable scenes, determinism."""
import os

import h5py
import numpy as np
import pytest

from datafiles import FILE_NAMES
from synthetic import render_image, write_synthetic_dataset

# the SOLO head's scale ranges (sqrt(w * h) at an 800-pixel-high input) and that input's scale from 300x400
SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
SCALE_TO_800 = np.sqrt((800 / 300) * (1066 / 400))


def read_files(paths):
    """(images (N, 3, H, W), masks (M, H, W), labels object (N,), bboxes object (N,)) as stored."""
    with h5py.File(paths[0], "r") as f_img, h5py.File(paths[1], "r") as f_mask:
        images, masks = f_img["data"][:], f_mask["data"][:]
    return images, masks, np.load(paths[2], allow_pickle=True), np.load(paths[3], allow_pickle=True)


def masks_per_image(masks, labels):
    """Split the stored masks (M, H, W) into one (n_i, H, W) array per image, in image order."""
    return np.split(masks, np.cumsum([len(label) for label in labels])[:-1])


def touching(a, b):
    """Whether binary masks a and b (H, W) share an edge (a grown by one pixel overlaps b)."""
    grown = a.astype(bool)  # (H, W)
    grown[1:] |= a[:-1] > 0
    grown[:-1] |= a[1:] > 0
    grown[:, 1:] |= a[:, :-1] > 0
    grown[:, :-1] |= a[:, 1:] > 0
    return bool((grown & (b > 0)).any())


@pytest.fixture(scope="module")
def scenes():
    """60 rendered scenes (image, masks, labels, boxes): enough to see every size and class."""
    rng = np.random.default_rng(1)
    return [render_image(rng) for _ in range(60)]


class TestFileFormat:
    def test_files_have_the_real_data_names(self, synthetic_paths):
        assert tuple(os.path.basename(p) for p in synthetic_paths) == FILE_NAMES

    def test_h5_files_hold_uint8_data_compressed_one_chunk_per_image(self, synthetic_paths):
        with h5py.File(synthetic_paths[0], "r") as f_img, h5py.File(synthetic_paths[1], "r") as f_mask:
            assert list(f_img.keys()) == ["data"] and list(f_mask.keys()) == ["data"]
            images, masks = f_img["data"], f_mask["data"]
            assert images.dtype == np.uint8 and images.shape == (12, 3, 300, 400)
            assert masks.dtype == np.uint8 and masks.shape[1:] == (300, 400)
            assert images.chunks == (1, 3, 300, 400) and masks.chunks == (1, 300, 400)
            assert images.compression == "gzip" and masks.compression == "gzip"

    def test_npy_files_hold_one_entry_per_image(self, synthetic_paths):
        _, _, labels, bboxes = read_files(synthetic_paths)
        assert labels.dtype == object and labels.shape == (12,)
        assert bboxes.dtype == object and bboxes.shape == (12,)
        for label, bbox in zip(labels, bboxes):
            assert label.dtype == np.int64 and label.ndim == 1
            assert bbox.dtype == np.float32 and bbox.shape == (len(label), 4)

    def test_one_binary_mask_per_label(self, synthetic_paths):
        _, masks, labels, _ = read_files(synthetic_paths)
        assert len(masks) == sum(len(label) for label in labels)
        assert set(np.unique(masks)) == {0, 1}


class TestScenes:
    def test_one_to_max_objects_per_image(self, scenes):
        counts = [len(labels) for _, _, labels, _ in scenes]
        assert min(counts) >= 1 and max(counts) <= 5
        assert len(set(counts)) >= 3  # not a constant
        rng = np.random.default_rng(0)
        assert all(1 <= len(render_image(rng, max_objects=2)[2]) <= 2 for _ in range(10))

    def test_labels_are_the_three_classes(self, scenes):
        labels = np.concatenate([labels for _, _, labels, _ in scenes])
        assert set(labels.tolist()) == {1, 2, 3}

    def test_boxes_are_tight_around_masks_with_x2_last_column_plus_one(self, scenes):
        for _, masks, _, boxes in scenes:
            for mask, box in zip(masks, boxes):
                rows, cols = np.nonzero(mask)
                assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]

    def test_masks_are_visible_parts_that_do_not_overlap(self, scenes):
        for _, masks, _, _ in scenes:
            assert masks.sum(0).max() <= 1  # a later object hides what it covers
            assert masks.sum((1, 2)).min() >= 30

    def test_some_objects_are_occluded(self, scenes):
        """An occluded object's visible mask touches the mask of the object in front of it."""
        touching_pairs = sum(touching(a, b) for _, masks, _, _ in scenes
                             for i, a in enumerate(masks) for b in masks[i + 1:])
        assert touching_pairs >= 5

    def test_sizes_cover_every_scale_range_of_the_head(self, scenes):
        boxes = np.concatenate([boxes for _, _, _, boxes in scenes])
        size_800 = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) * SCALE_TO_800
        for low, high in SCALE_RANGES:
            assert ((size_800 >= low) & (size_800 <= high)).any(), (low, high)

    def test_classes_differ_in_shape_and_colour(self, scenes):
        aspect = {1: [], 2: [], 3: []}  # box w / h
        colour = {1: [], 2: [], 3: []}  # mean RGB under the mask
        for image, masks, labels, boxes in scenes:
            for mask, label, box in zip(masks, labels, boxes):
                aspect[label].append((box[2] - box[0]) / (box[3] - box[1]))
                colour[label].append(image[:, mask > 0].mean(1))
        assert np.median(aspect[2]) < 0.7  # person: tall
        assert 1.2 < np.median(aspect[3]) < np.median(aspect[1])  # animal wide, vehicle wider
        vehicle, person, animal = (np.mean(colour[k], 0) for k in (1, 2, 3))  # mean (R, G, B)
        assert vehicle[2] > max(vehicle[0], person[2], animal[2])  # vehicles: blue
        assert person[0] > max(person[1], person[2])  # persons: red/orange
        assert animal[1] > animal[2]  # animals: green/brown

    def test_background_is_textured_not_flat(self, scenes):
        image, masks, _, _ = scenes[0]
        background = image[:, masks.sum(0) == 0]  # (3, P)
        assert background.std(1).min() > 5


class TestDeterminism:
    def test_same_seed_gives_identical_files(self, synthetic_paths, tmp_path):
        again = write_synthetic_dataset(tmp_path, num_images=12, seed=0, workers=2)
        for a, b in zip(read_files(synthetic_paths), read_files(again)):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)

    def test_other_seed_gives_other_images(self, synthetic_paths, tmp_path):
        other = write_synthetic_dataset(tmp_path, num_images=12, seed=1, workers=1)
        assert not np.array_equal(read_files(synthetic_paths)[0], read_files(other)[0])

    def test_a_smaller_dataset_is_a_prefix_of_a_larger_one(self, synthetic_paths, tmp_path):
        small = write_synthetic_dataset(tmp_path, num_images=3, seed=0, workers=1)
        np.testing.assert_array_equal(read_files(small)[0], read_files(synthetic_paths)[0][:3])

    def test_no_images_is_an_error(self, tmp_path):
        with pytest.raises(ValueError, match="num_images must be >= 1, got 0"):
            write_synthetic_dataset(tmp_path, num_images=0)
