"""Mask arithmetic of post-processing, made fast on the CPU: pairwise intersections (Matrix NMS) and the resize
of the chosen masks to the original frame, each computing only what can be non-zero, and run in float32 even
under torch.autocast. solo_head.py states the rules; this module holds how they are computed quickly.
"""
import bisect
import functools
import math

import numpy as np
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


def original_matrices(size, ori_size, scaled_size=None, device=None):
    """(rows (ori_H, H/4), cols (ori_W, W/4)): masks_to_original's two resizes composed, per axis, for masks of
    size (H/4, W/4)."""
    h4, w4 = size
    crop_h, crop_w = scaled_size or (4 * h4, int(4 * h4 * ori_size[1] / ori_size[0]))
    return (resize_matrix(h4, 4 * h4, crop_h, ori_size[0], device), resize_matrix(w4, 4 * w4, crop_w, ori_size[1],
                                                                                    device))


@full_precision
def masks_to_original(masks, ori_size, scaled_size=None):
    """(k, H/4, W/4) mask probabilities -> (k, ori_H, ori_W) bool, the authors' way: bilinear upsampling
    to the padded input (H, W), crop of the padding to scaled_size (Hs, Ws), the image's size inside the input
    (default the handout's frame: height H, width int(H * ori_W / ori_H)), bilinear resize to ori_size,
    threshold 0.5. Both resizes are linear and separable, so
    they compose into one (ori_H, H/4) matrix on the rows and one (ori_W, W/4) on the columns (the same values
    up to float rounding, with no (k, H, W) intermediate)."""
    masks = masks.float()
    if masks.device.type == "cpu":
        return resize_boxes(mask_boxes(masks, 0.5), lambda j, y0, y1, x0, x1: masks[j, y0:y1, x0:x1],
                            *original_resizes(masks.shape[-2:], ori_size, scaled_size))
    rows, cols = original_matrices(masks.shape[-2:], ori_size, scaled_size, masks.device)
    return (rows @ masks @ cols.T) > 0.5  # one batched product: on a GPU, launches cost more than arithmetic


def resize_boxes(boxes, window, row_resize, col_resize):
    """masks_to_original on the CPU, for masks given by boxes (k, 4) holding every pixel above 0.5 (inclusive
    top, bottom, left, right in the (H/4, W/4) frame), a function window(j, y0, y1, x0, x1) -> mask j's
    probabilities there, and the resizes of the rows and of the columns (original_resizes). Every output pixel
    is a convex combination (weights >= 0, summing to 1) of the source pixels it reads, so only one reading a
    source pixel above 0.5 can pass the threshold. Each mask is resized
    over its box, with the margin of source pixels that the outputs there also read; the rest stays 0: the same
    values for a fraction of the multiply-adds of an object-sized mask. The output comes from numpy's zeros, whose
    memory the OS hands over already cleared."""
    rows, cols = row_resize.matrix, col_resize.matrix  # (ori_H, H/4), (ori_W, W/4)
    out = torch.from_numpy(np.zeros((len(boxes), len(rows), len(cols)), dtype=bool))  # (k, ori_H, ori_W)
    for j, (top, bottom, left, right) in enumerate(boxes.tolist()):
        (oy0, oy1), (ox0, ox1) = row_resize.outputs(top, bottom), col_resize.outputs(left, right)
        if oy0 >= oy1 or ox0 >= ox1:  # no pixel above 0.5
            continue
        (y0, y1), (x0, x1) = row_resize.sources(oy0, oy1), col_resize.sources(ox0, ox1)
        out[j, oy0:oy1, ox0:ox1] = rows[oy0:oy1, y0:y1] @ window(j, y0, y1, x0, x1) @ cols[ox0:ox1, x0:x1].T > 0.5
    return out


