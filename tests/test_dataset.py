"""Specification of dataset.py: handout 4.3 preprocessing, batch layout, split, input validation."""
import os
import pickle

import h5py
import numpy as np
import pytest
import torch

import dataset as ds
from datafiles import CLASS_NAMES, FILE_NAMES, dataset_paths
from dataset import BuildDataLoader, BuildDataset, denormalize, split_dataset
from plots import CLASS_COLORS

HEIGHT = 128  # a small input where the size does not matter: 128 x 170, padded to 128 x 192
MEAN = np.array(ds.MEAN).reshape(3, 1, 1)
STD = np.array(ds.STD).reshape(3, 1, 1)


# ----------------------------------------------------------------------------------------------------
# Independent references and hand-made files
# ----------------------------------------------------------------------------------------------------
def resize_reference(array, height, width):
    """Bilinear resize of (C, h, w) with half-pixel centres (align_corners=False), in float64 numpy:
    output pixel i samples input position (i + 0.5) * in / out - 0.5, clamped to the edges."""
    for axis, size in ((1, height), (2, width)):
        n_in = array.shape[axis]
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (src - lo).reshape((-1, 1) if axis == 1 else (1, -1))
        array = np.take(array, lo, axis) * (1 - frac) + np.take(array, hi, axis) * frac
    return array


def write_files(folder, images, masks, labels, bboxes, key="data"):
    """Write the four data files from arrays / lists (labels, bboxes: one entry per image)."""
    os.makedirs(folder, exist_ok=True)
    paths = dataset_paths(folder)
    for path, data in zip(paths[:2], (images, masks)):
        with h5py.File(path, "w") as f:
            f.create_dataset(key, data=data)
    for path, entries in zip(paths[2:], (labels, bboxes)):
        array = np.empty(len(entries), dtype=object)
        array[:] = [np.asarray(e) for e in entries] if len(entries) else []
        np.save(path, array, allow_pickle=True)
    return paths


def tiny_data():
    """Three 30 x 40 images: image 0 has two objects, image 1 none, image 2 one."""
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 30, 40), dtype=np.uint8)
    masks = np.zeros((3, 30, 40), np.uint8)
    masks[0, 2:10, 3:12] = 1  # image 0, vehicle
    masks[1, 15:28, 20:26] = 1  # image 0, person
    masks[2, 5:25, 5:35] = 1  # image 2, animal
    labels = [np.array([1, 2]), np.array([], np.int64), np.array([3])]
    bboxes = [np.array([[3, 2, 12, 10], [20, 15, 26, 28]], np.float32), np.zeros((0, 4), np.float32),
              np.array([[5, 5, 35, 25]], np.float32)]
    return images, masks, labels, bboxes


@pytest.fixture
def tiny_paths(tmp_path):
    return write_files(tmp_path / "tiny", *tiny_data())


@pytest.fixture(scope="module")
def small(synthetic_paths):
    return BuildDataset(synthetic_paths, input_height=HEIGHT)


