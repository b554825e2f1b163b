"""COCO-format instance segmentation data (cocodataset.org/#format-data): one json file and a folder of images,
what CVAT, Label Studio, Roboflow and the labelme converters export.

  images       [{id, file_name, height, width}], file_name relative to the image folder
  annotations  [{id, image_id, category_id, segmentation, iscrowd (default 0), bbox [x, y, w, h] (optional)}];
               segmentation: polygons [[x1, y1, x2, y2, ...], ...] (one or several per object), uncompressed RLE
               {size: [h, w], counts: [int, ...]} or compressed RLE {size: [h, w], counts: "..."} (pycocotools)
  categories   [{id, name}], ids of any values: label k (1..K) is the category with the k-th smallest id

read_coco validates a json (every error names the json and the image, annotation or category id) and checks the
image files' headers; object_masks decodes the masks of one image; write_coco writes a dataset in this format
(synthetic.py --format coco, to_coco.py). Boxes are the json's when an annotation has one (as the SOLO authors'
loader takes them), else the tight box of the decoded mask.

What a user would rather go on past is skipped with one warning line naming it and counted in the summary: an
image file that is not a readable image or has another size than the json says, an empty polygon or mask.
"""
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import pickle

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from errors import DataError, MissingFileError, PhotoError
from imagefiles import image_size

KEYS = dict(images=("id", "file_name", "height", "width"), annotations=("id", "image_id", "category_id",
                                                                         "segmentation"), categories=("id", "name"))
HEADER_THREADS = 8  # image headers are read in parallel: the work is waiting for the disk
MAX_ASPECT = 8  # images more elongated are skipped: the network resizes every image to one height


@dataclasses.dataclass
class CocoImage:
    """One image of a json: its id, file, size (H, W) as annotated, whether its EXIF rotation gives that size,
    and its annotations (the json's dicts, validated), the crowd regions among them."""
    id: int
    path: str
    size: tuple
    upright: bool
    annotations: list


@dataclasses.dataclass
class CocoData:
    """What read_coco found: the categories [(id, name)] by id, the usable images, the ids of every image the
    json lists, and the warnings of what was skipped."""
    path: str
    images_dir: str
    categories: list
    images: list
    listed_ids: list
    warnings: list

    @property
    def class_names(self):
        return tuple(name for _, name in self.categories)

    @property
    def category_ids(self):
        return tuple(cat_id for cat_id, _ in self.categories)


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def read_coco(json_path, images_dir):
    """Read and validate a COCO instance-segmentation json whose file_names are relative to images_dir.
    Returns CocoData; DataError naming the json and the entry for a file that does not hold what the format says."""
    json_path, images_dir = os.fspath(json_path), os.fspath(images_dir)
    data = _load_json(json_path)
    categories = _categories(data["categories"], json_path)
    images = _images(data["images"], json_path, images_dir)
    warnings = []
    for ann in _annotations(data["annotations"], json_path, images, dict(categories)):
        image = images[ann["image_id"]]
        problem = check_segmentation(ann["segmentation"], image.size)
        if problem is not None:
            raise DataError(f"COCO json {json_path}: annotation {ann['id']} (image {image.id}): {problem}")
        if segmentation_area(ann["segmentation"], image.size) == 0:
            warnings.append(f"annotation {ann['id']} (image {image.id}): an empty polygon or mask, skipped")
            continue
        image.annotations.append(ann)
    usable = []
    for image, problem in zip(images.values(), _check_image_files(list(images.values()))):
        if problem:
            warnings.append(f"image {image.id} ({image.path}): {problem}, skipped")
        else:
            usable.append(image)
    if not usable:
        raise DataError(f"COCO json {json_path}: none of its {len(images)} images can be used"
                        + (f" ({warnings[-1]})" if warnings else ""))
    return CocoData(json_path, images_dir, categories, usable, list(images), warnings)


