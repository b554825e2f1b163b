"""Dataset and data loader for SOLO instance segmentation (CIS680 handout, section 4).

The four course files and their layout are described in datafiles.py (`dataset_paths(data_dir)` lists them):
uint8 images (N, 3, 300, 400), the masks of all objects in image order, per-image labels (1 vehicle, 2 person,
3 animal) and boxes x1 y1 x2 y2. BuildDataset groups the masks by image (the labels give the counts).

Boxes use pixel-edge coordinates: pixel column c spans [c, c + 1), so scaling a box by the image's scale
factors keeps it around the resized mask (every mask pixel centre lies inside the box).

Preprocessing (handout 4.3), for input_height = 800:
  [0, 255] -> [0, 1] -> bilinear resize to 800 x 1066 -> ImageNet normalisation -> zero pad right/bottom
  to 800 x 1088 (multiples of 32). Masks: same resize (bilinear, then >= 0.5) and padding. Boxes: x scaled
  by 1066 / 400, y by 800 / 300. Padded pixels are exactly 0 in the normalised image and in the masks.

Two data paths give the same batch (the same tensors, bit for bit on the CPU):
  BuildDataset(paths)            items preprocessed one by one (in the workers); collect_fn stacks them.
  BuildDataset(paths, raw=True)  uint8 items in the 300 x 400 frame, for preprocess_batch(batch, input_height,
                                 device) to resize, flip, normalise and pad the whole batch on the device: what
                                 training on a GPU uses, so that the loader's workers only decode.
Both use the helpers resize_images, resize_masks, scale_boxes, flip_boxes, normalize_ and pad_to.

Multi-scale training (the SOLO authors' 3x recipe, docs/training.md): BuildDataLoader(..., heights=
multiscale_heights(input_height)) draws one input height per batch (MultiScaleBatchSampler); a dataset asked for an
(index, height) pair gives its item at that height, on either path.

Your own data: COCODataset(json, image_folder) reads a COCO-format instance-segmentation set (cocofiles.py) into
the same items as BuildDataset's float items, images of any size each resized to input_height keeping its
aspect; collect_fn pads a batch to its largest image.

Visual check (saves `--num` PNGs into `--out`; uses data/synthetic when the real files are missing):
  python dataset.py [--data-dir data | --coco JSON IMAGES] [--out figures] [--num 5]
"""
import argparse
import copy
import itertools
import math
import operator
import os

import h5py
import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset

from atomic_files import atomic_write
from cocofiles import (coco_object, gt_annotations, object_boxes, object_masks, pack, read_coco, segmentation_area,
                       unpack, write_coco)
from datafiles import (CLASS_NAMES, H5_KEY, ROLES, check_counts, check_files_exist, check_masks_not_all_empty,
                       dataset_paths, h5_shape, load_entries, parse_bboxes, parse_labels, split_indices)
from errors import DataError, PhotoError, run_script
from imagefiles import MEAN, PAD_MULTIPLE, STD, load_photo, resized_sizes
from plots import class_colors
from synthetic import write_synthetic_folder

_WARNED = set()  # bboxes files whose clipped boxes were reported


def denormalize(img):
    """Undo the ImageNet normalisation of img (3, H, W) or (B, 3, H, W); returns values clamped to [0, 1]."""
    if img.ndim not in (3, 4) or img.shape[-3] != 3:
        raise ValueError(f"expected an image (3, H, W) or (B, 3, H, W), got shape {tuple(img.shape)}")
    mean = torch.tensor(MEAN, dtype=img.dtype, device=img.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img * std + mean).clamp(0, 1)


def check_input_height(input_height):
    """ValueError unless input_height is a multiple of PAD_MULTIPLE (BuildDataset's and preprocess_batch's)."""
    if input_height % PAD_MULTIPLE:
        raise ValueError(f"input_height {input_height} is not a multiple of {PAD_MULTIPLE}: the image is "
                         f"padded only on the right, so the SOLO head can read the resized height off the "
                         f"padded input (800, the handout's, is)")


def multiscale_heights(input_height):
    """The input heights multi-scale training draws from (one per batch, MultiScaleBatchSampler): the SOLO authors'
    3x recipe (solo_r50_fpn_8gpu_3x.py: 640, 672, ..., 800 with 1333 as the longer side's cap) scaled to
    input_height, i.e. input_height * k / 25 for k = 20..25, each rounded down to a multiple of PAD_MULTIPLE and
    at least PAD_MULTIPLE. Sorted, without repeats: 800 -> (640, 672, 704, 736, 768, 800), 128 -> (96, 128).
    ValueError naming input_height unless it is a positive multiple of PAD_MULTIPLE."""
    check_input_height(input_height)
    if input_height <= 0:
        raise ValueError(f"input_height {input_height} is not positive: expected a positive multiple of "
                         f"{PAD_MULTIPLE} (800, the handout's)")
    return tuple(sorted({max(PAD_MULTIPLE, input_height * k // 25 // PAD_MULTIPLE * PAD_MULTIPLE)
                         for k in range(20, 26)}))


# ----------------------------------------------------------------------------------------------------
# Preprocessing helpers (handout 4.3), on a leading batch dimension, on any device. BuildDataset applies
# them to one image, preprocess_batch to a whole batch: one implementation, so both give the same bits.
# ----------------------------------------------------------------------------------------------------
def to_device(x, device, non_blocking=True):
    """x on `device`. A host tensor bound for a GPU is pinned first (the loader's already are): a non_blocking
    copy from pageable memory may synchronise with the stream."""
    device = torch.device(device)
    if non_blocking and device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=non_blocking)


def resize_images(img, size):
    """uint8 (B, 3, H, W) in [0, 255] -> float32 (B, 3, Hs, Ws) in [0, 1], bilinear (half-pixel centres)
    to size = (Hs, Ws)."""
    return F.interpolate(img.float() / 255, size=size, mode="bilinear", align_corners=False)