# ----------------------------------------------------------------------------------------------------
class TestItems:
    def test_handout_shapes_at_800(self, synthetic_paths):
        dataset = BuildDataset(synthetic_paths)
        sizes = (dataset.ori_size, dataset.scaled_size, dataset.input_size)
        assert sizes == ((300, 400), (800, 1066), (800, 1088))
        img, label, mask, bbox = dataset[0]
        n = len(label)
        assert img.shape == (3, 800, 1088) and img.dtype == torch.float32
        assert label.shape == (n,) and label.dtype == torch.int64
        assert mask.shape == (n, 800, 1088) and mask.dtype == torch.float32
        assert bbox.shape == (n, 4) and bbox.dtype == torch.float32

    def test_small_input_sizes(self, small):
        assert small.scaled_size == (128, 170) and small.input_size == (128, 192)
        assert small[0][0].shape == (3, 128, 192)

    def test_get_raw_is_the_files_content_in_the_original_frame(self, synthetic_paths, small):
        labels = np.load(synthetic_paths[2], allow_pickle=True)
        first = sum(len(label) for label in labels[:5])  # masks of image 5 follow those of images 0..4
        with h5py.File(synthetic_paths[0], "r") as f_img, h5py.File(synthetic_paths[1], "r") as f_mask:
            image, masks = f_img["data"][5], f_mask["data"][first:first + len(labels[5])]
        img, label, mask, bbox = small.get_raw(5)
        assert img.dtype == torch.uint8 and mask.dtype == torch.uint8
        np.testing.assert_array_equal(img.numpy(), image)
        np.testing.assert_array_equal(mask.numpy(), masks)
        np.testing.assert_array_equal(label.numpy(), labels[5])
        np.testing.assert_array_equal(bbox.numpy(), np.load(synthetic_paths[3], allow_pickle=True)[5])

    def test_masks_are_linked_to_images_by_label_counts(self, tiny_paths):
        images, masks, _, _ = tiny_data()
        dataset = BuildDataset(tiny_paths, input_height=64)
        np.testing.assert_array_equal(dataset.get_raw(0)[2].numpy(), masks[0:2])
        np.testing.assert_array_equal(dataset.get_raw(2)[2].numpy(), masks[2:3])
        np.testing.assert_array_equal(dataset.get_raw(-1)[0].numpy(), images[2])

    def test_input_height_must_be_a_multiple_of_32(self, tiny_paths):
        # the head and PostProcess take the padded height as the resized height, so no vertical padding
        with pytest.raises(ValueError, match="input_height 60 .* multiple of 32"):
            BuildDataset(tiny_paths, input_height=60)

    def test_image_without_objects_gives_empty_tensors(self, tiny_paths):
        dataset = BuildDataset(tiny_paths, input_height=64)
        img, label, mask, bbox = dataset[1]
        assert img.shape == (3, 64, 96)  # 64 x 85 padded to multiples of 32
        assert label.shape == (0,) and mask.shape == (0, 64, 96) and bbox.shape == (0, 4)

    def test_index_out_of_range(self, small):
        with pytest.raises(IndexError, match="image index 12 out of range for 12 images"):
            small[12]


class TestPreprocessing:
    def test_image_is_scaled_resized_normalised_then_zero_padded(self, small):
        raw = small.get_raw(3)[0].numpy() / 255.0  # (3, 300, 400) in [0, 1]
        expected = (resize_reference(raw, 128, 170) - MEAN) / STD  # (3, 128, 170)
        img = small[3][0].numpy()
        np.testing.assert_allclose(img[:, :128, :170], expected, atol=1e-4)
        assert (img[:, :, 170:] == 0).all()  # zero padding comes after normalisation

    def test_denormalize_gives_back_the_resized_image(self, small):
        raw = small.get_raw(3)[0].numpy() / 255.0
        img = small[3][0]
        expected = resize_reference(raw, 128, 170)  # (3, 128, 170)
        np.testing.assert_allclose(denormalize(img)[:, :, :170].numpy(), expected, atol=1e-4)
        batch = torch.stack([img, -10 * torch.ones_like(img)])  # (2, 3, H, W)
        assert torch.equal(denormalize(batch)[0], denormalize(img))
        assert (denormalize(batch)[1] == 0).all()  # clamped to [0, 1]

    def test_masks_are_resized_bilinear_then_thresholded_at_half(self, small):
        raw = small.get_raw(3)[2].numpy().astype(float)  # (n, 300, 400)
        soft = resize_reference(raw, 128, 170)  # (n, 128, 170)
        mask = small[3][2].numpy()
        decided = np.abs(soft - 0.5) > 1e-4  # leave exact ties to rounding
        np.testing.assert_array_equal(mask[:, :128, :170][decided], (soft >= 0.5)[decided])
        assert set(np.unique(mask)) <= {0.0, 1.0}

    def test_padding_is_zero_in_image_and_masks_at_800(self, synthetic_paths):
        img, _, mask, _ = BuildDataset(synthetic_paths)[2]
        assert (img[:, :, 1066:] == 0).all() and (mask[:, :, 1066:] == 0).all()
        assert (img[:, :, :1066] != 0).any(dim=0).float().mean() > 0.99  # real content is rarely exactly 0

    def test_boxes_are_scaled_like_the_image(self, small):
        raw_bbox = small.get_raw(4)[3]
        scale = torch.tensor([170 / 400, 128 / 300, 170 / 400, 128 / 300])
        torch.testing.assert_close(small[4][3], raw_bbox * scale)

    @pytest.mark.parametrize("input_height", [HEIGHT, 800])
    def test_each_box_encloses_its_mask_in_the_input_frame(self, synthetic_paths, input_height):
        """Every mask pixel centre lies in the box; when upscaling (800) the box is also tight to within
        one original pixel (when downscaling, thin parts such as legs may vanish from the mask)."""
        dataset = BuildDataset(synthetic_paths, input_height=input_height)
        scale = torch.tensor([dataset.scaled_size[1] / 400, dataset.scaled_size[0] / 300])  # (x, y)
        for index in range(len(dataset)):
            _, _, mask, bbox = dataset[index]
            for m, box in zip(mask, bbox):
                rows, cols = torch.nonzero(m, as_tuple=True)
                low = torch.stack([cols.min(), rows.min()]) + 0.5  # (x, y) of the first pixel centres
                high = torch.stack([cols.max(), rows.max()]) + 0.5  # (x, y) of the last pixel centres
                assert (box[:2] <= low).all() and (high <= box[2:]).all()
                if input_height == 800:
                    assert (low - box[:2] < scale).all() and (box[2:] - high < scale).all()

    def test_hflip_flips_image_masks_and_boxes_together_half_the_time(self, synthetic_paths, small):
        flipping = BuildDataset(synthetic_paths, input_height=HEIGHT, hflip=True)
        img, label, mask, bbox = small[7]
        width = small.scaled_size[1]  # 170: flipped inside the resized image, before padding
        mirrored = (img.clone(), mask.clone(), bbox[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]))
        mirrored[0][:, :, :width] = img[:, :, :width].flip(-1)
        mirrored[1][:, :, :width] = mask[:, :, :width].flip(-1)
        mirrored[2][:, [0, 2]] += width  # x1' = Ws - x2, x2' = Ws - x1
        torch.manual_seed(0)
        flips = []
        for _ in range(20):
            f_img, f_label, f_mask, f_bbox = flipping[7]
            assert torch.equal(f_label, label)
            flipped = torch.equal(f_img, mirrored[0])
            assert flipped or torch.equal(f_img, img)
            expected = mirrored if flipped else (img, mask, bbox)
            assert torch.equal(f_mask, expected[1])
            torch.testing.assert_close(f_bbox, expected[2])
            flips.append(flipped)
        assert 0 < sum(flips) < 20