def _load_json(json_path):
    """The json's content, with its three lists and each entry's required keys."""
    if not os.path.isfile(json_path):
        raise MissingFileError(f"COCO json not found: {json_path}")
    try:
        with open(json_path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"COCO json {json_path} is not a readable json file ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise DataError(f"COCO json {json_path} holds a {type(data).__name__}, expected an object with images, "
                        f"annotations and categories")
    for section, keys in KEYS.items():
        if not isinstance(data.get(section), list):
            raise DataError(f"COCO json {json_path}: " + (f"'{section}' is a {type(data[section]).__name__}, expected "
                                                          f"a list" if section in data else f"no '{section}' list")
                            + " (an instance-segmentation json has images, annotations and categories)")
        for k, entry in enumerate(data[section]):
            missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
            if missing:
                what = f"id {entry['id']}" if isinstance(entry, dict) and "id" in entry else f"number {k}"
                entry_name = dict(images="image", annotations="annotation", categories="category")[section]
                raise DataError(f"COCO json {json_path}: {entry_name} {what} has no {', '.join(missing)} "
                                f"(expected keys {', '.join(keys)})")
    return data


def _categories(entries, path):
    """[(id, name)] sorted by id: label k is entry k - 1."""
    seen, names = {}, set()
    for cat in entries:
        if not is_int(cat["id"]) or not isinstance(cat["name"], str) or not cat["name"]:
            raise DataError(f"COCO json {path}: category {cat['id']!r} needs an integer id and a name, got "
                            f"{cat['name']!r}")
        if cat["id"] in seen:
            raise DataError(f"COCO json {path}: category id {cat['id']} is listed twice")
        if cat["name"] in names:
            raise DataError(f"COCO json {path}: two categories are named {cat['name']!r} (ids {cat['id']} and "
                            f"{[k for k, v in seen.items() if v == cat['name']][0]})")
        seen[cat["id"]] = cat["name"]
        names.add(cat["name"])
    if not seen:
        raise DataError(f"COCO json {path}: 'categories' is empty; at least one class is needed")
    return sorted(seen.items())


def _images(entries, path, images_dir):
    """{image id: CocoImage} in the json's order; each file must exist."""
    images = {}
    for entry in entries:
        image_id, height, width = entry["id"], entry["height"], entry["width"]
        if not is_int(image_id):
            raise DataError(f"COCO json {path}: image id {image_id!r} is not an integer")
        if image_id in images:
            raise DataError(f"COCO json {path}: image id {image_id} is listed twice")
        if not (is_int(height) and is_int(width) and height > 0 and width > 0):
            raise DataError(f"COCO json {path}: image {image_id} has height {height!r} and width {width!r}, expected "
                            f"positive integers")
        if not isinstance(entry["file_name"], str) or not entry["file_name"]:
            raise DataError(f"COCO json {path}: image {image_id} has file_name {entry['file_name']!r}")
        file = os.path.join(images_dir, entry["file_name"])
        if not os.path.exists(file):
            raise DataError(f"COCO json {path}: image {image_id}: file {file} not found (is {images_dir} the folder "
                            f"its file_names are relative to?)")
        images[image_id] = CocoImage(image_id, file, (height, width), True, [])
    if not images:
        raise DataError(f"COCO json {path}: 'images' is empty")
    return images


def _annotations(entries, path, images, categories):
    """The annotations, checked for unique ids, known image and category, iscrowd and bbox; in the json's order."""
    seen = set()
    for ann in entries:
        ann_id = ann["id"]
        if not is_int(ann_id) or ann_id < 1:
            # COCOeval marks a matched detection by storing the ground truth's id: 0 would read as unmatched
            raise DataError(f"COCO json {path}: annotation id {ann_id!r} is not an integer >= 1")
        if ann_id in seen:
            raise DataError(f"COCO json {path}: annotation id {ann_id} is listed twice")
        seen.add(ann_id)
        if ann["image_id"] not in images:
            raise DataError(f"COCO json {path}: annotation {ann_id} refers to image {ann['image_id']!r}, which "
                            f"'images' does not list")
        if ann["category_id"] not in categories:
            raise DataError(f"COCO json {path}: annotation {ann_id} refers to category {ann['category_id']!r}, which "
                            f"'categories' does not list (ids {sorted(categories)})")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise DataError(f"COCO json {path}: annotation {ann_id} has iscrowd {ann['iscrowd']!r}, expected 0 or 1")
        if "bbox" in ann:
            height, width = images[ann["image_id"]].size
            problem = check_bbox(ann["bbox"], height, width)
            if problem:
                raise DataError(f"COCO json {path}: annotation {ann_id} (image {ann['image_id']}): {problem}")
        yield ann