def resize_masks(mask, size):
    """{0, 1} (N, H, W) of any dtype -> float32 (N, Hs, Ws) in {0, 1}: bilinear, then >= 0.5. N may be 0.

    Each mask is resized as its own single-channel plane (N, 1, H, W), not as the channels of one image
    (1, N, H, W): ATen's CPU kernel depends on the channel count (with one thread, as in DataLoader workers,
    3 channels take a channels-last kernel that differs in the last bit), whereas one plane per mask gives
    the same bits whether the masks of one image or of a whole batch are resized together.
    """
    if not len(mask):  # interpolate rejects empty inputs
        return torch.zeros((0,) + tuple(size), device=mask.device)
    soft = F.interpolate(mask[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]  # (N, Hs, Ws)
    return soft.ge_(0.5)  # in place: 1.0 where >= 0.5, else 0.0 (one large buffer fewer)


def scale_boxes(bbox, ori_size, scaled_size):
    """bbox (..., 4) x1 y1 x2 y2 in the ori_size (H, W) frame -> the same boxes in the scaled_size frame."""
    (height, width), (scaled_h, scaled_w) = ori_size, scaled_size
    scale = to_device(torch.tensor([scaled_w / width, scaled_h / height] * 2), bbox.device)  # x1 y1 x2 y2
    return bbox * scale


def flip_boxes(bbox, width):
    """Horizontal flip of bbox (..., 4) in an image `width` wide: x -> width - x, so x1' = width - x2,
    x2' = width - x1 (y unchanged). Images and masks flip with .flip(-1) on the same (unpadded) frame."""
    return torch.stack([width - bbox[..., 2], bbox[..., 1], width - bbox[..., 0], bbox[..., 3]], dim=-1)


def normalize_(img):
    """ImageNet normalisation of img (..., 3, H, W) in [0, 1], in place (callers pass a fresh resize output);
    returns img. Computed as torchvision's normalize does, without its host-device synchronising check."""
    mean = to_device(torch.tensor(MEAN).view(3, 1, 1), img.device)  # float32, as torchvision makes them
    std = to_device(torch.tensor(STD).view(3, 1, 1), img.device)
    return img.sub_(mean).div_(std)  # (..., 3, H, W)


def pad_to(x, size):
    """Zero-pad (..., Hs, Ws) on the right and bottom to (..., Hp, Wp) = size."""
    return F.pad(x, (0, size[1] - x.shape[-1], 0, size[0] - x.shape[-2]))


def preprocess_item(img, label, mask, bbox, flip, input_height, max_long_side=None):
    """One item of get_raw's form (img uint8 (3, H, W), label, mask uint8 (n, H, W), bbox (n, 4) original pixels)
    and its flip decision -> the network's (img float32 (3, Hp, Wp) normalised, label, mask float32 (n, Hp, Wp),
    bbox (n, 4) input pixels), handout 4.3; in mmdetection's frame with max_long_side (imagefiles.resized_sizes)."""
    ori_size = tuple(img.shape[-2:])
    scaled_size, input_size = resized_sizes(*ori_size, input_height, max_long_side)
    img = resize_images(img[None], scaled_size)[0]  # (3, Hs, Ws)
    mask = resize_masks(mask, scaled_size)  # (n, Hs, Ws)
    bbox = scale_boxes(bbox, ori_size, scaled_size)  # (n, 4)
    if flip:  # in the scaled frame, before padding
        img, mask, bbox = img.flip(-1), mask.flip(-1), flip_boxes(bbox, scaled_size[1])
    return pad_to(normalize_(img), input_size), label, pad_to(mask, input_size), bbox


class ItemsDataset(Dataset):
    """What BuildDataset and COCODataset share: get_raw(i) preprocessed (preprocess_item), with one flip draw per
    item, and what evaluation asks of a dataset (class_names, category_ids, image_id, image_size, coco_gt)."""
    raw = False
    hflip = False
    max_long_side = None  # the handout's frame; COCODataset may take mmdetection's (a converted published model)

    def _index(self, index):
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        return index % len(self)

    def __getitem__(self, index):
        """Item `index` at input_height. An (index, height) pair, as MultiScaleBatchSampler's batches ask, gives the
        item at that height instead: the item of this dataset built with input_height=height; a raw item then
        carries the height as a sixth part, for preprocess_batch (engine.batch_to_device)."""
        index, height = index if isinstance(index, tuple) else (index, None)
        if height is not None:
            check_input_height(height)
        img, label, mask, bbox = self.get_raw(index)
        # the one RNG draw per item, in both modes, so raw and float datasets flip the same items
        flip = torch.rand(()) < 0.5 if self.hflip else torch.tensor(False)  # bool ()
        if self.raw:
            return (img, label, mask, bbox, flip) + (() if height is None else (height,))
        return preprocess_item(img, label, mask, bbox, flip, self.input_height if height is None else height,
                               self.max_long_side)

    def scaled_size_of(self, index):
        """(H_s, W_s) of image `index` resized inside the padded input (PostProcess crops the padding to it)."""
        return resized_sizes(*self.image_size(index), self.input_height, self.max_long_side)[0]


class BuildDataset(ItemsDataset):
    """Images, labels, masks and boxes of the CIS680 data, preprocessed as in handout 4.3.

    Args:
        paths: [images_h5, masks_h5, labels_npy, bboxes_npy] (see `dataset_paths`).
        input_height: height of the resized image, a multiple of 32; width = int(input_height * W / H)
            (800 -> 800 x 1066, padded on the right to 800 x 1088).
        hflip: if True, flip image, masks and boxes horizontally with probability 0.5 (torch RNG: one
            `torch.rand(()) < 0.5` per item, in both modes, so a seeded run flips the same images either way).
        raw: if True, items are left in the original frame for `preprocess_batch` to preprocess a whole
            batch on the device (how a GPU trains: the workers only decode).

    dataset[i] -> (img float32 (3, Hp, Wp) normalised, label int64 (n,) in 1..3,
                   mask float32 (n, Hp, Wp) in {0, 1}, bbox float32 (n, 4) x1 y1 x2 y2 in input pixels);
    n may be 0 (label (0,), mask (0, Hp, Wp), bbox (0, 4)).
    With raw=True: dataset[i] -> (img uint8 (3, H, W), label int64 (n,), mask uint8 (n, H, W) in {0, 1},
                   bbox float32 (n, 4) in original pixels, flip bool tensor () (always False without hflip)),
    i.e. get_raw(i) plus the flip decision, which preprocess_batch applies after resizing.
    Attributes: ori_size (H, W) of the files, scaled_size (Hs, Ws) after resizing, input_size (Hp, Wp)
    after padding, num_objects int array (N,).

    The h5 files are opened lazily, once per process, so DataLoader workers (num_workers > 0) each get
    their own handle.
    """

    def __init__(self, paths, input_height=800, hflip=False, raw=False):
        check_input_height(input_height)
        paths = [os.fspath(p) for p in paths]
        check_files_exist(paths)
        num_images, channels, height, width = h5_shape(paths[0], "images", "(N, 3, H, W)")
        if channels != 3:
            raise DataError(f"images file {paths[0]}: shape {(num_images, channels, height, width)}, "
                            f"expected (N, 3, H, W) RGB")
        mask_shape = h5_shape(paths[1], "masks", "(total_objects, H, W)")
        if mask_shape[1:] != (height, width):
            raise DataError(f"masks file {paths[1]}: masks are {mask_shape[1:]}, but the images in "
                            f"{paths[0]} are {(height, width)}")
        labels = parse_labels(load_entries(paths[2], "labels"), paths[2])
        bbox_entries = load_entries(paths[3], "bboxes")
        check_counts(paths, num_images, mask_shape[0], labels, bbox_entries)
        check_masks_not_all_empty(paths[1], mask_shape[0])
        bboxes, clipped = parse_bboxes(bbox_entries, paths[3], labels, height, width)
        if clipped and paths[3] not in _WARNED:  # said once per file, though every split reads it
            _WARNED.add(paths[3])
            print(f"warning: bboxes file {paths[3]}: {clipped} boxes reach beyond the {height}x{width} images; "
                  f"they are clipped to them")

        self.paths = paths
        self.labels = labels  # list (N,) of int64 (n_i,)
        self.bboxes = bboxes  # list (N,) of float32 (n_i, 4)
        self.num_objects = np.array([len(label) for label in labels], dtype=np.int64)  # (N,)
        self.mask_offsets = np.concatenate([[0], np.cumsum(self.num_objects)[:-1]])  # (N,) first mask row
        self.hflip = hflip
        self.raw = raw
        self.input_height = input_height
        self.ori_size = (height, width)
        self.scaled_size, self.input_size = resized_sizes(height, width, input_height)
        self.class_names, self.category_ids = CLASS_NAMES, tuple(range(1, len(CLASS_NAMES) + 1))
        self._h5 = None  # {"images": h5py.File, "masks": h5py.File}, opened by the process that reads them
        self._h5_pid = None

    def __len__(self):
        return len(self.labels)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_h5"] = state["_h5_pid"] = None  # h5py handles cannot be pickled; each worker reopens
        return state

    def _data(self, role):
        if self._h5 is None or self._h5_pid != os.getpid():  # first access in this (possibly forked) process
            self._h5 = {name: h5py.File(path, "r") for name, path in zip(ROLES[:2], self.paths)}
            self._h5_pid = os.getpid()
        return self._h5[role][H5_KEY]

    def image_id(self, index):
        """The image's id in evaluation and results jsons: its index in the files."""
        return self._index(index)

    def image_size(self, index):
        return self.ori_size

    def coco_gt(self, indices):
        """The ground truth of the images `indices` as a pycocotools COCO (ids: image index, category = label)."""
        images, annotations = [], []
        for i in indices:
            _, labels, masks, _ = self.get_raw(i)
            images.append(dict(id=self.image_id(i), height=self.ori_size[0], width=self.ori_size[1]))
            annotations += gt_annotations(self.image_id(i), labels, masks, first_id=len(annotations) + 1)
        return coco_object(images, annotations, [dict(id=k, name=name) for k, name in
                                                 zip(self.category_ids, self.class_names)])

    def object_boxes(self, index):
        """label int64 (n,), bbox float32 (n, 4) original pixels of image `index`, without reading its pixels."""
        i = self._index(index)
        return self.labels[i], self.bboxes[i]

    def get_raw(self, index):
        """Ground truth in the original frame: img uint8 (3, H, W), label int64 (n,),
        mask uint8 (n, H, W), bbox float32 (n, 4) x1 y1 x2 y2 in original pixels."""
        i = self._index(index)
        start, num = int(self.mask_offsets[i]), int(self.num_objects[i])
        img = torch.from_numpy(self._read("images", i, i + 1, i)[0])  # (3, H, W)
        mask = torch.from_numpy(self._read("masks", start, start + num, i))  # (n, H, W)
        return img, torch.tensor(self.labels[i]), mask, torch.tensor(self.bboxes[i])  # copies: callers may edit

    def _read(self, role, start, stop, image):
        """Rows start:stop of the h5 file of `role`; a read error (a corrupt compressed block, a file cut short)
        names the file and the image."""
        try:
            return self._data(role)[start:stop]
        except (OSError, ValueError, KeyError) as err:
            path = self.paths[ROLES.index(role)]
            raise DataError(f"{role} file {path}: image {image} cannot be read ({type(err).__name__}: "
                            f"{str(err).strip() or 'no details'})") from None



class COCODataset(ItemsDataset):
    """A COCO-format dataset: a json and its image folder (cocofiles.py), items as BuildDataset's float items.

    Args:
        json_path, images_dir: the json and the folder its file_names are relative to.
        input_height: as BuildDataset's; each image is resized to this height keeping its aspect and padded to
            multiples of 32, so items differ in width (collect_fn pads a batch to its largest).
        hflip: as BuildDataset's.

    dataset[i] -> (img float32 (3, Hp_i, Wp_i), label int64 (n,) in 1..K, mask float32 (n, Hp_i, Wp_i),
                   bbox float32 (n, 4) input pixels): the image's objects; crowd regions (iscrowd 1) are left out
                   of training (no positive cell) and kept in coco_gt for evaluation.
    Labels: category ids of any values map to 1..K in id order; class_names and category_ids hold the names and
    the json's ids. Images are decoded per item (in the workers), as photos: RGB, upright by EXIF when that gives
    the annotated size. Attributes: image_ids (N,), sizes (N, 2) as annotated, num_objects (N,), num_crowd (N,).
    """

    def __init__(self, json_path, images_dir, input_height=800, hflip=False, max_long_side=None):
        check_input_height(input_height)
        data = read_coco(json_path, images_dir)
        for warning in data.warnings:
            print(f"warning: COCO json {data.path}: {warning}")
        self.json_path, self.listed_ids = data.path, data.listed_ids
        self.class_names, self.category_ids = data.class_names, data.category_ids
        self.image_ids = np.array([image.id for image in data.images], dtype=np.int64)  # (N,)
        self.sizes = np.array([image.size for image in data.images], dtype=np.int64)  # (N, 2)
        crowd = [[bool(a.get("iscrowd", 0)) for a in image.annotations] for image in data.images]
        self.num_crowd = np.array([sum(c) for c in crowd], dtype=np.int64)  # (N,)
        self.num_objects = np.array([len(c) for c in crowd], dtype=np.int64) - self.num_crowd  # (N,)
        self._label_of = {cat_id: k + 1 for k, cat_id in enumerate(self.category_ids)}
        self._records = pack(data.images)  # one buffer: workers share it (cocofiles.pack)
        self.input_height, self.hflip, self.max_long_side = input_height, hflip, max_long_side
        skipped = len(self.listed_ids) - len(self)
        print(f"COCO json {data.path}: {len(self)} images ({skipped} skipped, not trained on or evaluated), "
              f"{self.num_objects.sum()} objects, {self.num_crowd.sum()} crowd regions, {len(self.class_names)} "
              f"classes; {len(data.warnings)} warnings")

    def __len__(self):
        return len(self.image_ids)

    def image_id(self, index):
        return int(self.image_ids[self._index(index)])

    def image_size(self, index):
        return tuple(int(s) for s in self.sizes[self._index(index)])

    def _record(self, index):
        return unpack(*self._records, self._index(index))

    def object_boxes(self, index):
        """label int64 (n,), bbox float32 (n, 4) original pixels of image `index` (not its crowd regions), without
        decoding the image (nor the masks of annotations with a bbox)."""
        return object_boxes(self._record(index), self._label_of, self.json_path)

    def get_raw(self, index):
        """img uint8 (3, H, W), label int64 (n,), mask uint8 (n, H, W), bbox float32 (n, 4) original pixels."""
        image = self._record(index)
        try:
            img = torch.from_numpy(load_photo(image.path, max_side=None, upright=image.upright))  # (3, H, W)
        except PhotoError as err:
            raise DataError(f"COCO json {self.json_path}: image {image.id} ({image.path}): {err}") from None
        if tuple(img.shape[1:]) != image.size:
            raise DataError(f"COCO json {self.json_path}: image {image.id} ({image.path}) decodes to "
                            f"{img.shape[1]}x{img.shape[2]}, the json says {image.size[0]}x{image.size[1]}")
        labels, masks, boxes = object_masks(image, self._label_of, self.json_path)
        return img, torch.from_numpy(labels), torch.from_numpy(masks), torch.from_numpy(boxes)

    def coco_gt(self, indices):
        """The json's ground truth of the images `indices` (crowd regions included, skipped annotations not) as a
        pycocotools COCO with the json's image and category ids."""
        images, annotations = [], []
        for i in indices:
            image = self._record(i)
            images.append(dict(id=image.id, height=image.size[0], width=image.size[1]))
            for ann in image.annotations:
                seg = ann["segmentation"]
                if isinstance(seg, list):  # pycocotools cannot read an empty polygon beside others
                    seg = [poly for poly in seg if len(poly)]
                area = ann.get("area")
                if not (isinstance(area, (int, float)) and math.isfinite(area) and area >= 0):  # COCOeval needs it
                    area = segmentation_area(seg, image.size)
                annotations.append(dict(id=ann["id"], image_id=image.id, category_id=ann["category_id"],
                                        segmentation=seg, area=float(area), iscrowd=int(ann.get("iscrowd", 0))))
        return coco_object(images, annotations, [dict(id=k, name=name) for k, name in
                                                 zip(self.category_ids, self.class_names)])


def _check_raw_batch(batch):
    """The five parts of a raw batch, or a ValueError saying what preprocess_batch expects and what it got."""
    expected = ("preprocess_batch expects the raw batch of BuildDataset(raw=True) as BuildDataLoader.collect_fn "
                "returns it: (img uint8 (B, 3, H, W), label_list, mask_list, bbox_list, flip bool (B,))")
    if not isinstance(batch, (tuple, list)) or len(batch) != 5:
        got = (f"a {len(batch)}-tuple" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}")
        hint = " (a float batch of BuildDataset(raw=False)?)" if got == "a 4-tuple" else ""
        raise ValueError(f"{expected}; got {got}{hint}")
    img, label_list, mask_list, bbox_list, flip = batch
    if not (torch.is_tensor(img) and img.dtype == torch.uint8 and img.ndim == 4 and img.shape[1] == 3):
        got = f"{img.dtype} {tuple(img.shape)}" if torch.is_tensor(img) else type(img).__name__
        raise ValueError(f"{expected}; got img {got}")
    num = len(img)
    if not (torch.is_tensor(flip) and flip.dtype == torch.bool and flip.shape == (num,)):
        got = f"{flip.dtype} {tuple(flip.shape)}" if torch.is_tensor(flip) else type(flip).__name__
        raise ValueError(f"{expected}; got flip {got}")
    if not len(label_list) == len(mask_list) == len(bbox_list) == num:
        raise ValueError(f"{expected}; got {num} images but {len(label_list)} labels, {len(mask_list)} masks "
                         f"and {len(bbox_list)} boxes entries")
    for i, (label, mask) in enumerate(zip(label_list, mask_list)):
        if mask.dtype != torch.uint8 or mask.shape != (len(label),) + tuple(img.shape[-2:]):
            raise ValueError(f"{expected}; got masks {mask.dtype} {tuple(mask.shape)} for image {i} with "
                             f"{len(label)} labels")
    return img, label_list, mask_list, bbox_list, flip


def preprocess_batch(batch, input_height, device="cpu", non_blocking=True):
    """Preprocess a raw batch on `device`: the float batch of BuildDataset(paths, input_height) for the same
    items and flips, with the whole batch resized at once (how a GPU trains).

    Args:
        batch: BuildDataLoader.collect_fn of BuildDataset(raw=True) items: (img uint8 (B, 3, H, W),
            label_list [(n,) int64], mask_list [(n, H, W) uint8], bbox_list [(n, 4) float32 original pixels],
            flip bool (B,) on the CPU, as the loader gives it).
        input_height: as BuildDataset's, a multiple of 32.
        device: where the work happens and the outputs live.
        non_blocking: asynchronous host-to-device copies (overlap with the GPU when the loader pins memory).
    Returns:
        img float32 (B, 3, Hp, Wp) normalised and padded, label_list [(n,) int64],
        mask_list [(n, Hp, Wp) float32 {0, 1}] (views of one (sum n, Hp, Wp) tensor),
        bbox_list [(n, 4) float32 x1 y1 x2 y2 input pixels], all on `device`.
    On the CPU the result equals collect_fn of the float items bit for bit. On CUDA expect differences of a
    few float32 ulps in the image (different bilinear and /255 arithmetic, about 1e-6 after normalisation)
    and, from those, mask pixels flipped where the interpolated value ties with 0.5 (a tiny fraction);
    labels and boxes (computed on the CPU) are exact.
    No host-device synchronisation: object counts and flips are read on the host, from list lengths and the
    CPU flip tensor.
    For a GPU: on the CPU it does the float items' arithmetic, but in the training process rather than in
    parallel workers (and its batch-sized buffers, over glibc's 32 MB mmap threshold, page-fault on every
    call), so CPU training keeps the float path.
    """
    img, label_list, mask_list, bbox_list, flip = _check_raw_batch(batch)
    check_input_height(input_height)
    ori_size = tuple(img.shape[-2:])
    scaled_size, input_size = resized_sizes(*ori_size, input_height)
    counts = [len(label) for label in label_list]  # objects per image (host)
    obj_flip = flip.repeat_interleave(torch.tensor(counts, dtype=torch.int64))  # (N,) each object's image's flip

    # boxes and labels: a few numbers per object, done on the host, then one copy each
    bbox = scale_boxes(torch.cat(bbox_list), ori_size, scaled_size)  # (N, 4)
    bbox = torch.where(obj_flip[:, None], flip_boxes(bbox, scaled_size[1]), bbox)
    bbox = to_device(bbox, device, non_blocking)  # (N, 4)
    label = to_device(torch.cat(label_list), device, non_blocking)  # (N,)

    # images and masks: copy the uint8 tensors (29x fewer bytes than float at 800), resize each kind in one call
    img = resize_images(to_device(img, device, non_blocking), scaled_size)  # (B, 3, Hs, Ws)
    mask = torch.cat([to_device(m, device, non_blocking) for m in mask_list])  # (N, H, W) uint8
    mask = resize_masks(mask, scaled_size)  # (N, Hs, Ws)
    # flip only the flipped images, in place: their indices come from the CPU flip tensor (no device sync) and
    # this costs less than torch.where over the whole batch (a flipped copy and a select)
    first = [0] + list(itertools.accumulate(counts))  # (B + 1,) first mask row of each image
    for b in flip.nonzero().flatten().tolist():
        img[b] = img[b].flip(-1)  # (3, Hs, Ws)
        mask[first[b]:first[b + 1]] = mask[first[b]:first[b + 1]].flip(-1)  # (n_b, Hs, Ws)
    img = pad_to(normalize_(img), input_size)  # (B, 3, Hp, Wp)
    mask = pad_to(mask, input_size)  # (N, Hp, Wp)
    return img, list(label.split(counts)), list(mask.split(counts)), list(bbox.split(counts))


class MultiScaleBatchSampler(Sampler):
    """Multi-scale batches: `sampler`'s indices in batches of batch_size (the last one may be smaller, as a
    DataLoader's), each a list of (index, height) pairs with one height per batch, drawn uniformly from `heights`
    (multiscale_heights) by `generator` (a torch.Generator; the draws are a function of its seed).
    ItemsDataset, and ScaledSubset for a Subset, read a pair as the item preprocessed at that height."""

    def __init__(self, sampler, batch_size, heights, generator):
        if not heights:
            raise ValueError("heights is empty: expected the input heights to draw from (multiscale_heights)")
        for height in heights:
            check_input_height(height)
            if height <= 0:
                raise ValueError(f"height {height} is not positive: expected positive multiples of {PAD_MULTIPLE}")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: expected at least 1 image per batch")
        self.sampler, self.batch_size, self.heights, self.generator = sampler, batch_size, tuple(heights), generator

    def __iter__(self):
        indices = iter(self.sampler)
        while batch := list(itertools.islice(indices, self.batch_size)):
            height = self.heights[int(torch.randint(len(self.heights), (), generator=self.generator))]
            yield [(index, height) for index in batch]

    def __len__(self):
        return math.ceil(len(self.sampler) / self.batch_size)


class ScaledSubset(Subset):
    """A Subset whose items may also be asked for as (index, height) pairs (MultiScaleBatchSampler's): the base
    dataset's item self.indices[index] at that height."""

    def __getitem__(self, idx):
        if isinstance(idx, tuple):
            index, height = idx
            return self.dataset[self.indices[index], height]
        return super().__getitem__(idx)

    def __getitems__(self, indices):
        return [self[idx] for idx in indices]


class BuildDataLoader:
    """Batches of (img (B, 3, Hp, Wp), label_list [(n,)], mask_list [(n, Hp, Wp)], bbox_list [(n, 4)]);
    of a raw dataset (BuildDataset(raw=True)): (img uint8 (B, 3, H, W), label_list, mask_list [(n, H, W) uint8],
    bbox_list, flip bool (B,)), for preprocess_batch.

    Pass either `shuffle=True` or a `sampler` (e.g. a DistributedSampler), not both.
    heights (multi-scale training, multiscale_heights): each batch is drawn at one of these input heights
    (MultiScaleBatchSampler, seeded by one draw of torch's RNG when the loader is built: main_train seeds that RNG
    every epoch from (seed, epoch, rank), so a resumed run draws the same heights); a raw batch then has a sixth
    part, its height, for engine.batch_to_device. None: every batch at the dataset's input_height.
    """

    def __init__(self, dataset, batch_size, shuffle, num_workers, sampler=None, heights=None):
        if sampler is not None and shuffle:
            raise ValueError("shuffle must be False when a sampler is given (the sampler sets the order)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.sampler = sampler
        self.heights = heights

    @staticmethod
    def collect_fn(batch):
        """Stack the images (and the flips of raw items); keep labels, masks and boxes as per-image lists
        (object counts differ)."""
        lengths = {len(item) for item in batch}
        if len(lengths) != 1:
            raise ValueError(f"items of one batch differ in length ({sorted(lengths)}): raw and float items mixed?")
        if lengths in ({5}, {6}):  # raw items: (img, label, mask, bbox, flip[, height])
            imgs, labels, masks, bboxes, flips, *heights = zip(*batch)
            raw = torch.stack(imgs, dim=0), list(labels), list(masks), list(bboxes), torch.stack(flips, dim=0)
            if not heights:
                return raw
            if len(set(heights[0])) != 1:
                raise ValueError(f"raw items of one batch asked for at different heights {sorted(set(heights[0]))}: "
                                 f"expected one height per batch (MultiScaleBatchSampler)")
            return raw + (heights[0][0],)
        imgs, labels, masks, bboxes = zip(*batch)
        size = tuple(max(s) for s in zip(*(img.shape[-2:] for img in imgs)))  # images of a COCO set differ in size
        if any(img.shape[-2:] != size for img in imgs):
            imgs, masks = [pad_to(img, size) for img in imgs], [pad_to(mask, size) for mask in masks]
        return torch.stack(imgs, dim=0), list(labels), list(masks), list(bboxes)

    def loader(self):
        common = dict(num_workers=self.num_workers, collate_fn=self.collect_fn, pin_memory=torch.cuda.is_available(),
                      persistent_workers=self.num_workers > 0)
        if self.heights is None:
            return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=self.shuffle, sampler=self.sampler,
                              **common)
        sampler = self.sampler or (RandomSampler(self.dataset) if self.shuffle else SequentialSampler(self.dataset))
        generator = torch.Generator().manual_seed(int(torch.randint(2 ** 62, ())))  # one draw of torch's RNG
        dataset = self.dataset
        if isinstance(dataset, Subset):  # whose indexing takes no (index, height) pairs
            dataset = ScaledSubset(dataset.dataset, dataset.indices)
        return DataLoader(dataset, batch_sampler=MultiScaleBatchSampler(sampler, self.batch_size, self.heights,
                                                                        generator), **common)


def split_dataset(dataset, train_frac=0.8, seed=0):
    """Reproducible disjoint split -> (train Subset, test Subset), covering every index.

    The first round(train_frac * N) indices of torch.randperm(N) (seeded generator) go to train, the rest
    to test; each subset's indices are sorted. 3265 images -> 2612 train, 653 test.
    """
    train, test = split_indices(len(dataset), train_frac, seed)
    return Subset(dataset, train), Subset(dataset, test)


def split_by_id(dataset):
    """split_indices' 80/20 split of a COCODataset by the json's image ids (sorted), not by position among the
    usable images, so that a skipped image moves no other image between the splits."""
    listed = sorted(dataset.listed_ids)
    test_ids = {listed[i] for i in split_indices(len(listed))[1]}
    in_test = [int(image_id) in test_ids for image_id in dataset.image_ids]
    return [i for i, t in enumerate(in_test) if not t], [i for i, t in enumerate(in_test) if t]


def build_datasets(data_dir="data", synthetic=0, input_height=800, hflip=False, synthetic_options=None, raw=False,
                   train_data=None, val_data=None, empty_images="skip"):
    """(train Subset, test Subset) as every script builds them, the flips (if any) only on the train split.

    The course's files: split_dataset's 80/20 split of the four files in data_dir, or with synthetic > 0 of a
    synthetic set of that many images under data_dir (resolve_data_dir) with the scene settings
    synthetic_options; raw: BuildDataset(raw=True) items, for preprocess_batch.
    COCO format: train_data = (json, image folder) trains; val_data (the same form) is the test split, or without
    it the 80/20 split of train_data's images. empty_images 'skip' leaves the training images without an object
    out (the SOLO authors' loader does), 'keep' trains on them as background; the test split keeps every image.
    COCO items are always preprocessed in the workers (raw does not apply: the images differ in size)."""
    if train_data is None:
        paths = dataset_paths(resolve_data_dir(data_dir, synthetic, **(synthetic_options or {})))
        train_set, _ = split_dataset(BuildDataset(paths, input_height=input_height, hflip=hflip, raw=raw))
        _, test_set = split_dataset(BuildDataset(paths, input_height=input_height, hflip=False, raw=raw))
        return train_set, test_set
    if empty_images not in ("skip", "keep"):
        raise ValueError(f"empty_images must be 'skip' or 'keep', got {empty_images!r}")
    train_base = COCODataset(*train_data, input_height=input_height, hflip=hflip)
    if val_data is None:
        test_base = copy.copy(train_base)  # the same images and json, read once; no flips
        test_base.hflip = False
        train_indices, test_indices = split_by_id(train_base)
    else:
        test_base = COCODataset(*val_data, input_height=input_height)
        if test_base.class_names != train_base.class_names:
            raise DataError(f"COCO json {val_data[0]} has the classes {list(test_base.class_names)}, but the training "
                            f"json {train_data[0]} has {list(train_base.class_names)} (by category id): they must "
                            f"list the same categories")
        train_indices, test_indices = list(range(len(train_base))), list(range(len(test_base)))
    if empty_images == "skip":
        empty = [i for i in train_indices if train_base.num_objects[i] == 0]
        train_indices = [i for i in train_indices if train_base.num_objects[i] > 0]
        if empty:
            print(f"{len(empty)} training images without objects left out (--empty-images keep trains on them)")
    if not train_indices:
        raise DataError(f"COCO json {train_data[0]}: no training image has an object to learn")
    return Subset(train_base, train_indices), Subset(test_base, test_indices)


# the training run's data settings that inference reads from a checkpoint (and export.py copies into a model
# file), with main_train.py's defaults (types). synthetic_palette: what a run stored before the shared palette
# had, per-class hues (synthetic.py's 'class'); every run since stores its own. max_long_side: a converted
# model's frame (convert.py)
DATA_SETTINGS = dict(data_dir="data", synthetic=0, input_height=800, synthetic_min_size=14, synthetic_palette="class",
                     train_data=None, val_data=None, max_long_side=None)


def synthetic_options(settings):
    """The scene options of a run's synthetic set from its stored settings: the smallest object and the palette."""
    return dict(min_size=settings["synthetic_min_size"],
                palette=settings.get("synthetic_palette", DATA_SETTINGS["synthetic_palette"]))


def build_test_split(train_args, data_dir=None, synthetic=None, val_data=None):
    """The test Subset of the data the checkpoint was trained on, built as training builds it (its args data_dir,
    synthetic, input_height, train_data, val_data). data_dir alone means the real files in that folder; synthetic
    N the synthetic set; val_data (json, image folder) a COCO-format set, wholly the test split."""
    stored = {**DATA_SETTINGS, **train_args}
    if data_dir is not None or synthetic is not None:  # the course files (or the synthetic set) instead
        stored.update(data_dir=data_dir if data_dir is not None else stored["data_dir"], synthetic=synthetic or 0,
                      train_data=None, val_data=None)
    val_data = val_data or stored["val_data"]
    if val_data is not None:  # a validation json: only it is read
        test = COCODataset(*val_data, input_height=stored["input_height"], max_long_side=stored["max_long_side"])
        return Subset(test, list(range(len(test))))
    _, test_set = build_datasets(stored["data_dir"], stored["synthetic"], stored["input_height"],
                                 synthetic_options=synthetic_options(stored),
                                 train_data=stored["train_data"])
    return test_set


def course_to_coco(paths, out_dir, image_format="png"):
    """The course files `paths` written as a COCO-format dataset in out_dir (cocofiles.write_coco): images,
    train.json and val.json of split_dataset's split (image id = index in the files). PNG is lossless: the
    COCODataset items equal BuildDataset's. Returns the paths of train.json and val.json."""
    dataset = BuildDataset(paths)

    def items():
        for i in range(len(dataset)):
            img, label, mask, bbox = dataset.get_raw(i)
            yield img.numpy(), mask.numpy(), label.numpy(), bbox.numpy()
    train, val = split_indices(len(dataset))
    return write_coco(out_dir, items(), dataset.class_names, {"train.json": train, "val.json": val}, image_format)


# ----------------------------------------------------------------------------------------------------
# Visual check
# ----------------------------------------------------------------------------------------------------
def add_visual_check_args(parser):
    """The flags of the visual-check mains (this one and solo_head.py's): which images, where the PNGs go."""
    parser.add_argument("--data-dir", default="data", type=str, help="folder with the four real data files")
    parser.add_argument("--synthetic-dir", default="data/synthetic", type=str,
                        help="synthetic dataset used (and written if missing) when --data-dir lacks the files")
    parser.add_argument("--synthetic-images", default=400, type=int, help="images in a newly written synthetic set")
    parser.add_argument("--coco", default=None, type=str, nargs=2, metavar=("JSON", "IMAGES"),
                        help="a COCO-format dataset (json and image folder) instead of --data-dir")
    parser.add_argument("--out", default="figures", type=str, help="output folder for the PNGs")
    parser.add_argument("--num", default=5, type=int, help="number of images to save")
    parser.add_argument("--input-height", default=800, type=int, help="network input height (a multiple of 32)")
    parser.add_argument("--seed", default=0, type=int, help="seed for choosing the images")
    return parser


def get_args_parser():
    return add_visual_check_args(argparse.ArgumentParser(description="Save dataset visualisations (image, boxes, "
                                                                     "masks)."))


def write_synthetic_if_missing(folder, num_images=400, seed=0, **options):
    """Paths of the dataset in `folder`, first writing a synthetic one there if any file is missing: whole or not
    at all (synthetic.write_synthetic_folder: a failed or killed write leaves no partial set, runs that need the
    set at once each write a copy and use the first in place, a full disk is a WriteError naming the folder).
    options: write_synthetic_dataset's scene settings (min_size, max_objects, ...)."""
    paths = dataset_paths(folder)
    if not all(os.path.isfile(p) for p in paths):
        print(f"writing a synthetic dataset ({num_images} images, seed {seed}) to {folder} ...")
        paths = write_synthetic_folder(folder, num_images=num_images, seed=seed, **options)
    return paths


def resolve_data_dir(data_dir, synthetic=0, **options):
    """Folder of the four data files for the training scripts: data_dir itself (the real data) when
    synthetic == 0, else data_dir/synthetic_<N>_<option><value>..., holding a synthetic dataset of N images
    (seed 0, scene settings `options` such as min_size=30) written there on first use. The name always holds the
    palette (synthetic.py; 'shared' unless options name another), so a set of another palette, or one written
    before there were palettes (synthetic_<N>..., each class its own hues), is never taken for it."""
    if synthetic <= 0:
        return data_dir
    options = {"palette": "shared", **options}
    suffix = "".join(f"_{key}{value}" for key, value in sorted(options.items()))
    folder = os.path.join(data_dir, f"synthetic_{synthetic}{suffix}")
    write_synthetic_if_missing(folder, num_images=synthetic, **options)
    return folder


def visual_check_dataset(args):
    """The dataset the visual-check mains show: --coco's, else the course files (or the synthetic stand-in)."""
    if args.coco:
        return COCODataset(*args.coco, input_height=args.input_height)
    return BuildDataset(resolve_paths(args.data_dir, args.synthetic_dir, args.synthetic_images),
                        input_height=args.input_height)


def resolve_paths(data_dir, synthetic_dir, num_images=400):
    """The real files in data_dir if all four exist, else the synthetic ones (written if missing)."""
    paths = dataset_paths(data_dir)
    if all(os.path.isfile(p) for p in paths):
        return paths
    print(f"real data not found in {data_dir}; using the synthetic dataset in {synthetic_dir}")
    return write_synthetic_if_missing(synthetic_dir, num_images)


def choose_images(num_objects, num, seed=0):
    """Two of the most crowded images (like the handout's figures), then random others."""
    crowded = [int(i) for i in np.argsort(-num_objects, kind="stable")[:min(2, num)]]
    others = [int(i) for i in np.random.default_rng(seed).permutation(len(num_objects)) if i not in crowded]
    return crowded + others[:num - len(crowded)]


def object_sizes(subset):
    """Every object of a Subset: (labels int64 (n,), sizes float64 (n,)), sqrt(w * h) of its box in input pixels
    (after the resize to input_height; SOLOHead.target compares it, in 800-pixel units, with its scale ranges)."""
    dataset, labels, sizes = subset.dataset, [], []
    for i in subset.indices:
        label, bbox = dataset.object_boxes(i)
        ori_size = dataset.image_size(i)
        scaled = np.array(resized_sizes(*ori_size, dataset.input_height)[0], dtype=np.float64)
        sy, sx = scaled / np.array(ori_size, dtype=np.float64)
        bbox = np.asarray(bbox, dtype=np.float64).reshape(-1, 4)
        sizes.append(np.sqrt((bbox[:, 2] - bbox[:, 0]) * sx * (bbox[:, 3] - bbox[:, 1]) * sy))
        labels.append(np.asarray(label, dtype=np.int64))
    return np.concatenate(labels or [np.zeros(0, np.int64)]), np.concatenate(sizes or [np.zeros(0)])


def plot_dataset_figures(dataset, out, num=5, seed=0):
    """dataset_<k>.png of num images (choose_images: two of the most crowded first), the handout's dataset.py
    visual check (figures 5-6). Returns [(path, title)]."""
    os.makedirs(out, exist_ok=True)
    figures = []
    for k, index in enumerate(choose_images(dataset.num_objects, num, seed)):
        img, label, mask, bbox = dataset[index]
        path = os.path.join(out, f"dataset_{k}.png")
        title = f"image {index}: {len(label)} objects, input {tuple(img.shape[1:])} (padding right/bottom)"
        plot_item(img, label, mask, bbox, title, path, dataset.class_names)
        figures.append((path, title))
    return figures


def item_figure(img, label, mask, bbox, title, class_names=CLASS_NAMES):
    """The denormalised input with masks (class colour, alpha 0.5), boxes and class names: a matplotlib Figure."""
    import matplotlib.pyplot as plt  # here, not at the top: the loader's workers import this module

    rgb = denormalize(img).permute(1, 2, 0).numpy()  # (Hp, Wp, 3)
    label, colours = label.tolist(), class_colors(len(class_names))
    for k in range(len(label)):
        on = mask[k].numpy() > 0  # (Hp, Wp)
        rgb[on] = 0.5 * rgb[on] + 0.5 * np.array(colours[label[k] - 1])
    height, width = rgb.shape[:2]
    fig, ax = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
    ax.imshow(rgb)
    for k in range(len(label)):
        x1, y1, x2, y2 = bbox[k].tolist()
        colour = colours[label[k] - 1]
        ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2))
        ax.text(x1, y1, class_names[label[k] - 1], color="black", fontsize=10, va="bottom",
                bbox=dict(facecolor=colour, alpha=0.8, pad=1, edgecolor="none"))
    ax.set_title(title)
    ax.axis("off")
    return fig


def plot_item(img, label, mask, bbox, title, path, class_names=CLASS_NAMES):
    """item_figure saved as a PNG at path, atomically."""
    import matplotlib.pyplot as plt

    fig = item_figure(img, label, mask, bbox, title, class_names)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)


def main(args):
    for path, _ in plot_dataset_figures(visual_check_dataset(args), args.out, args.num, args.seed):
        print(f"saved {path}")


if __name__ == "__main__":
    matplotlib.use("Agg")  # a script saves its figures and never shows them
    run_script(main, get_args_parser())