# ----------------------------------------------------------------------------------------------------
# The candidates' masks as post-processing reads them: maskness sums, pairwise intersections, probabilities
# ----------------------------------------------------------------------------------------------------
class DenseMasks:
    """Candidates' mask probabilities held as one (k, H, W) tensor (any head, any device). mass and area (k,):
    the sum of the probabilities above thresh and the number of those pixels (the authors' maskness)."""

    def __init__(self, probs, thresh):
        self.probs, self.thresh = probs, thresh
        self.hard = F.threshold(probs, thresh, 0)  # (k, H, W): the probabilities above thresh, else 0
        self.mass = self.hard.sum((1, 2))  # (k,)
        self.area = self.hard.sign_().sum((1, 2))  # (k,); hard now holds the 0/1 masks

    def add(self, probs):
        """More candidates' probabilities (k', H, W), held after the others (ids k..k+k'-1)."""
        more = DenseMasks(probs, self.thresh)
        self.probs, self.hard, self.mass, self.area = (torch.cat([mine, theirs]) for mine, theirs in zip(
            (self.probs, self.hard, self.mass, self.area), (more.probs, more.hard, more.mass, more.area)))

    def intersections(self, idx, labels=None):
        """Pairwise intersections (n, n) of the binary masks of the candidates idx (n,) (mask_intersections)."""
        return mask_intersections(self.hard[idx], labels)

    def probabilities(self, idx):
        """(m, H, W) probabilities of the candidates idx (m,)."""
        return self.probs[idx]

    def to_original(self, idx, ori_size, scaled_size=None):
        """masks_to_original of the candidates idx (m,): (m, ori_H, ori_W) bool."""
        return masks_to_original(self.probs[idx], ori_size, scaled_size)


def linear_matrix(size_in, size_out, device=None):
    """(size_out, size_in) matrix of F.interpolate's 1-D bilinear resize (align_corners=False), read off by resizing
    the identity: the weights along each axis of a 2-D bilinear resize between these sizes."""
    eye = torch.eye(size_in, device=device)[None]  # (1, size_in, size_in): row j is source pixel j
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].T


class Resize:
    """A 1-D resize as a matrix (out, in) whose rows read consecutive sources, both ends non-decreasing (a
    bilinear resize's, linear_matrix, or resize_matrix's two): which sources a run of outputs reads, and which
    outputs read a run of sources."""

    def __init__(self, matrix):
        self.matrix = matrix  # (size_out, size_in)
        self.first, self.last = extent(matrix > 0).T.tolist()  # (size_out,) each, both non-decreasing

    def sources(self, o0, o1):
        """[s0, s1): the sources the outputs [o0, o1) (o0 < o1) read."""
        return self.first[o0], self.last[o1 - 1] + 1

    def outputs(self, first, last):
        """[o0, o1): the outputs that read any of the sources first..last (inclusive); o0 >= o1 for none."""
        return bisect.bisect_left(self.last, first), bisect.bisect_right(self.first, last)


class MaskChain:
    """SOLO's way from a level's mask logits (h, w) to probabilities at (H, W), as its cell masks compute it:
    bilinear x2 upsampling, the sigmoid, and a bilinear resize to (H, W) where 2h != H; each resize as a Resize per
    axis, so that any window of the output is computed from the logits it reads."""

    def __init__(self, level_size, size):
        up_size = tuple(2 * n for n in level_size)
        self.up = [Resize(linear_matrix(n, 2 * n)) for n in level_size]  # rows, columns
        self.down = None if up_size == tuple(size) else [Resize(linear_matrix(u, n)) for u, n in zip(up_size, size)]

    def _reads(self, y0, y1, x0, x1):
        """The upsampled window ((p0, p1), (q0, q1)) and the level's ((s0, s1), (t0, t1)) that the output window
        [y0, y1) x [x0, x1) reads."""
        mids = ((y0, y1), (x0, x1)) if self.down is None else [r.sources(*w) for r, w in zip(self.down,
                                                                                             ((y0, y1), (x0, x1)))]
        return mids, [r.sources(*w) for r, w in zip(self.up, mids)]

    def sources(self, y0, y1, x0, x1):
        """((s0, s1), (t0, t1)): the level's rows and columns that the output window reads."""
        return self._reads(y0, y1, x0, x1)[1]

    def outputs(self, top, bottom, left, right):
        """(y0, y1, x0, x1): the output window whose pixels read any of the level's logits in the box top..bottom,
        left..right (inclusive); y0 >= y1 or x0 >= x1 for none."""
        window = [resize.outputs(*ends) for resize, ends in zip(self.up, ((top, bottom), (left, right)))]
        if self.down is not None and all(o0 < o1 for o0, o1 in window):
            window = [resize.outputs(o0, o1 - 1) for resize, (o0, o1) in zip(self.down, window)]
        return (*window[0], *window[1])

    def window(self, logits, which, y0, y1, x0, x1):
        """(m, y1 - y0, x1 - x0) float32 probabilities over that output window of the masks `which` (m,), or a
        slice, of the level's logits (k_l, h, w); only the logits the window reads are gathered."""
        ((p0, p1), (q0, q1)), ((s0, s1), (t0, t1)) = self._reads(y0, y1, x0, x1)
        rows, cols = self.up[0].matrix[p0:p1, s0:s1], self.up[1].matrix[q0:q1, t0:t1]
        # the columns first: a (m, s, t) @ (t, q) product is one matrix product over all m masks
        probs = (rows @ (logits[which, s0:s1, t0:t1].float() @ cols.T)).sigmoid_()  # (m, p1 - p0, q1 - q0)
        if self.down is None:
            return probs
        return self.down[0].matrix[y0:y1, p0:p1] @ (probs @ self.down[1].matrix[x0:x1, q0:q1].T)