def check_bbox(bbox, height, width):
    """None if bbox is [x, y, w, h] of finite numbers, w, h >= 0, overlapping the height x width image, else why."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                              for v in bbox)):
        return f"bbox {bbox!r} is not 4 numbers [x, y, w, h]"
    box = np.asarray(bbox, dtype=np.float64)
    if not np.isfinite(box).all() or (box[2:] < 0).any():
        return f"bbox {bbox!r} is not finite with w, h >= 0"
    if box[0] >= width or box[1] >= height or box[0] + box[2] <= 0 or box[1] + box[3] <= 0:
        if box[2] > 0 and box[3] > 0:
            return f"bbox {bbox!r} lies outside the {height}x{width} image"
    return None


def check_segmentation(seg, size):
    """None if seg is a valid polygon list or RLE for an image of size (H, W), else what is wrong."""
    height, width = size
    if isinstance(seg, list):
        if seg and all(isinstance(v, (int, float)) for v in seg):
            return "segmentation is one flat list of numbers; COCO polygons are a list of lists [[x1, y1, x2, ...]]"
        for poly in seg:
            try:
                coords = np.asarray(poly, dtype=np.float64)
            except (TypeError, ValueError):
                return f"a polygon is not a list of numbers: {str(poly)[:80]}"
            if coords.ndim != 1:
                return f"a polygon is not a flat list x1, y1, x2, y2, ...: {str(poly)[:80]}"
            if len(coords) == 0:
                continue  # an empty polygon: the object may have others; an object of none is skipped
            if len(coords) % 2:
                return f"a polygon has an odd number of coordinates ({len(coords)})"
            if len(coords) < 6:
                return f"a polygon has {len(coords) // 2} points, fewer than 3"
            if not np.isfinite(coords).all():
                return "a polygon has a coordinate that is not finite"
            xs, ys = coords[0::2], coords[1::2]
            if xs.max() <= 0 or xs.min() >= width or ys.max() <= 0 or ys.min() >= height:
                return (f"a polygon lies outside the {height}x{width} image (x {xs.min():g}..{xs.max():g}, "
                        f"y {ys.min():g}..{ys.max():g})")
        return None
    if isinstance(seg, dict) and "size" in seg and "counts" in seg:
        if seg["size"] != [height, width]:
            return f"its RLE has size {seg['size']!r}, but the image is {height}x{width}"
        counts = seg["counts"]
        if isinstance(counts, str):
            counts = rle_string_counts(counts)
            if counts is None:
                return "its compressed RLE counts string is not one pycocotools writes"
        elif not isinstance(counts, list):
            return f"its RLE counts are a {type(counts).__name__}, expected a list or a string"
        if not all(is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
            return f"its RLE counts are not non-negative integers summing to {height}x{width} pixels"
        return None
    return f"segmentation is a {type(seg).__name__}, expected polygons (a list) or an RLE {{size, counts}}"


def rle_string_counts(text):
    """The run lengths of a compressed RLE string (pycocotools' rleFrString: 5-bit groups from '0', a sixth bit
    for "more", runs after the second stored as differences to the run two before), or None if it is not one.
    pycocotools decodes a string whose runs do not cover the image into unset memory, so it is checked here."""
    counts, p = [], 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            if p >= len(text) or not 48 <= ord(text[p]) < 112:
                return None
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << 5 * k
            more, p, k = bool(c & 0x20), p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << 5 * k
        counts.append(x + (counts[-2] if len(counts) > 2 else 0))
    return counts


def _rle(seg, size):
    """The compressed RLE of a checked segmentation (polygons merged into one mask)."""
    height, width = size
    if isinstance(seg, list):
        polygons = [poly for poly in seg if len(poly)]
        if not polygons:
            return mask_util.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
        return mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    if isinstance(seg["counts"], list):
        return mask_util.frPyObjects(seg, height, width)
    return dict(size=list(seg["size"]), counts=seg["counts"].encode("ascii"))


def segmentation_area(seg, size):
    """Pixels of a checked segmentation."""
    return int(mask_util.area(_rle(seg, size)))


def decode(seg, size):
    """uint8 (H, W) {0, 1} mask of a checked segmentation."""
    return mask_util.decode(_rle(seg, size))


def tight_box(mask):
    """(H, W) mask -> [x1, y1, x2, y2] pixel-edge (x2 = last column + 1), as synthetic.py's boxes."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1] if len(rows) else [0, 0, 0, 0]


