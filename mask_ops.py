"""Mask arithmetic of post-processing, made fast on the CPU: pairwise intersections (Matrix NMS) and the resize
of the chosen masks to the original frame, each computing only what can be non-zero, and run in float32 even
under torch.autocast. solo_head.py states the rules; this module holds how they are computed quickly.
"""
import bisect
import functools

import torch
import torch.nn.functional as F

# mask_intersections on the CPU goes tile by tile while the tiles' products need at most this share of one
# product's multiply-adds (gathering the tiles costs about the rest)
TILED_SHARE = 0.5

def full_precision(fn):
    """fn with autocast off on every device: its products are pixel counts and 0.5 thresholds, which bfloat16
    (8 bits of mantissa) would round, when inference runs under torch.autocast."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return wrapper



def extent(on):
    """on (k, n) bool -> (k, 2) first and last True index of each row; (n, -1) for a row without any."""
    n = on.shape[1]
    first = torch.where(on.any(1), on.int().argmax(1), n)
    return torch.stack([first, n - 1 - on.flip(1).int().argmax(1) - n * ~on.any(1)], 1)


def mask_boxes(masks, thresh=0.0):
    """(k, H, W) -> (k, 4) top, bottom, left, right (inclusive) of each mask's pixels above thresh; bottom < top
    and right < left for a mask without any."""
    return torch.cat([extent(masks.amax(2) > thresh), extent(masks.amax(1) > thresh)], 1)


@full_precision
def mask_intersections(masks, labels=None, tiles=8):
    """Pixel counts of the pairwise intersections of binary masks (n, H, W): (n, n) float32, the diagonal holding
    the areas. Float32 products, exact for 0/1 inputs while H * W < 2^24 (TF32 or not: 0 and 1 are exact).
    labels (n,): only the pairs of one label are needed (class-wise Matrix NMS); the others may be left 0.
    On a GPU, where launching kernels costs more than the arithmetic: one product for all. On the CPU, where a
    product costs its multiply-adds, only what can be non-zero: the masks of one label at a time, tile by tile of
    a tiles x tiles grid over the image, each tile's product over the masks whose box reaches it (a pair's
    products over the tiles add up to its product over the image); one product where most masks reach most tiles."""
    n = len(masks)
    if masks.device.type != "cpu":
        flat = masks.flatten(1).float()  # (n, HW)
        return flat @ flat.T
    ys = torch.linspace(0, masks.shape[1], tiles + 1).long()  # tile borders
    xs = torch.linspace(0, masks.shape[2], tiles + 1).long()
    top, bottom, left, right = mask_boxes(masks).T  # (n,) each
    reach = (((top[:, None] < ys[1:]) & (bottom[:, None] >= ys[:-1]))[:, :, None]
             & ((left[:, None] < xs[1:]) & (right[:, None] >= xs[:-1]))[:, None, :])  # (n, T, T)
    ys, xs = ys.tolist(), xs.tolist()
    inter = masks.new_zeros(n, n, dtype=torch.float)
    groups = [torch.arange(n)] if labels is None else [(labels == c).nonzero()[:, 0] for c in labels.unique()]
    for idx in groups:  # (n_c,) the masks of one label
        if (reach[idx].sum(0).float() ** 2).sum() > TILED_SHARE * tiles ** 2 * len(idx) ** 2:  # tiles' share
            flat = (masks if labels is None else masks[idx]).flatten(1).float()  # (n_c, HW), no copy for all
            if labels is None:
                return flat @ flat.T
            inter[idx[:, None], idx] = flat @ flat.T
            continue
        for i in range(tiles):
            for j in range(tiles):
                ids = idx[reach[idx, i, j]]  # (m,) the masks of the label that reach tile (i, j)
                tile = masks[ids, ys[i]:ys[i + 1], xs[j]:xs[j + 1]].flatten(1).float()  # (m, tile pixels)
                inter[ids[:, None], ids] += tile @ tile.T
    return inter


def resize_matrix(size_in, size_up, crop, size_out, device=None):
    """(size_out, size_in) matrix of a 1-D resize: bilinear (align_corners=False) from size_in to size_up, keep
    the first `crop` entries, bilinear to size_out. F.interpolate's own weights, read off by resizing the
    identity, so rows @ x @ cols.T reproduces the two resizes of an image x."""
    eye = torch.eye(size_in, device=device)[None]  # (1, size_in, size_in): row j is source pixel j
    up = F.interpolate(eye, size=size_up, mode="linear", align_corners=False)[:, :, :crop]  # (1, size_in, crop)
    return F.interpolate(up, size=size_out, mode="linear", align_corners=False)[0].T  # (size_out, size_in)


def read_ranges(matrix):
    """For a resize matrix (out, in) whose rows read consecutive sources: a function (first, last) of a source
    range -> (s0, s1, o0, o1), the sources [s0, s1) to read so that the outputs [o0, o1), those reading any of
    first..last, are computed in full (the outputs outside read only sources outside first..last)."""
    lo, hi = extent(matrix > 0).T.tolist()  # (out,) first and last source of each output, both non-decreasing

    def read(first, last):
        o0, o1 = bisect.bisect_left(hi, first), bisect.bisect_right(lo, last)  # outputs reading first..last
        return (lo[o0], hi[o1 - 1] + 1, o0, o1) if o0 < o1 else (0, 0, 0, 0)
    return read


@full_precision
def masks_to_original(masks, ori_size, scaled_size=None):
    """(k, H/4, W/4) mask probabilities -> (k, ori_H, ori_W) in {0, 1}, the authors' way: bilinear upsampling
    to the padded input (H, W), crop of the padding to scaled_size (Hs, Ws), the image's size inside the input
    (default the handout's frame: height H, width int(H * ori_W / ori_H)), bilinear resize to ori_size,
    threshold 0.5. Both resizes are linear and separable, so
    they compose into one (ori_H, H/4) matrix on the rows and one (ori_W, W/4) on the columns (the same values
    up to float rounding, with no (k, H, W) intermediate)."""
    k, h4, w4 = masks.shape
    crop_h, crop_w = scaled_size or (4 * h4, int(4 * h4 * ori_size[1] / ori_size[0]))
    rows = resize_matrix(h4, 4 * h4, crop_h, ori_size[0], masks.device)  # (ori_H, H/4)
    cols = resize_matrix(w4, 4 * w4, crop_w, ori_size[1], masks.device)  # (ori_W, W/4)
    masks = masks.float()
    if masks.device.type != "cpu":  # one batched product: on a GPU, launches cost more than arithmetic
        return ((rows @ masks @ cols.T) > 0.5).float()
    # CPU: every output pixel is a convex combination (weights >= 0, summing to 1) of the source pixels it
    # reads, so only one reading a source pixel above 0.5 can pass the threshold. Each mask is resized over
    # the box of its pixels above 0.5, with the margin of source pixels that the outputs there also read;
    # the rest stays 0: the same values for a fraction of the multiply-adds of an object-sized mask.
    out = masks.new_zeros(k, *ori_size)
    row_reads, col_reads = read_ranges(rows), read_ranges(cols)
    for mask, out_mask, (top, bottom, left, right) in zip(masks, out, mask_boxes(masks, 0.5).tolist()):
        if bottom < top:  # no pixel above 0.5
            continue
        (y0, y1, oy0, oy1), (x0, x1, ox0, ox1) = row_reads(top, bottom), col_reads(left, right)
        out_mask[oy0:oy1, ox0:ox1] = rows[oy0:oy1, y0:y1] @ mask[y0:y1, x0:x1] @ cols[ox0:ox1, x0:x1].T > 0.5
    return out