class TestLoader:
    def test_batch_layout_of_handout_4_3(self, small):
        img, labels, masks, bboxes = next(iter(BuildDataLoader(small, 4, shuffle=True, num_workers=0).loader()))
        assert img.shape == (4, 3, 128, 192) and img.dtype == torch.float32
        assert len(labels) == len(masks) == len(bboxes) == 4
        for label, mask, bbox in zip(labels, masks, bboxes):
            assert mask.shape == (len(label), 128, 192) and bbox.shape == (len(label), 4)

    def test_two_workers_give_the_same_batches_as_the_main_process(self, small):
        small[0]  # open the h5 files here first: workers must still get their own handles
        batches = [list(BuildDataLoader(small, 5, shuffle=False, num_workers=w).loader()) for w in (0, 2)]
        assert len(batches[0]) == len(batches[1]) == 3  # 12 images: 5 + 5 + 2
        for (img_a, lab_a, mask_a, _), (img_b, lab_b, mask_b, _) in zip(*batches):
            torch.testing.assert_close(img_a, img_b)  # workers run torch single-threaded: last-bit differences
            assert all(torch.equal(a, b) for a, b in zip(lab_a, lab_b))
            # masks can only differ where the interpolated value ties with 0.5 to the last bit
            assert all((a != b).float().mean() < 1e-4 for a, b in zip(mask_a, mask_b))

    def test_dataset_pickles_without_its_h5_handles(self, small):
        small[0]
        clone = pickle.loads(pickle.dumps(small))
        assert clone._h5 is None
        assert torch.equal(clone[0][0], small[0][0])

    def test_empty_image_in_a_batch(self, tiny_paths):
        dataset = BuildDataset(tiny_paths, input_height=64)
        _, labels, masks, bboxes = next(iter(BuildDataLoader(dataset, 3, False, 0).loader()))
        assert [len(x) for x in labels] == [2, 0, 1]
        assert masks[1].shape == (0, 64, 96) and bboxes[1].shape == (0, 4)

    def test_sampler_sets_the_order(self, small):
        loader = BuildDataLoader(small, 2, shuffle=False, num_workers=0, sampler=[11, 3]).loader()
        (img, labels, _, _), = list(loader)
        assert torch.equal(img[0], small[11][0]) and torch.equal(labels[1], small[3][1])

    def test_sampler_with_shuffle_is_an_error(self, small):
        with pytest.raises(ValueError, match="shuffle must be False when a sampler is given"):
            BuildDataLoader(small, 2, shuffle=True, num_workers=0, sampler=[0, 1])