def _check_image_files(images):
    """Per image None, or why its file cannot be used (unreadable, or of another size than annotated); sets
    image.upright to whether its EXIF rotation gives the annotated size."""
    def check(image):
        try:
            stored, shown = image_size(image.path)
        except PhotoError as err:
            return str(err)
        if max(shown) > MAX_ASPECT * min(shown):
            return f"it is {shown[0]}x{shown[1]}, more elongated than {MAX_ASPECT}:1 (resized to the input height it " \
                   f"would be a sliver or a huge strip)"
        if shown == image.size:
            image.upright = True
        elif stored == image.size:  # annotated as stored: the tool ignored the EXIF rotation
            image.upright = False
        else:
            return f"the file is {shown[0]}x{shown[1]} but the json says {image.size[0]}x{image.size[1]}"
        return None
    with concurrent.futures.ThreadPoolExecutor(HEADER_THREADS) as pool:
        return list(pool.map(check, images))


def object_masks(image, label_of, json_path):
    """The objects (not crowd regions) of a CocoImage: labels int64 (n,), masks uint8 (n, H, W), boxes float32
    (n, 4) x1 y1 x2 y2 (json_box: the json's bbox, or the mask's tight box)."""
    objects = [ann for ann in image.annotations if not ann.get("iscrowd", 0)]
    masks = np.zeros((len(objects), *image.size), np.uint8)
    for k, ann in enumerate(objects):
        masks[k] = decode_annotation(ann, image, json_path)
    boxes = np.array([json_box(ann, image.size, lambda k=k: masks[k]) for k, ann in enumerate(objects)],
                     np.float32).reshape(-1, 4)
    return object_labels(objects, label_of), masks, boxes


def object_boxes(image, label_of, json_path):
    """object_masks' labels and boxes without its masks: only an annotation without a bbox is decoded."""
    objects = [ann for ann in image.annotations if not ann.get("iscrowd", 0)]
    boxes = np.array([json_box(ann, image.size, lambda ann=ann: decode_annotation(ann, image, json_path))
                      for ann in objects], np.float32).reshape(-1, 4)
    return object_labels(objects, label_of), boxes


def decode_annotation(ann, image, json_path):
    try:
        return decode(ann["segmentation"], image.size)
    except ValueError as err:
        raise DataError(f"COCO json {json_path}: annotation {ann['id']} (image {image.id}): its mask cannot be "
                        f"decoded ({err})") from None


def json_box(ann, size, mask):
    """An object's box x1 y1 x2 y2: the json's bbox clipped to the image (size (H, W)), the authors' loader's,
    else the tight box of mask() (the decoded mask)."""
    if "bbox" not in ann:
        return tight_box(mask())
    height, width = size
    x, y, w, h = ann["bbox"]
    return np.clip([x, y, x + w, y + h], 0, [width, height, width, height])


def object_labels(objects, label_of):
    return np.array([label_of[ann["category_id"]] for ann in objects], np.int64)


def pack(records):
    """A list of picklable records as one bytes array and offsets: DataLoader workers then share one buffer
    instead of touching (and so copying) millions of Python objects."""
    blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
    return np.frombuffer(b"".join(blobs), np.uint8), np.cumsum([0] + [len(b) for b in blobs])


def unpack(buffer, offsets, index):
    return pickle.loads(buffer[offsets[index]:offsets[index + 1]].tobytes())


