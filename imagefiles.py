"""Image files as the model reads them, with numpy and Pillow only (no torch: the onnxruntime deployment uses
them too): JPEG/PNG photos (main_infer.py --images, deploy.py) and the images of a COCO-format dataset
(dataset.COCODataset), decoded with Pillow (a matplotlib dependency) rather than torchvision.io, whose decoding is
deprecated. Grey, palette, RGBA and CMYK files become RGB; phone photos are turned upright by their EXIF
orientation. 16-bit files (PNG) become 8 bits by v / 257, rounded: 0..65535 onto 0..255, the full range, whatever
range the image uses (no contrast stretch: a dark 16-bit image stays as dark as an 8-bit export of it). And the
network's input frame: the resize to the input height, the ImageNet normalisation, the padding to multiples of 32
(handout 4.3), and the exported model's limits on the input's sides (deploy.py)."""
import math
import os

import numpy as np
from PIL import Image, ImageOps

from errors import MissingFileError, PhotoError

MEAN = (0.485, 0.456, 0.406)  # ImageNet RGB mean
STD = (0.229, 0.224, 0.225)  # ImageNet RGB std
PAD_MULTIPLE = 32  # the input is padded to a multiple of the backbone's coarsest stride
INPUT_MIN_SIDE = 64  # the exported model's input sides (export.py): multiples of 32 from 64 ...
INPUT_MAX_SIDE = 2048  # ... to 2048; photo inputs are made to fit, in PyTorch too (the same pixels in both)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
PHOTO_MAX_SIDE = 1600  # photos are shrunk to this longer side first: the overlays' size, and memory bounded
PHOTO_MAX_ASPECT = 4  # photos more elongated than 4:1 are padded to it
EXIF_ORIENTATION = 0x0112  # the EXIF tag of the camera's orientation; values 5-8 swap width and height
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # Pillow's errors of bad files
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes of 16-bit grey (32-bit "I" from some files)


def list_photos(folder, recursive=False):
    """Sorted paths of the JPEG/PNG files in folder (and its subfolders with recursive), relative to it, and the
    number of subfolders left out. A clear error if there is no photo."""
    if not os.path.isdir(folder):
        raise MissingFileError(f"--images: {folder!r} is not a directory")
    photos, subfolders = [], 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if not recursive:
            subfolders += sum(not d.lower().endswith(PHOTO_SUFFIXES) for d in dirs)
            # a folder named like a photo is listed, to be skipped with a warning rather than silently
            photos += [d for d in dirs if d.lower().endswith(PHOTO_SUFFIXES)]
            dirs.clear()
        relative = os.path.relpath(root, folder)
        photos += [os.path.normpath(os.path.join(relative, f)) for f in files if f.lower().endswith(PHOTO_SUFFIXES)]
    if not photos:
        raise MissingFileError(f"--images: no JPEG/PNG images ({', '.join(PHOTO_SUFFIXES)}) in {folder!r}"
                                + (" (its subfolders are searched with --recursive)" if subfolders else ""))
    return sorted(photos), subfolders


def image_size(path):
    """(height, width) of an image file as stored and as shown (after its EXIF rotation), from its header only.
    PhotoError with the reason when the file is not a readable image."""
    if os.path.isdir(path):
        raise PhotoError("it is a folder")
    try:
        with Image.open(path) as image:
            stored = (image.height, image.width)
            turned = orientation(image) in (5, 6, 7, 8)
    except READ_ERRORS as err:
        raise PhotoError(f"not a readable image ({type(err).__name__}: {err})") from None
    return stored, stored[::-1] if turned else stored


def orientation(image):
    """The EXIF orientation (1: upright) of an opened image, from the EXIF its header holds: Image.getexif would
    decode a whole PNG to look for a chunk after the pixels."""
    raw = image.info.get("exif")
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(EXIF_ORIENTATION, 1)


def to_rgb8(image):
    """An opened image as 8-bit RGB. 16-bit grey (modes I;16*, and I, which some files and Pillow versions give)
    is mapped by v / 257, rounded and clipped to 0..65535 first: 0 -> 0, 65535 -> 255, 257 k -> k (Pillow's
    convert("RGB") would clip every value above 255 to white). 16-bit RGB(A) PNGs Pillow itself reduces to their
    high byte (v // 256, at most one level from v / 257)."""
    if image.mode in WIDE_MODES:
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")
    return image.convert("RGB")