@functools.lru_cache(maxsize=32)
def mask_chain(level_size, size):
    """MaskChain(level_size, size), built once per pair of sizes: its matrices are only read (and made outside
    inference mode, so that any caller may use them)."""
    with torch.inference_mode(False):
        return MaskChain(level_size, size)


def original_resizes(size, ori_size, scaled_size=None):
    """(Resize of the rows, Resize of the columns) of original_matrices on the CPU, built once per set of sizes
    (as mask_chain's); sizes as any pairs."""
    return _original_resizes(tuple(size), tuple(ori_size), scaled_size and tuple(scaled_size))


@functools.lru_cache(maxsize=32)
def _original_resizes(size, ori_size, scaled_size):
    with torch.inference_mode(False):
        return tuple(Resize(matrix) for matrix in original_matrices(size, ori_size, scaled_size))


class TiledMasks:
    """SOLO's candidate masks on the CPU: the probabilities of its dense cell masks (MaskChain), computed and held
    only where they can exceed thresh. A probability above thresh needs an upsampled logit above logit(thresh),
    and every upsampled or resized value is a convex combination of the values it reads, so it needs a logit
    above logit(thresh) among them: each mask is computed only in the tiles of a `tile`-pixel grid whose
    sources its box of such logits reaches (an object is a few tiles of the image). mass, area (k,) as
    DenseMasks'. levels: [(ids (k_l,), logits (k_l, h, w), any float dtype)], the ids of all levels 0..k-1;
    size (H, W); float32 arithmetic throughout. add() takes more candidates into the same tiles."""
    MARGIN = 1e-3  # the box test takes logits above logit(thresh) - MARGIN: float rounding never loses a pixel

    def __init__(self, levels, size, thresh, tile=64):
        self.size, self.thresh, self.tile = tuple(size), thresh, tile
        self.count, self.levels, self.boxes, self.tiles = 0, [], [], None
        self.mass, self.area = torch.zeros(0), torch.zeros(0)
        self.add(levels)

    @full_precision
    def add(self, levels):
        """More candidates, levels as the constructor's with ids 0..k'-1, held after the others (ids k..k+k'-1)."""
        size, tile = self.size, self.tile
        levels = [(ids + self.count, logits, mask_chain(tuple(logits.shape[-2:]), size)) for ids, logits in levels]
        added = sum(len(ids) for ids, _, _ in levels)
        tiles = self.tiles or [(y, min(y + tile, size[0]), x, min(x + tile, size[1]))
                               for y in range(0, size[0], tile) for x in range(0, size[1], tile)]
        bound = math.log(self.thresh / (1 - self.thresh)) - self.MARGIN
        # per level, each mask's box (k_l, 4) of logits above bound: what it can reach in the frame
        boxes = [mask_boxes(logits, bound) for _, logits, _ in levels]
        reach = [self._reach(level_boxes, chain, tiles) for level_boxes, (_, _, chain) in zip(boxes, levels)]
        if self.tiles is None and sum(len(r) for level in reach for r in level) > TILED_SHARE * added * len(tiles):
            # most masks in most tiles (a random model's noise): one tile, the whole frame, and no box test
            tiles = [(0, size[0], 0, size[1])]
            reach = [[torch.arange(len(ids))] for ids, _, _ in levels]
        if self.tiles is None:  # per tile: (ids (m,), 0/1 masks (m, th, tw)) of each level reaching it
            self.tiles, self.pieces = tiles, [[] for _ in tiles]
        self.levels, self.boxes, self.count = self.levels + levels, self.boxes + boxes, self.count + added
        self.mass, self.area = torch.cat([self.mass, torch.zeros(added)]), torch.cat([self.area, torch.zeros(added)])
        for (ids, logits, chain), level_reach in zip(levels, reach):
            for pieces, window, which in zip(self.pieces, self.tiles, level_reach):
                if len(which):
                    hard = F.threshold_(chain.window(logits, which, *window), self.thresh, 0)  # (m, th, tw), in place
                    self.mass.index_add_(0, ids[which], hard.sum((1, 2)))
                    self.area.index_add_(0, ids[which], hard.sign_().sum((1, 2)))
                    pieces.append((ids[which], hard))

    @full_precision
    def to_original(self, idx, ori_size, scaled_size=None):
        """masks_to_original of the candidates idx (m,): (m, ori_H, ori_W) bool, each mask's probabilities
        computed only over the window that its box of logits above logit(0.5) reaches (every pixel above 0.5 is
        in it), where thresh is 0.5 (the authors' ins_thresh; at another every probability is computed)."""
        if self.thresh != 0.5:
            return masks_to_original(self.probabilities(idx), ori_size, scaled_size)
        owner = {}  # candidate -> (its level's logits, its index there, the level's chain, its box of logits)
        for (ids, logits, chain), boxes in zip(self.levels, self.boxes):
            owner.update((c, (logits, i, chain, box)) for i, (c, box) in enumerate(zip(ids.tolist(),
                                                                                      boxes.tolist())))
        chosen = [owner[c] for c in idx.tolist()]
        windows = torch.tensor([chain.outputs(*box) for _, _, chain, box in chosen]).view(-1, 4)  # (m, 4)
        boxes = windows - torch.tensor([0, 1, 0, 1])  # inclusive top, bottom, left, right in the (H, W) frame

        def window(j, y0, y1, x0, x1):
            logits, i, chain, _ = chosen[j]
            return chain.window(logits, slice(i, i + 1), y0, y1, x0, x1)[0]  # a view: no gather
        return resize_boxes(boxes, window, *original_resizes(self.size, ori_size, scaled_size))

    @staticmethod
    def _reach(boxes, chain, tiles):
        """Per tile, the masks (m,) of a level whose box of logits (k_l, 4) reaches the logits it reads."""
        top, bottom, left, right = boxes.T  # (k_l,) each, at the level's resolution
        out = []
        for window in tiles:
            (s0, s1), (t0, t1) = chain.sources(*window)
            out.append(((top < s1) & (bottom >= s0) & (left < t1) & (right >= t0)).nonzero()[:, 0])
        return out

    def _positions(self, idx):
        """(k,) each candidate's position in idx, -1 for the others."""
        position = torch.full((self.count,), -1, dtype=torch.long)
        position[idx] = torch.arange(len(idx))
        return position

    @full_precision
    def intersections(self, idx, labels=None):
        """Pairwise intersections (n, n) of the binary masks of the candidates idx (n,), tile by tile over the
        masks there (all pairs: Matrix NMS ignores those of two labels)."""
        position, inter = self._positions(idx), torch.zeros(len(idx), len(idx))
        for pieces in self.pieces:
            if pieces:
                where = position[torch.cat([ids for ids, _ in pieces])]  # (m,)
                chosen = (where >= 0).nonzero()[:, 0]
                flat = torch.cat([hard for _, hard in pieces])[chosen].flatten(1)  # (m', th * tw)
                inter[where[chosen, None], where[chosen]] += flat @ flat.T
        return inter

    @full_precision
    def probabilities(self, idx):
        """(m, H, W) probabilities of the candidates idx (m,), over the whole frame."""
        position, out = self._positions(idx), torch.empty(len(idx), *self.size)
        for ids, logits, chain in self.levels:
            where = position[ids]
            chosen = (where >= 0).nonzero()[:, 0]
            if len(chosen):
                out[where[chosen]] = chain.window(logits, chosen, 0, self.size[0], 0, self.size[1])
        return out