# ----------------------------------------------------------------------------------------------------
# Annotations in memory (ground truth and detections for COCOeval) and writing
# ----------------------------------------------------------------------------------------------------
def coco_object(images, annotations, categories):
    """A pycocotools COCO built in memory (no json file), its chatter swallowed."""
    coco = COCO()
    coco.dataset = dict(images=images, annotations=annotations, categories=categories)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def encode_masks(masks):
    """(n, H, W) binary masks (numpy or tensor, any dtype) -> n COCO RLE dicts and their areas (n,)."""
    masks = np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks)
    masks = (masks > 0.5).astype(np.uint8)  # (n, H, W)
    if len(masks) == 0:
        return [], np.zeros(0)
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))  # pycocotools wants (H, W, n) Fortran
    return rles, mask_util.area(rles)


def gt_annotations(image_id, labels, masks, first_id=1):
    """COCO ground-truth annotations of one image; labels (n,) category ids, masks (n, H, W). Annotation ids start
    at first_id, which must be >= 1: COCOeval marks a detection as matched by storing the gt id, so id 0 would
    count as unmatched."""
    rles, areas = encode_masks(masks)
    return [dict(id=first_id + j, image_id=image_id, category_id=int(label), segmentation=rle, area=float(area),
                 iscrowd=0) for j, (label, rle, area) in enumerate(zip(labels, rles, areas))]


def det_annotations(image_id, scores, labels, masks, first_id=1):
    """COCO detection results of one image; scores (k,), labels (k,) category ids, masks (k, H, W)."""
    rles, areas = encode_masks(masks)
    return [dict(id=first_id + j, image_id=image_id, category_id=int(label), segmentation=rle, area=float(area),
                 score=float(score)) for j, (score, label, rle, area) in enumerate(zip(scores, labels, rles, areas))]


def encode_rle(mask):
    """(H, W) {0, 1} mask -> compressed RLE {size, counts: str} as a json holds it."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=[int(s) for s in rle["size"]], counts=rle["counts"].decode("ascii"))


def write_coco(out_dir, items, class_names, splits, image_format="png", category_ids=None):
    """Write images out_dir/images/NNNNNN.<image_format> and one json per split; returns the json paths.
    items: an iterable of (image uint8 (3, H, W), masks uint8 (n, H, W), labels (n,) in 1..K, boxes (n, 4)
    x1 y1 x2 y2), image i gets id i; splits: {json file name: [image indices]}; category_ids: the id of each
    class (default 1..K). Masks are written as compressed RLE (exact), boxes as [x, y, w, h]."""
    from PIL import Image

    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' (lossless) or 'jpg', got {image_format!r}")
    category_ids = list(category_ids or range(1, len(class_names) + 1))
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    images, annotations = [], []
    for i, (image, masks, labels, boxes) in enumerate(items):
        name = f"{i:06d}.{image_format}"
        picture = Image.fromarray(np.ascontiguousarray(np.asarray(image).transpose(1, 2, 0)))
        options = dict(quality=95) if image_format == "jpg" else dict(compress_level=1)
        picture.save(os.path.join(out_dir, "images", name), **options)
        images.append(dict(id=i, file_name=name, height=int(image.shape[1]), width=int(image.shape[2])))
        for mask, label, (x1, y1, x2, y2) in zip(masks, labels, np.asarray(boxes, np.float64).reshape(-1, 4)):
            annotations.append(dict(id=len(annotations) + 1, image_id=i, category_id=category_ids[int(label) - 1],
                                    segmentation=encode_rle(mask), area=int(mask.sum()),
                                    bbox=[x1, y1, x2 - x1, y2 - y1], iscrowd=0))
    categories = [dict(id=cat_id, name=name) for cat_id, name in zip(category_ids, class_names)]
    paths = []
    for file_name, indices in splits.items():
        chosen = set(int(i) for i in indices)
        content = dict(images=[im for im in images if im["id"] in chosen], categories=categories,
                       annotations=[a for a in annotations if a["image_id"] in chosen])
        paths.append(os.path.join(out_dir, file_name))
        with open(paths[-1], "w") as f:
            json.dump(content, f)
    return paths