class TestSplit:
    def test_80_20_disjoint_and_covering(self):
        train, test = split_dataset(list(range(3265)))
        assert (len(train), len(test)) == (2612, 653)
        assert sorted(train.indices + test.indices) == list(range(3265))

    def test_reproducible_for_a_seed_and_different_for_another(self):
        data = list(range(100))
        assert split_dataset(data, seed=3)[0].indices == split_dataset(data, seed=3)[0].indices
        assert split_dataset(data, seed=3)[0].indices != split_dataset(data, seed=4)[0].indices

    def test_subsets_return_dataset_items(self, small):
        train, test = split_dataset(small)
        assert (len(train), len(test)) == (10, 2)  # round(0.8 * 12) = 10
        assert torch.equal(test[0][0], small[test.indices[0]][0])


class TestValidation:
    @pytest.mark.parametrize("which, role", list(enumerate(ds.ROLES)))
    def test_missing_file_names_it_and_the_synthetic_writer(self, tiny_paths, which, role):
        os.remove(tiny_paths[which])
        expected = f"{role} file not found: .*{FILE_NAMES[which]}.*synthetic.py"
        with pytest.raises(FileNotFoundError, match=expected):
            BuildDataset(tiny_paths)

    def test_wrong_h5_key(self, tmp_path):
        paths = write_files(tmp_path, *tiny_data(), key="images")
        expected = r"images file .*img_comp_zlib.h5 has no dataset 'data' \(keys: \['images'\]\)"
        with pytest.raises(ValueError, match=expected):
            BuildDataset(paths)

    def test_wrong_image_shape_or_dtype(self, tmp_path):
        images, masks, labels, bboxes = tiny_data()
        paths = write_files(tmp_path / "a", images[:, 0], masks, labels, bboxes)
        expected = r"images file .* is uint8 \(3, 30, 40\), expected uint8 \(N, 3, H, W\)"
        with pytest.raises(ValueError, match=expected):
            BuildDataset(paths)
        paths = write_files(tmp_path / "b", images.astype(np.float32), masks, labels, bboxes)
        with pytest.raises(ValueError, match="images file .* is float32"):
            BuildDataset(paths)

    def test_masks_of_another_size(self, tmp_path):
        images, masks, labels, bboxes = tiny_data()
        paths = write_files(tmp_path, images, masks[:, :20], labels, bboxes)
        with pytest.raises(ValueError, match=r"masks are \(20, 40\), but the images .* are \(30, 40\)"):
            BuildDataset(paths)

    def test_mask_count_must_match_the_labels(self, tmp_path):
        images, masks, labels, bboxes = tiny_data()
        paths = write_files(tmp_path, images, masks[:2], labels, bboxes)
        with pytest.raises(ValueError, match="masks file .* has 2 masks but the labels file .* lists 3 objects"):
            BuildDataset(paths)

    def test_label_entries_must_match_the_images(self, tmp_path):
        images, masks, labels, bboxes = tiny_data()
        paths = write_files(tmp_path, images, masks[:2], labels[:2], bboxes[:2])
        with pytest.raises(ValueError, match="labels file .* has 2 entries but the images file .* has 3 images"):
            BuildDataset(paths)

    def test_label_outside_1_to_3_names_image_and_value(self, tmp_path):
        images, masks, labels, bboxes = tiny_data()
        paths = write_files(tmp_path, images, masks, [labels[0], labels[1], np.array([7])], bboxes)
        with pytest.raises(ValueError, match="labels file .*: image 2 has label 7; labels must be 1"):
            BuildDataset(paths)

    def test_bbox_entry_not_n_by_4_names_the_image(self, tmp_path):
        images, masks, labels, bboxes = tiny_data()
        paths = write_files(tmp_path, images, masks, labels, [bboxes[0], bboxes[1], np.zeros((1, 5))])
        expected = r"bboxes file .*: image 2 has boxes of shape \(1, 5\), expected \(n, 4\)"
        with pytest.raises(ValueError, match=expected):
            BuildDataset(paths)

    def test_bbox_count_must_match_the_labels_of_the_image(self, tmp_path):
        images, masks, labels, bboxes = tiny_data()
        paths = write_files(tmp_path, images, masks, labels, [bboxes[0][:1], bboxes[1], bboxes[2]])
        with pytest.raises(ValueError, match="image 0 has 1 boxes but the labels file lists 2 objects for it"):
            BuildDataset(paths)

    def test_swapped_box_corners(self, tmp_path):
        images, masks, labels, bboxes = tiny_data()
        paths = write_files(tmp_path, images, masks, labels, [bboxes[0], bboxes[1], bboxes[2][:, [2, 1, 0, 3]]])
        with pytest.raises(ValueError, match="image 2 has a box that is not finite with x1 <= x2"):
            BuildDataset(paths)


