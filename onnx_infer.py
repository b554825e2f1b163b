"""Inference with an exported SOLO model (export.py) on onnxruntime and numpy, without PyTorch.

ExportedSOLO(path).infer(image, ori_sizes, cfg) gives what SOLO.infer gives: per image scores (k,), labels (k,) in
1..C-1 and masks (k, ori_H, ori_W) bool. postprocess is SOLOHead.PostProcess in numpy, the same rules in the same
order (candidates above the category threshold, their masks only, maskness, the stride filter, the pre-NMS top-k,
class-wise Matrix NMS, the score floor, the resize to the original frame); resizes are written as the matrices
of PyTorch's bilinear interpolation (align_corners=False), so the two agree up to float rounding.
"""
import json

import numpy as np
import onnxruntime

from errors import DataError, ModelFileError
from imagefiles import INPUT_MAX_SIDE, INPUT_MIN_SIDE

META_KEYS = ("arch", "class_names", "num_grids", "strides", "input_height", "postprocess", "data")  # export.py's
POSTPROCESS_KEYS = ("handout", "map")


def read_metadata(text, path):
    """The dict of an exported model's 'solo' metadata (json text): ModelFileError "PATH: not a model exported by
    export.py (...)" naming what is wrong when it is not json, not a json object, or lacks keys export.py writes."""
    def wrong(what):
        return ModelFileError(f"{path}: not a model exported by export.py ({what})")
    try:
        meta = json.loads(text)
    except ValueError as err:  # json.JSONDecodeError
        raise wrong(f"its 'solo' metadata is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise wrong(f"its 'solo' metadata is a JSON {type(meta).__name__}, not an object")
    missing = [key for key in META_KEYS if key not in meta]
    if isinstance(meta.get("postprocess"), dict):
        missing += [f"postprocess.{key}" for key in POSTPROCESS_KEYS if key not in meta["postprocess"]]
    elif "postprocess" in meta:
        missing += [f"postprocess.{key}" for key in POSTPROCESS_KEYS]
    if missing:
        raise wrong(f"its 'solo' metadata lacks {', '.join(repr(key) for key in missing)}")
    return meta


class ExportedSOLO:
    """An exported model in an onnxruntime session, with the metadata export.py stored in it."""

    def __init__(self, path, threads=0):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (the physical cores)
        try:
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...)
            raise ModelFileError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "solo" not in meta:
            raise ModelFileError(f"{path} is not a model written by export.py (no 'solo' metadata)")
        self.meta = read_metadata(meta["solo"], path)
        self.names = [o.name for o in self.session.get_outputs()]

    def forward(self, image):
        """image float32 (batch, 3, H, W) -> {output name: array}. The graph would run on other sizes too and
        post-processing would then misplace the masks, so the input is checked against export.py's contract."""
        image = np.ascontiguousarray(image, np.float32)
        if image.ndim != 4 or image.shape[0] < 1 or image.shape[1] != 3 or any(
                s % 32 or not INPUT_MIN_SIDE <= s <= INPUT_MAX_SIDE for s in image.shape[2:]):
            raise DataError(f"the exported model takes (batch >= 1, 3, H, W) with H and W multiples of 32 from "
                             f"{INPUT_MIN_SIDE} to {INPUT_MAX_SIDE} (imagefiles.photo_input makes it), got "
                             f"{image.shape}")
        return dict(zip(self.names, self.session.run(None, {"image": image})))

    def infer(self, image, ori_size, cfg=None, scaled_size=None):
        outputs = self.forward(image)
        return postprocess(outputs, self.meta, ori_size, cfg or self.meta["postprocess"]["handout"], scaled_size)