def load_photo(path, max_side=PHOTO_MAX_SIDE, upright=True):
    """numpy uint8 (3, h, w) RGB, EXIF orientation applied when upright (phone photos), shrunk so that its longer side
    is at most max_side (None: never; JPEGs are decoded at a reduced size where the format allows): a huge photo
    costs what a moderate one does. 16-bit files as to_rgb8 maps them. PhotoError with the reason when the file is
    not a readable image."""
    if os.path.isdir(path):
        raise PhotoError("it is a folder")
    try:
        with Image.open(path) as image:
            if max_side:
                image.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale if still larger
            image = to_rgb8(ImageOps.exif_transpose(image) if upright and orientation(image) != 1 else image)
            if max_side and max(image.size) > max_side:
                scale = max_side / max(image.size)
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.BILINEAR, reducing_gap=2.0)
            return np.ascontiguousarray(np.array(image).transpose(2, 0, 1))  # (3, h, w) uint8
    except READ_ERRORS as err:
        raise PhotoError(f"not a readable image ({type(err).__name__}: {err})") from None


# ----------------------------------------------------------------------------------------------------
# The network's input frame
# ----------------------------------------------------------------------------------------------------
def resized_sizes(height, width, input_height, max_long_side=None):
    """Sizes of an height x width image as the network sees it, (scaled, padded to multiples of PAD_MULTIPLE).
    The handout's frame (max_long_side None): height input_height, width int(input_height * width / height)
    (300 x 400 at 800 -> 800 x 1066 -> 800 x 1088). mmdetection's keep-ratio frame, that of the published models
    (convert.py): the shorter side input_height unless the longer would exceed max_long_side, each side rounded
    as mmcv's rescale_size rounds it (480 x 640 at 800 / 1333 -> 800 x 1067 -> 800 x 1088)."""
    if max_long_side is None:
        scaled = (input_height, int(input_height * width / height))
    else:
        scale = min(input_height / min(height, width), max_long_side / max(height, width))
        scaled = (int(height * scale + 0.5), int(width * scale + 0.5))
    return scaled, tuple(math.ceil(s / PAD_MULTIPLE) * PAD_MULTIPLE for s in scaled)


def letterbox(photo, max_aspect=PHOTO_MAX_ASPECT, input_height=None):
    """photo (3, h, w) padded with black at the bottom or right to an aspect of at most max_aspect:1 (the model
    knows 4:3 images; a 3000x10 strip would be resized to a width of 0). With input_height, a wide photo is also
    padded at the bottom so that its width at that height is at most INPUT_MAX_SIDE (4:1 at 800 would be 3200
    wide: the exported model takes 2048 at most)."""
    h, w = photo.shape[-2:]
    height, width = max(h, math.ceil(w / max_aspect)), max(w, math.ceil(h / max_aspect))
    if input_height:
        height = max(height, -(-input_height * w // INPUT_MAX_SIDE))  # int(input_height * w / height) <= 2048
    return np.pad(photo, ((0, 0), (0, height - h), (0, width - w)))


def photo_input(photo, input_height, max_long_side=None):
    """uint8 (3, h, w) -> float32 (1, 3, Hp, Wp) network input in BuildDataset's frame (resized_sizes: the
    handout's, or with max_long_side mmdetection's): resized keeping the aspect ratio (bilinear, antialiased when
    shrinking: a photo is usually shrunk several times; Pillow on float channels, no rounding), normalised,
    zero-padded right/bottom to multiples of 32, and on the right to a width of at least INPUT_MIN_SIDE (a 1:4
    photo at height 64 is 16 wide: the exported model takes 64 at least; post-processing crops the padding to the
    resized size, resized_sizes(h, w, ...)[0])."""
    (scaled_h, scaled_w), padded = resized_sizes(*photo.shape[-2:], input_height, max_long_side)
    padded = (padded[0], max(padded[1], INPUT_MIN_SIDE))
    out = np.zeros((1, 3) + padded, np.float32)
    for c in range(3):
        plane = Image.fromarray(photo[c].astype(np.float32) / 255, mode="F")
        resized = np.asarray(plane.resize((scaled_w, scaled_h), Image.BILINEAR))  # (Hs, Ws)
        out[0, c, :scaled_h, :scaled_w] = (resized - MEAN[c]) / STD[c]
    return out