class TestVisualisation:
    def test_main_saves_pngs_using_synthetic_data_when_real_files_are_missing(self, tmp_path, capsys):
        args = ds.get_args_parser().parse_args([
            "--data-dir", str(tmp_path / "nothing"), "--synthetic-dir", str(tmp_path / "synthetic"),
            "--synthetic-images", "6", "--out", str(tmp_path / "figures"), "--num", "3", "--input-height", "128"])
        ds.main(args)
        assert sorted(os.listdir(tmp_path / "figures")) == ["dataset_0.png", "dataset_1.png", "dataset_2.png"]
        assert "real data not found" in capsys.readouterr().out

    def test_resolve_data_dir_writes_a_synthetic_set_of_n_images_once(self, tmp_path, capsys):
        assert ds.resolve_data_dir(str(tmp_path), 0) == str(tmp_path)  # the real data
        folder = ds.resolve_data_dir(str(tmp_path), 4)
        assert folder == os.path.join(str(tmp_path), "synthetic_4_paletteshared")
        assert len(BuildDataset(dataset_paths(folder))) == 4
        assert "writing a synthetic dataset" in capsys.readouterr().out
        assert ds.resolve_data_dir(str(tmp_path), 4) == folder and capsys.readouterr().out == ""

    def test_resolve_data_dir_names_the_folder_after_the_scene_options(self, tmp_path):
        folder = ds.resolve_data_dir(str(tmp_path), 3, min_size=30, max_objects=2)
        assert folder == os.path.join(str(tmp_path), "synthetic_3_max_objects2_min_size30_paletteshared")
        assert max(BuildDataset(dataset_paths(folder), input_height=64).num_objects) <= 2

    def test_a_run_keeps_the_palette_of_its_synthetic_set(self, tmp_path):
        """A new run stores the shared palette and its test split is that set; a run stored before the shared
        palette (no synthetic_palette among its settings) trained on per-class hues, and so does its test split
        and its resumed run."""
        from checkpoint import CHECKPOINT_KEYS
        from conftest import parse_train

        assert parse_train(["--demo"]).synthetic_palette == "shared"
        new_run = dict(data_dir=str(tmp_path), synthetic=5, input_height=64, synthetic_min_size=14,
                       synthetic_palette="shared")
        assert ds.build_test_split(new_run).dataset.paths[0].startswith(str(tmp_path / "synthetic_5_min_size14_"
                                                                                       "paletteshared"))
        old_run = {k: v for k, v in new_run.items() if k != "synthetic_palette"}
        assert ds.synthetic_options(old_run) == dict(min_size=14, palette="class")
        assert ds.build_test_split(old_run).dataset.paths[0].startswith(str(tmp_path / "synthetic_5_min_size14_"
                                                                                       "paletteclass"))
        torch.save({**dict.fromkeys(CHECKPOINT_KEYS), "format": "solo-checkpoint-v1", "epoch": 0, "iteration": 1,
                    "args": old_run}, tmp_path / "old.pth")
        assert parse_train(["--resume", str(tmp_path / "old.pth")]).synthetic_palette == "class"

    def test_the_figure_shows_each_mask_in_its_class_colour_with_its_box_and_name(self, small):
        index = int(np.argmax(small.num_objects))  # the most crowded image
        img, label, mask, bbox = small[index]
        fig = ds.item_figure(img, label, mask, bbox, "title")
        (ax,) = fig.axes
        shown = torch.tensor(ax.images[0].get_array())  # (Hp, Wp, 3)
        image = denormalize(img).permute(1, 2, 0)
        for k in range(len(label)):  # where a single object's mask lies: half the image, half its class colour
            alone = (mask[k] > 0) & (mask.sum(0) == 1)
            blend = 0.5 * image[alone] + 0.5 * torch.tensor(CLASS_COLORS[label[k] - 1])
            torch.testing.assert_close(shown[alone], blend.float(), atol=1e-5, rtol=0)
        outside = mask.sum(0) == 0
        torch.testing.assert_close(shown[outside], image[outside].float(), atol=1e-6, rtol=0)
        boxes = [(p.get_x(), p.get_y(), p.get_x() + p.get_width(), p.get_y() + p.get_height()) for p in ax.patches]
        np.testing.assert_allclose(boxes, bbox.numpy(), rtol=1e-6)
        assert [t.get_text() for t in ax.texts] == [CLASS_NAMES[k - 1] for k in label.tolist()]
        assert len(label) >= 2 and ax.get_title() == "title"

    def test_first_choices_are_the_most_crowded_images(self):
        assert ds.choose_images(np.array([1, 4, 2, 5, 1]), 4)[:2] == [3, 1]
        assert len(set(ds.choose_images(np.array([1, 4, 2, 5, 1]), 5))) == 5


