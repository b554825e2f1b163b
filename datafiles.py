"""The course's four data files (CIS680 handout 4.1): their names and layout, validated reading, writing.

  images h5  key "data", uint8 (N, 3, H, W) RGB (300 x 400 in the course data)
  masks h5   key "data", uint8 (total_objects, H, W) in {0, 1}, in image order
  labels npy object array (N,), entry i int (n_i,): 1 vehicle, 2 person, 3 animal (CLASS_NAMES[k - 1])
  bboxes npy object array (N,), entry i float (n_i, 4): x1 y1 x2 y2 in pixels of the H x W frame
The masks of image i are rows offset[i] : offset[i] + n_i of the masks file (offsets = cumulative n_i).

dataset.BuildDataset reads them, synthetic.py writes a stand-in in the same format. Every reading helper raises
an error naming the file, the image and what was expected.
"""
import os
import pickle

import h5py
import numpy as np
import torch

from errors import DataError, MissingFileError

CLASS_NAMES = ("vehicle", "person", "animal")  # label k is CLASS_NAMES[k - 1]; 0 = background
FILE_NAMES = (
    "hw3_mycocodata_img_comp_zlib.h5",
    "hw3_mycocodata_mask_comp_zlib.h5",
    "hw3_mycocodata_labels_comp_zlib.npy",
    "hw3_mycocodata_bboxes_comp_zlib.npy",
)
ROLES = ("images", "masks", "labels", "bboxes")  # what each of the four files holds, for error messages
H5_KEY = "data"
# what unpickling an object array of numpy arrays needs (numpy 1.x and 2.x names); nothing else may load
NUMPY_CLASSES = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
                 ("numpy.core.multiarray", "scalar")}
EMPTY_CHECK = 100  # how many of the first masks are read at start to refuse a dataset whose masks are all empty


def default_class_names(num_classes):
    """The course's names for its 3 classes (num_classes 4, the background counted), else 'class 1' ... 'class C-1'."""
    if num_classes == len(CLASS_NAMES) + 1:
        return CLASS_NAMES
    return tuple(f"class {k}" for k in range(1, num_classes))


def dataset_paths(data_dir):
    """[images_h5, masks_h5, labels_npy, bboxes_npy] inside `data_dir`."""
    return [os.path.join(data_dir, name) for name in FILE_NAMES]


def split_indices(num, train_frac=0.8, seed=0):
    """The reproducible 80/20 split every script uses: (train indices, test indices), each sorted, together
    covering range(num): the first round(train_frac * num) of torch.randperm(num) (seeded generator) train."""
    if not 0 <= train_frac <= 1:
        raise ValueError(f"train_frac must be in [0, 1], got {train_frac}")
    num_train = round(train_frac * num)
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))  # (num,)
    return order[:num_train].sort().values.tolist(), order[num_train:].sort().values.tolist()


# ----------------------------------------------------------------------------------------------------
# Reading, with errors that name the file, the image and what was expected
# ----------------------------------------------------------------------------------------------------
def check_files_exist(paths):
    if len(paths) != 4:
        raise DataError(f"expected 4 paths [images_h5, masks_h5, labels_npy, bboxes_npy], got {len(paths)}")
    for role, name, path in zip(ROLES, FILE_NAMES, paths):
        if not os.path.isfile(path):
            raise MissingFileError(
                f"{role} file not found: {path} (expected the {name} of the dataset). The real CIS680 data "
                f"comes with the course handout; `python synthetic.py --out DIR` writes a synthetic dataset "
                f"in the same format.")


def h5_shape(path, role, expected):
    """Shape of the uint8 dataset "data" in `path`; `expected` describes its layout, e.g. "(N, 3, H, W)"."""
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{role} file {path} is not a readable HDF5 file ({err})") from None
    with f:
        if H5_KEY not in f:
            raise DataError(f"{role} file {path} has no dataset '{H5_KEY}' (keys: {list(f.keys())})")
        data = f[H5_KEY]
        if data.dtype != np.uint8 or data.ndim != expected.count(",") + 1:
            raise DataError(f"{role} file {path}: '{H5_KEY}' is {data.dtype} {data.shape}, "
                             f"expected uint8 {expected}")
        return data.shape


class _NumpyOnly(pickle.Unpickler):
    """Unpickles an object array of numpy arrays and refuses every other class: a crafted .npy cannot run code."""

    def find_class(self, module, name):
        if (module, name) not in NUMPY_CLASSES:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which an array of numpy arrays never does")
        return super().find_class(module, name)