# ----------------------------------------------------------------------------------------------------
# Resizes as matrices, sigmoid, Matrix NMS
# ----------------------------------------------------------------------------------------------------
def linear_matrix(size_in, size_out):
    """(size_out, size_in) float32 matrix of F.interpolate's 1-D linear resize with align_corners=False: output i
    reads source position max((i + 0.5) * size_in / size_out - 0.5, 0) between its two nearest pixels."""
    src = np.maximum((np.arange(size_out, dtype=np.float32) + 0.5) * np.float32(size_in / size_out) - 0.5, 0)
    low = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = (src - low).astype(np.float32)
    matrix = np.zeros((size_out, size_in), np.float32)
    np.add.at(matrix, (np.arange(size_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return matrix


def resize(maps, size):
    """Bilinear resize of (k, h, w) maps to size (H, W)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    rows, cols = linear_matrix(maps.shape[-2], size[0]), linear_matrix(maps.shape[-1], size[1])
    return rows @ maps @ cols.T


def sigmoid(x):
    with np.errstate(over="ignore"):  # exp(-x) of a very negative logit is inf: the sigmoid is then 0
        return 1 / (1 + np.exp(-x))


def matrix_nms(masks, scores, labels=None, method="gauss", gauss_sigma=2.0):
    """SOLOHead.MatrixNMS: masks (n, H, W) {0, 1} float32 in descending score order, scores (n,), labels (n,) or
    None (class-agnostic). Returns the decayed scores (n,)."""
    if method not in ("gauss", "linear"):
        raise ValueError(f"MatrixNMS method must be 'gauss' or 'linear', got {method!r}")
    n = len(scores)
    if n == 0:
        return scores
    flat = masks.reshape(n, -1)
    if labels is None:
        inter = flat @ flat.T  # (n, n) pixel counts, exact in float32 below 2^24 pixels
    else:  # only the pairs of one class count: one product per class, the other pairs stay 0
        inter = np.zeros((n, n), np.float32)
        for label in np.unique(labels):
            idx = np.flatnonzero(labels == label)
            inter[np.ix_(idx, idx)] = flat[idx] @ flat[idx].T
    areas = np.broadcast_to(np.diag(inter), (n, n))  # areas[i, j] = area_j
    iou = np.triu(inter / np.maximum(areas + areas.T - inter, 1), 1)  # iou[i, j], i scored above j
    if labels is not None:
        iou = iou * (labels[:, None] == labels[None, :])
    iou_cmax = iou.max(0)[:, None]  # (n, 1): how much mask i is itself suppressed
    if method == "gauss":
        decay = np.exp(-gauss_sigma * (iou ** 2 - iou_cmax ** 2))
    else:
        decay = (1 - iou) / np.maximum(1 - iou_cmax, 1e-6)
    return scores * decay.min(0)


# ----------------------------------------------------------------------------------------------------
# Each head's candidate masks
# ----------------------------------------------------------------------------------------------------
def cells_by_level(cell, num_grids):
    """Ascending cell indices over the levels' concatenated S^2 cells -> [(level, its local cells)]."""
    out, start = [], 0
    for level, num_grid in enumerate(num_grids):
        local = cell[(cell >= start) & (cell < start + num_grid ** 2)] - start
        start += num_grid ** 2
        if len(local):
            out.append((level, local))
    return out


def cell_masks(outputs, b, cell, meta):
    """Mask probabilities (k, H/4, W/4) float32 of the cells `cell` of image b, as each head's cell_masks."""
    arch, grids = meta["arch"], meta["num_grids"]
    if arch == "solov2":
        feat = outputs["mask_feat"][b]  # (E, H/4, W/4)
        kernels = np.concatenate([outputs[f"kernel_{l}"][b].reshape(feat.shape[0], -1) for l in range(len(grids))],
                                 1)[:, cell]  # (E, k)
        return sigmoid(kernels.T @ feat.reshape(feat.shape[0], -1)).reshape(-1, *feat.shape[-2:]).astype(np.float32)
    first = outputs["mask_feat_0" if arch == "solo" else "mask_xy_0"][b]
    mask_size = tuple(2 * s for s in first.shape[-2:]) if arch == "solo" else first.shape[-2:]
    masks = []
    for level, local in cells_by_level(cell, grids):
        if arch == "solo":  # the chosen channels of the 1x1 conv, x2 upsampling, sigmoid, resize to H/4
            feat = outputs[f"mask_feat_{level}"][b]  # (c, H_l, W_l)
            logits = outputs[f"mask_weight_{level}"][local] @ feat.reshape(feat.shape[0], -1)
            logits = (logits + outputs[f"mask_bias_{level}"][local, None]).reshape(-1, *feat.shape[-2:])
            masks.append(resize(sigmoid(resize(logits, tuple(2 * s for s in feat.shape[-2:]))), mask_size))
        else:  # decoupled: the maps resized to H/4, then sigmoid(X_j) * sigmoid(Y_i)
            maps, num_grid = resize(outputs[f"mask_xy_{level}"][b], mask_size), grids[level]
            masks.append(maps[local % num_grid] * maps[num_grid + local // num_grid])
    return np.concatenate(masks).astype(np.float32) if masks else np.zeros((0, *mask_size), np.float32)


def masks_to_original(masks, ori_size, scaled_size=None):
    """(k, H/4, W/4) probabilities -> (k, ori_H, ori_W) bool, as mask_ops.masks_to_original: upsampling to the
    padded input, the crop of the padding to scaled_size (default the handout's frame), the resize to ori_size,
    threshold 0.5, composed into one matrix per axis. Each mask is resized only over the output rows and columns
    that read one of its pixels above 0.5 (no other output can pass the threshold: each is a convex combination of
    the pixels it reads)."""
    k, h4, w4 = masks.shape
    crop_h, crop_w = scaled_size or (4 * h4, int(4 * h4 * ori_size[1] / ori_size[0]))
    rows = linear_matrix(crop_h, ori_size[0]) @ linear_matrix(h4, 4 * h4)[:crop_h]  # (ori_H, H/4)
    cols = linear_matrix(crop_w, ori_size[1]) @ linear_matrix(w4, 4 * w4)[:crop_w]  # (ori_W, W/4)
    out = np.zeros((k, *ori_size), bool)
    for mask, out_mask in zip(masks, out):
        on = mask > 0.5
        if not on.any():
            continue
        ys, xs = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
        r = np.flatnonzero((rows[:, ys[0]:ys[-1] + 1] > 0).any(1))  # output rows reading the mask's rows
        c = np.flatnonzero((cols[:, xs[0]:xs[-1] + 1] > 0).any(1))
        if len(r) and len(c):
            r0, r1, c0, c1 = r[0], r[-1] + 1, c[0], c[-1] + 1
            out_mask[r0:r1, c0:c1] = rows[r0:r1] @ mask @ cols[c0:c1].T > 0.5
    return out


# ----------------------------------------------------------------------------------------------------
# Post-processing
# ----------------------------------------------------------------------------------------------------
def postprocess(outputs, meta, ori_size, cfg, scaled_size=None):
    """SOLOHead.PostProcess on an exported model's outputs: ori_size (H, W) for every image or one per image, and
    scaled_size likewise (None: the handout's frame).
    Returns per image scores (k,) float32, labels (k,) int64 in 1..C-1, masks (k, ori_H, ori_W) bool."""
    grids, strides = meta["num_grids"], meta["strides"]
    bz = outputs["cate_0"].shape[0]
    cate = np.concatenate([outputs[f"cate_{l}"].reshape(bz, -1, outputs["cate_0"].shape[-1])
                           for l in range(len(grids))], 1)  # (bz, sum S^2, C-1)
    cell_stride = np.concatenate([np.full(s * s, st, np.float32) for s, st in zip(grids, strides)])  # (sum S^2,)
    sizes = [tuple(s) for s in ori_size] if np.ndim(ori_size) == 2 else [tuple(ori_size)] * bz
    if len(sizes) != bz:
        raise ValueError(f"postprocess: {len(sizes)} image sizes for a batch of {bz} images")
    scaled = [tuple(s) for s in scaled_size] if np.ndim(scaled_size) == 2 else [scaled_size] * bz
    results = ([], [], [])
    for b, (size, frame) in enumerate(zip(sizes, scaled)):
        for out, part in zip(results, postprocess_image(outputs, b, cate[b], cell_stride, meta, size, frame, cfg)):
            out.append(part)
    return results


def postprocess_image(outputs, b, cate, cell_stride, meta, ori_size, scaled_size, cfg):
    """One image (SOLOHead.PostProcessImg)."""
    cell, cls = np.nonzero(cate > cfg["cate_thresh"])  # (k,), (k,): cells ascending
    masks = cell_masks(outputs, b, cell, meta)  # (k, H/4, W/4)
    hard = np.where(masks > cfg["ins_thresh"], masks, np.float32(0))
    mass = hard.sum((1, 2))
    hard = (hard > 0).astype(np.float32)
    area = hard.sum((1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):  # empty masks: dropped by the stride filter next
        scores = (cate[cell, cls] * mass / area).astype(np.float32)
    idx = np.flatnonzero(area > cell_stride[cell])
    # stable sorts: equal scores keep the cells' order (PyTorch's argsort does not promise any order for them)
    idx = idx[np.argsort(-scores[idx], kind="stable")[:cfg["pre_NMS_num"]]]
    labels = cls[idx].astype(np.int64) + 1
    decayed = matrix_nms(hard[idx], scores[idx], labels if cfg["class_wise"] else None, cfg["nms_kernel"],
                         cfg["nms_sigma"]).astype(np.float32)
    keep = np.flatnonzero(decayed >= cfg["update_thresh"])
    keep = keep[np.argsort(-decayed[keep], kind="stable")[:cfg["keep_instance"]]]
    masks = masks_to_original(masks[idx[keep]], ori_size, scaled_size and tuple(scaled_size))
    visible = masks.any((1, 2))  # a mask wholly in the padding is no detection
    return decayed[keep][visible], labels[keep][visible], masks[visible]