# ----------------------------------------------------------------------------------------------------
# The raw path: uint8 items from the workers, preprocess_batch on the device
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_paths(synthetic_paths, tmp_path_factory):
    """Five synthetic 300 x 400 images keeping the first 3, 0, 2, 3, 1 of their objects: an image without
    objects, and images with 3 masks (3 channels take another CPU resize kernel in single-threaded code)."""
    source = BuildDataset(synthetic_paths, input_height=HEIGHT)
    items = [source.get_raw(i) for i in range(5)]
    keep = [3, 0, 2, 3, 1]
    assert all(len(item[1]) >= k for item, k in zip(items, keep))
    return write_files(tmp_path_factory.mktemp("mixed"), np.stack([item[0].numpy() for item in items]),
                       np.concatenate([item[2][:k].numpy() for item, k in zip(items, keep)]),
                       [item[1][:k].numpy() for item, k in zip(items, keep)],
                       [item[3][:k].numpy() for item, k in zip(items, keep)])


def both_batches(paths, indices, input_height, hflip=False, seed=0):
    """(collect_fn of the float items, collect_fn of the raw items) of the same images, each read after
    seeding the torch RNG with `seed`, so that with hflip both draw the same flips."""
    batches = []
    for raw in (False, True):
        dataset = BuildDataset(paths, input_height=input_height, hflip=hflip, raw=raw)
        torch.manual_seed(seed)
        batches.append(BuildDataLoader.collect_fn([dataset[i] for i in indices]))
    return batches


def assert_same_batch(actual, expected):
    """Every tensor equal bit for bit, with the same dtype and shape (torch.equal checks both)."""
    img, labels, masks, bboxes = actual
    assert torch.equal(img, expected[0]) and img.dtype == expected[0].dtype
    for got, want in zip((labels, masks, bboxes), expected[1:]):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


class TestRawItems:
    def test_raw_item_is_get_raw_in_the_original_frame_plus_a_flip_flag(self, synthetic_paths, small):
        raw = BuildDataset(synthetic_paths, input_height=HEIGHT, raw=True)
        img, label, mask, bbox, flip = raw[5]
        n = len(label)
        assert img.shape == (3, 300, 400) and img.dtype == torch.uint8
        assert label.shape == (n,) and label.dtype == torch.int64
        assert mask.shape == (n, 300, 400) and mask.dtype == torch.uint8
        assert bbox.shape == (n, 4) and bbox.dtype == torch.float32
        assert flip.shape == () and flip.dtype == torch.bool and not flip  # no hflip: never flipped
        for a, b in zip((img, label, mask, bbox), small.get_raw(5)):
            assert torch.equal(a, b)  # boxes in the 300 x 400 frame, not scaled

    def test_without_hflip_neither_path_draws_from_the_rng(self, synthetic_paths):
        for raw in (False, True):
            state = torch.get_rng_state()
            BuildDataset(synthetic_paths, input_height=HEIGHT, raw=raw)[0]
            assert torch.equal(torch.get_rng_state(), state)

    def test_collect_fn_stacks_raw_images_and_flips(self, synthetic_paths):
        raw = BuildDataset(synthetic_paths, input_height=HEIGHT, hflip=True, raw=True)
        img, labels, masks, bboxes, flip = BuildDataLoader.collect_fn([raw[i] for i in range(3)])
        assert img.shape == (3, 3, 300, 400) and img.dtype == torch.uint8
        assert flip.shape == (3,) and flip.dtype == torch.bool
        assert [m.shape for m in masks] == [(len(lab), 300, 400) for lab in labels]
        assert [b.shape for b in bboxes] == [(len(lab), 4) for lab in labels]

    def test_collect_fn_rejects_raw_and_float_items_mixed(self, synthetic_paths, small):
        raw = BuildDataset(synthetic_paths, input_height=HEIGHT, raw=True)
        with pytest.raises(ValueError, match=r"differ in length \(\[4, 5\]\): raw and float items mixed"):
            BuildDataLoader.collect_fn([small[0], raw[1]])