def load_entries(path, role):
    """The per-image entries of an npy file (an object array (N,) or a regular array (N, ...)). An object array is
    unpickled admitting only the numpy classes it needs (np.load(allow_pickle=True) would run whatever code a
    crafted file holds)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            if not dtype.hasobject:
                array = np.load(path, allow_pickle=False)
            else:
                array = _NumpyOnly(f).load()
                if not isinstance(array, np.ndarray) or array.shape != shape:
                    raise ValueError(f"its pickle holds a {type(array).__name__}, not the {shape} array its header "
                                     f"announces")
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, TypeError, AttributeError) as err:
        raise DataError(f"{role} file {path} is not a readable .npy file of numpy arrays "
                        f"({type(err).__name__}: {err})") from None
    if array.ndim == 0:
        raise DataError(f"{role} file {path} holds a scalar, expected one entry per image")
    return list(array)


def parse_labels(entries, path):
    """Entries -> list of int64 (n_i,) arrays with values in 1..len(CLASS_NAMES)."""
    labels = []
    for i, entry in enumerate(entries):
        try:
            label = np.atleast_1d(np.asarray(entry, dtype=np.float64))
        except (TypeError, ValueError):
            raise DataError(f"labels file {path}: image {i} has a non-numeric entry {entry!r}") from None
        if label.ndim != 1:
            raise DataError(f"labels file {path}: image {i} has shape {label.shape}, expected (n,)")
        bad = label[(label < 1) | (label > len(CLASS_NAMES)) | (label != np.round(label))]
        if bad.size:
            raise DataError(f"labels file {path}: image {i} has label {bad[0]:g}; labels must be 1 "
                             f"(vehicle), 2 (person) or 3 (animal)")
        labels.append(label.astype(np.int64))
    return labels


def parse_bboxes(entries, path, labels, height, width):
    """Entries -> (list of float32 (n_i, 4) arrays, one box per label, clipped to the height x width image;
    the number of boxes that had to be clipped). A box wholly outside the image is refused."""
    bboxes, clipped = [], 0
    for i, (entry, label) in enumerate(zip(entries, labels)):
        try:
            bbox = np.asarray(entry, dtype=np.float32)
        except (TypeError, ValueError):
            raise DataError(f"bboxes file {path}: image {i} has a non-numeric entry") from None
        if bbox.size == 0:
            bbox = bbox.reshape(0, 4)
        if bbox.ndim != 2 or bbox.shape[1] != 4:
            raise DataError(f"bboxes file {path}: image {i} has boxes of shape {bbox.shape}, "
                            f"expected (n, 4) x1 y1 x2 y2")
        if len(bbox) != len(label):
            raise DataError(f"bboxes file {path}: image {i} has {len(bbox)} boxes but the labels file "
                            f"lists {len(label)} objects for it")
        if not np.isfinite(bbox).all() or (bbox[:, 2:] < bbox[:, :2]).any():
            raise DataError(f"bboxes file {path}: image {i} has a box that is not finite with x1 <= x2, "
                            f"y1 <= y2: {bbox.tolist()}")
        inside = np.clip(bbox, 0, [width, height, width, height]).astype(np.float32)
        outside = (inside[:, 2] <= inside[:, 0]) | (inside[:, 3] <= inside[:, 1])
        outside &= (bbox[:, 2] > bbox[:, 0]) & (bbox[:, 3] > bbox[:, 1])  # a box that had an area and lost it
        if outside.any():
            raise DataError(f"bboxes file {path}: image {i} has a box outside the {height}x{width} image: "
                            f"{bbox[outside][0].tolist()}")
        clipped += int((inside != bbox).any(1).sum())
        bboxes.append(inside)
    return bboxes, clipped


def check_masks_not_all_empty(path, num_masks):
    """Refuse a masks file whose first masks (EMPTY_CHECK of them) are all empty: a dataset without masks would
    train to a tiny loss and learn nothing."""
    try:
        with h5py.File(path, "r") as f:
            first = f[H5_KEY][:min(num_masks, EMPTY_CHECK)]
    except (OSError, ValueError) as err:
        raise DataError(f"masks file {path}: its first {min(num_masks, EMPTY_CHECK)} masks cannot be read "
                        f"({type(err).__name__}: {str(err).strip() or 'no details'})") from None
    if len(first) and not first.any():
        raise DataError(f"masks file {path}: its first {len(first)} masks are all empty; the masks must mark each "
                        f"object's pixels with 1")


def check_counts(paths, num_images, num_masks, labels, bboxes):
    """One labels entry and one bboxes entry per image, one mask per label."""
    if num_images == 0:
        raise DataError(f"images file {paths[0]} holds no images")
    for role, path, entries in (("labels", paths[2], labels), ("bboxes", paths[3], bboxes)):
        if len(entries) != num_images:
            raise DataError(f"{role} file {path} has {len(entries)} entries but the images file {paths[0]} "
                             f"has {num_images} images")
    num_objects = sum(len(label) for label in labels)
    if num_masks != num_objects:
        raise DataError(f"masks file {paths[1]} has {num_masks} masks but the labels file {paths[2]} lists "
                         f"{num_objects} objects")


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def object_array(entries):
    """A 1-D object array of the entries, even when they all have one shape (np.array would stack them)."""
    array = np.empty(len(entries), dtype=object)
    for i, entry in enumerate(entries):
        array[i] = entry
    return array


def write_dataset(out_dir, items, num_images, height, width, compression=1):
    """Write the four files into out_dir (created if needed) and return their paths.
    items: an iterable of num_images (image uint8 (3, H, W), masks uint8 (n, H, W), labels int (n,),
    boxes float (n, 4)), streamed into the h5 files (gzip at `compression`, one chunk per image and per mask)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = dataset_paths(out_dir)
    gzip = dict(compression="gzip", compression_opts=compression)
    labels, boxes = [], []
    with h5py.File(paths[0], "w") as f_img, h5py.File(paths[1], "w") as f_mask:
        images = f_img.create_dataset(H5_KEY, (num_images, 3, height, width), np.uint8,
                                      chunks=(1, 3, height, width), **gzip)
        masks = f_mask.create_dataset(H5_KEY, (0, height, width), np.uint8, maxshape=(None, height, width),
                                      chunks=(1, height, width), **gzip)
        for i, (image, mask, label, box) in enumerate(items):
            images[i] = image  # (3, H, W)
            masks.resize(len(masks) + len(mask), axis=0)
            masks[len(masks) - len(mask):] = mask  # (n, H, W)
            labels.append(np.asarray(label, np.int64))
            boxes.append(np.asarray(box, np.float32).reshape(-1, 4))
    np.save(paths[2], object_array(labels), allow_pickle=True)
    np.save(paths[3], object_array(boxes), allow_pickle=True)
    return paths