class TestPreprocessBatch:
    """preprocess_batch(collect_fn(raw items)) is collect_fn(float items), bit for bit on the CPU."""

    @pytest.mark.parametrize("input_height", [HEIGHT, 800])
    def test_equals_the_float_batch(self, synthetic_paths, input_height):
        expected, raw_batch = both_batches(synthetic_paths, [0, 3, 4, 7], input_height)
        batch = ds.preprocess_batch(raw_batch, input_height)
        assert_same_batch(batch, expected)
        assert batch[0].shape == (4, 3) + BuildDataset(synthetic_paths, input_height).input_size

    @pytest.mark.parametrize("input_height", [HEIGHT, 800])
    @pytest.mark.parametrize("threads", [1, 2])
    def test_images_without_or_with_three_objects(self, mixed_paths, input_height, threads):
        """One thread, as in DataLoader workers, is where the kernel depends on the channel count."""
        default = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            expected, raw_batch = both_batches(mixed_paths, range(5), input_height)
            batch = ds.preprocess_batch(raw_batch, input_height)
        finally:
            torch.set_num_threads(default)
        assert [len(label) for label in batch[1]] == [3, 0, 2, 3, 1]
        assert batch[2][1].shape == (0,) + batch[0].shape[-2:] and batch[3][1].shape == (0, 4)
        assert_same_batch(batch, expected)

    def test_batch_of_images_without_objects(self, mixed_paths):
        expected, raw_batch = both_batches(mixed_paths, [1, 1], HEIGHT)
        batch = ds.preprocess_batch(raw_batch, HEIGHT)
        assert_same_batch(batch, expected)
        assert [m.shape for m in batch[2]] == [(0, 128, 192)] * 2

    @pytest.mark.parametrize("input_height", [HEIGHT, 800])
    def test_flips_the_same_images_as_the_float_path_for_a_seed(self, synthetic_paths, input_height):
        indices = [2, 0, 5, 9, 11, 6]
        expected, raw_batch = both_batches(synthetic_paths, indices, input_height, hflip=True, seed=0)
        flip = raw_batch[4]
        assert 0 < flip.sum() < len(indices)  # the batch has flipped and unflipped images
        batch = ds.preprocess_batch(raw_batch, input_height)
        assert_same_batch(batch, expected)
        unflipped, _ = both_batches(synthetic_paths, indices, input_height)
        for b in range(len(indices)):  # the flip is real: flipped images differ from their unflipped twin
            assert torch.equal(batch[0][b], unflipped[0][b]) != bool(flip[b])

    def test_raw_loader_with_workers_gives_the_main_process_float_batches(self, synthetic_paths, small):
        """The training set-up: workers only read uint8 arrays, the main process does all the float work,
        so the batches equal the float path's in the main process exactly (float items made in the
        single-threaded workers differ in the last bits, see TestLoader)."""
        raw = BuildDataset(synthetic_paths, input_height=HEIGHT, raw=True)
        raw_batches = list(BuildDataLoader(raw, 5, shuffle=False, num_workers=2).loader())
        float_batches = list(BuildDataLoader(small, 5, shuffle=False, num_workers=0).loader())
        assert len(raw_batches) == len(float_batches) == 3
        for raw_batch, expected in zip(raw_batches, float_batches):
            assert_same_batch(ds.preprocess_batch(raw_batch, HEIGHT), expected)

    def test_float_batch_is_an_error_naming_what_is_expected(self, small):
        batch = BuildDataLoader.collect_fn([small[0], small[1]])
        with pytest.raises(ValueError, match=r"expects the raw batch of BuildDataset\(raw=True\).*got a 4-tuple "
                                             r"\(a float batch of BuildDataset\(raw=False\)\?\)"):
            ds.preprocess_batch(batch, HEIGHT)

    def test_float_images_are_an_error(self, synthetic_paths, small):
        raw = BuildDataset(synthetic_paths, input_height=HEIGHT, raw=True)
        img, labels, masks, bboxes, flip = BuildDataLoader.collect_fn([raw[0], raw[1]])
        with pytest.raises(ValueError, match=r"expects the raw batch .*; got img torch.float32 \(2, 3, 300, 400\)"):
            ds.preprocess_batch((img.float(), labels, masks, bboxes, flip), HEIGHT)
        with pytest.raises(ValueError, match=r"got masks torch.float32 \(\d+, 300, 400\) for image 0"):
            ds.preprocess_batch((img, labels, [m.float() for m in masks], bboxes, flip), HEIGHT)
        with pytest.raises(ValueError, match=r"got 2 images but 1 labels, 2 masks and 2 boxes entries"):
            ds.preprocess_batch((img, labels[:1], masks, bboxes, flip), HEIGHT)

    def test_input_height_must_be_a_multiple_of_32(self, synthetic_paths):
        raw = BuildDataset(synthetic_paths, input_height=HEIGHT, raw=True)
        with pytest.raises(ValueError, match="input_height 60 is not a multiple of 32"):
            ds.preprocess_batch(BuildDataLoader.collect_fn([raw[0]]), 60)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
    def test_cuda_matches_the_cpu_float_batch_without_syncing(self, synthetic_paths):
        """Not bitwise on CUDA: other bilinear and /255 arithmetic (fused multiply-adds) move the normalised
        image by a few ulps, and a mask pixel may change where its interpolated value ties with 0.5."""
        expected, raw_batch = both_batches(synthetic_paths, [0, 3, 4, 7], 800, hflip=True, seed=0)
        raw_batch = [raw_batch[0].pin_memory(), raw_batch[1], [m.pin_memory() for m in raw_batch[2]],
                     raw_batch[3], raw_batch[4]]
        torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
        try:
            batch = ds.preprocess_batch(raw_batch, 800, device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        img, labels, masks, bboxes = [batch[0].cpu()] + [[t.cpu() for t in part] for part in batch[1:]]
        torch.testing.assert_close(img, expected[0], rtol=0, atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(labels, expected[1]))
        assert all((a != b).float().mean() < 1e-4 for a, b in zip(masks, expected[2]))
        assert all(torch.equal(a, b) for a, b in zip(bboxes, expected[3]))


class TestPreprocessingHelpers:
    def test_flip_boxes_worked_value_on_leading_dims(self):
        bbox = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 10.0, 5.0]])  # (2, 4) in a 10-wide image
        expected = torch.tensor([[7.0, 2.0, 9.0, 4.0], [0.0, 0.0, 10.0, 5.0]])
        assert torch.equal(ds.flip_boxes(bbox, 10), expected)
        assert torch.equal(ds.flip_boxes(bbox.expand(3, 2, 4), 10), expected.expand(3, 2, 4))  # (3, 2, 4)
        assert torch.equal(ds.flip_boxes(ds.flip_boxes(bbox, 10), 10), bbox)

    def test_scale_boxes_worked_value(self):
        bbox = torch.tensor([[30.0, 30.0, 60.0, 150.0]])
        assert torch.equal(ds.scale_boxes(bbox, (300, 400), (800, 1066)),
                           bbox * torch.tensor([1066 / 400, 800 / 300, 1066 / 400, 800 / 300]))

    def test_resize_masks_of_no_objects(self):
        assert ds.resize_masks(torch.zeros(0, 30, 40, dtype=torch.uint8), (64, 85)).shape == (0, 64, 85)

    def test_resize_masks_one_plane_per_mask_equals_one_mask_at_a_time(self):
        masks = (torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(0)) < 0.5).to(torch.uint8)
        together = ds.resize_masks(masks, (80, 106))  # (3, 80, 106)
        assert torch.equal(together, torch.cat([ds.resize_masks(m[None], (80, 106)) for m in masks]))
        assert set(together.unique().tolist()) <= {0.0, 1.0}

    def test_normalize_is_torchvision_normalize_in_place(self):
        import torchvision.transforms.functional as TF

        img = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(0))  # (2, 3, 16, 20)
        expected = TF.normalize(img, ds.MEAN, ds.STD)
        assert ds.normalize_(img) is img and torch.equal(img, expected)
