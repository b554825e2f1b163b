"""Synthetic stand-in for the CIS680 instance-segmentation data, in the exact real-data file format.

Writes the four files that `dataset.BuildDataset` reads (names and layout in datafiles.py):
  images h5  key "data", uint8 (N, 3, H, W) RGB                 gzip, one chunk per image
  masks h5   key "data", uint8 (total_objects, H, W) in {0, 1}  gzip, one chunk per mask, image order
  labels npy object array (N,), entry i int64 (n_i,): 1 vehicle, 2 person, 3 animal
  bboxes npy object array (N,), entry i float32 (n_i, 4): x1 y1 x2 y2 in pixel-edge coordinates
             (pixel column c spans [c, c + 1), so x2 = last mask column + 1): the tight box of the mask.

Scenes: a greyish textured background (smooth colour gradient, low-frequency blobs, mild noise) with 1 to
`max_objects` objects whose classes differ in shape (and, with palette 'class' only, in colour):
  vehicle  wide rounded body + cabin with a pale window + two dark wheels
  person   tall: round head, elliptic torso with arms, two darker legs
  animal   horizontal elliptic body, neck, head, four legs and a tail, with stripes
Colours (`palette`, --palette):
  shared   (the default) every object's colour from one palette, whatever its class: any hue, saturation 0.45-0.9,
           value 0.45-0.95; its parts (window, wheels, head, legs, stripes, roof, door, highlight, string) paler or
           darker shades of that hue, balanced so that neither an object's colours nor its mean colour tell its
           class: the classes are told apart by shape only.
  class    each class its own hues (vehicles blue, people red/orange with skin-coloured heads, animals green/brown
           with darker stripes, houses pale yellow under a dark red roof, balloons purple on a grey string): the look
           of the versions before the shared palette, image for image; for figures where classes should look distinct.
Either palette draws the same random numbers, so a seed gives the same objects, masks and boxes in both.
The object size sqrt(w * h) is log-uniform in [min_size, max_size] pixels of the H x W frame (14..240 at
300x400 is ~37..640 px at the 800-pixel network input, i.e. every FPN scale range of the SOLO head).
Objects are painted in order, a later one occluding earlier ones; each mask is the VISIBLE part. An object
with less than 40% of its area or fewer than 30 pixels visible is removed from the scene altogether (never
left unlabelled); if that removes every object, the last one painted (never occluded) is kept.

With --classes 5 (COCO format only: the course's labels are 1..3) two more classes join:
  house    square walls with a dark door and window under a triangular roof
  balloon  tall ellipse with a pale highlight on a thin dark string

Deterministic for a seed (numpy Generator); vectorised numpy drawing.

Usage (CPU only, a few seconds):
  python synthetic.py --out data/synthetic --num-images 400 --seed 0
  python synthetic.py --palette class --out data/synthetic_class   # each class in its own hues (figures)
  python synthetic.py --format coco --classes 5 --out data/synthetic_coco   # images/*.jpg, train.json, val.json
"""
import argparse
import colorsys
import contextlib
import errno
import functools
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time
import traceback
import uuid

import numpy as np

from atomic_files import fsync_dir, os_errno, write_error
from cocofiles import write_coco
from datafiles import CLASS_NAMES, FILE_NAMES, dataset_paths, split_indices, write_dataset
from errors import WriteError

CLASS_NAMES_5 = CLASS_NAMES + ("house", "balloon")  # --classes 5 (COCO format)
ASPECT_RANGE = {1: (1.5, 2.3), 2: (0.35, 0.5), 3: (1.2, 1.7), 4: (0.8, 1.2), 5: (0.55, 0.75)}  # w / h per class
MIN_VISIBLE_FRAC = 0.4  # drop an object with less of its area visible ...
MIN_VISIBLE_PIXELS = 30  # ... or fewer visible pixels than this
NOISE_LEVELS = 4  # pixel noise: uniform integer in [-4, 4] grey levels (of 255)
BACKGROUND_GRID = (11, 14)  # the finest background blobs are ~30 px
PALETTES = ("shared", "class")  # render_image's palette: one for all classes (the default), or each class its own
# palette 'shared': an object's main colour, whatever its class, from SHARED_MAIN's (hue, saturation, value) ranges;
# each of its parts a shade of that hue (+- HUE_JITTER) with the (saturation, value) ranges SHADES[part]. The paler
# and the darker parts of each class even out, so that an object's mean colour does not tell its class either (mean
# R + G + B of a whole object per class: 1.31 to 1.38 of 3; with darker parts only it was 1.03 to 1.38)
SHARED_MAIN = ((0.0, 1.0), (0.45, 0.9), (0.45, 0.95))
HUE_JITTER = 0.02
PALE, DARK = ((0.05, 0.25), (0.75, 0.95)), ((0.3, 0.7), (0.1, 0.3))
SHADES = dict(window=PALE, wheels=DARK, head=PALE, roof=((0.15, 0.4), (0.5, 0.75)), door=DARK, string=DARK,
              highlight=PALE)
TROUSERS = {"shared": (0.55, 0.75), "class": (0.35, 0.55)}  # a person's legs: the shirt's colour times this
STRIPES = {"shared": (0.55, 0.35), "class": (0.55, None)}  # an animal's stripes: darker ones (the fur's colour times
# the first) and, in the shared palette, paler ones between them (the fur's colour this much of the way to white)


# ----------------------------------------------------------------------------------------------------
# Primitive shapes: boolean masks from coordinate grids x (1, w) and y (h, 1), in pixels
# ----------------------------------------------------------------------------------------------------
def _ellipse(x, y, cx, cy, rx, ry):
    rx, ry = max(rx, 0.7), max(ry, 0.7)  # keep thin parts at least ~1 pixel wide
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0  # (h, w)


def _round_rect(x, y, x0, y0, x1, y1, r):
    """Rectangle [x0, x1] x [y0, y1] with corners rounded by radius r (distance field)."""
    r = min(r, (x1 - x0) / 2, (y1 - y0) / 2)
    dx = np.maximum(np.maximum(x0 + r - x, x - (x1 - r)), 0)  # (1, w)
    dy = np.maximum(np.maximum(y0 + r - y, y - (y1 - r)), 0)  # (h, 1)
    return dx ** 2 + dy ** 2 <= r ** 2 + 1e-9  # (h, w)


def _hsv(rng, hue, sat, val):
    """(RGB (3,) float32, its hue in [0, 1)) from (low, high) ranges of hue (wraps around 1), saturation and value."""
    h, s, v = (rng.uniform(*hue) % 1.0, rng.uniform(*sat), rng.uniform(*val))
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32), h


def _colour(rng, palette, own, main_hue=None, shade=None):
    """A colour of an object (RGB (3,) float32) and its hue, drawn as three uniform numbers in either palette, so
    that the palette changes the colours only (a seed gives the same shapes in both).
    palette 'class': from the class's own (hue, saturation, value) ranges `own`.
    palette 'shared': the object's main colour (main_hue None) from SHARED_MAIN whatever the class; a part's colour
    is the SHADES[shade] of the object's main_hue (+- HUE_JITTER)."""
    if palette == "class":
        return _hsv(rng, *own)
    if main_hue is None:
        return _hsv(rng, *SHARED_MAIN)
    return _hsv(rng, (main_hue - HUE_JITTER, main_hue + HUE_JITTER), *SHADES[shade])


def check_palette(palette):
    """ValueError unless palette is one of PALETTES."""
    if palette not in PALETTES:
        raise ValueError(f"palette must be one of {', '.join(map(repr, PALETTES))}, got {palette!r}")


def _layer(rgb, mask, colour):
    """Paint `colour` ((3,) or (3, h, w)) into rgb (3, h, w) where mask (h, w)."""
    colour = np.asarray(colour, np.float32)
    if colour.ndim == 1:
        colour = colour[:, None, None]  # (3, 1, 1)
    return np.where(mask[None], colour, rgb)  # (3, h, w)


def _shading(y, h, rgb):
    """Darken towards the bottom of the object a little (a cue of volume, not of class)."""
    return rgb[:, None, None] * (1.1 - 0.3 * np.clip(y / h, 0, 1))[None]  # (3, h, 1)


# ----------------------------------------------------------------------------------------------------
# Class drawers: local coordinates x (1, cw), y (ch, 1) with the object's box at [0, w] x [0, h]
# palette: PALETTES' (each colour from _colour). Each returns (mask (ch, cw) bool, rgb (3, ch, cw) float32).
# ----------------------------------------------------------------------------------------------------
def _draw_vehicle(x, y, w, h, rng, palette):
    body = _round_rect(x, y, 0, 0.35 * h, w, 0.8 * h, 0.15 * h)
    cab_x0, cab_x1 = rng.uniform(0.12, 0.3) * w, rng.uniform(0.65, 0.85) * w
    cabin = _round_rect(x, y, cab_x0, 0, cab_x1, 0.45 * h, 0.15 * h)
    window = _round_rect(x, y, cab_x0 + 0.08 * h, 0.08 * h, cab_x1 - 0.08 * h, 0.35 * h, 0.05 * h)
    r = min(0.2 * h, 0.14 * w)  # wheel radius
    wheels = _ellipse(x, y, 0.22 * w, h - r, r, r) | _ellipse(x, y, 0.78 * w, h - r, r, r)
    paint, hue = _colour(rng, palette, ((0.55, 0.68), (0.5, 0.9), (0.45, 0.9)))  # class: blue
    glass, _ = _colour(rng, palette, ((0.5, 0.6), (0.05, 0.25), (0.75, 0.95)), hue, "window")
    tyres, _ = _colour(rng, palette, ((0, 1), (0, 0.1), (0.05, 0.15)), hue, "wheels")
    rgb = np.zeros((3,) + wheels.shape, np.float32)
    rgb = _layer(rgb, body | cabin, _shading(y, h, paint))
    rgb = _layer(rgb, window & cabin, glass)
    rgb = _layer(rgb, wheels, tyres)
    return body | cabin | wheels, rgb


def _draw_person(x, y, w, h, rng, palette):
    r = min(0.11 * h, 0.4 * w)  # head radius
    head = _ellipse(x, y, 0.5 * w, 0.11 * h, r, r)
    torso = _ellipse(x, y, 0.5 * w, 0.4 * h, 0.36 * w, 0.2 * h)
    arms = np.zeros_like(torso)
    legs = np.zeros_like(torso)
    for side in (0, 1):  # left, right
        arms |= _ellipse(x, y, (0.12 + 0.76 * side) * w, 0.42 * h, 0.1 * w, 0.15 * h)
        legs |= _round_rect(x, y, (0.22 + 0.32 * side) * w, 0.55 * h, (0.46 + 0.32 * side) * w, h, 0.08 * w)
    shirt, hue = _colour(rng, palette, ((-0.03, 0.08), (0.65, 0.95), (0.6, 0.95)))  # class: red/orange
    trousers = shirt * rng.uniform(*TROUSERS[palette])
    face, _ = _colour(rng, palette, ((0.05, 0.09), (0.25, 0.5), (0.7, 0.95)), hue, "head")  # class: skin
    rgb = np.zeros((3,) + torso.shape, np.float32)
    rgb = _layer(rgb, legs, trousers)
    rgb = _layer(rgb, torso | arms, _shading(y, h, shirt))
    rgb = _layer(rgb, head, face)
    return head | torso | arms | legs, rgb


def _draw_animal(x, y, w, h, rng, palette):
    if rng.random() < 0.5:  # face left or right
        x = w - x
    body = _ellipse(x, y, 0.42 * w, 0.45 * h, 0.32 * w, 0.22 * h)
    neck = _ellipse(x, y, 0.7 * w, 0.33 * h, 0.08 * w, 0.15 * h)
    head = _ellipse(x, y, 0.84 * w, 0.2 * h, 0.12 * w, 0.14 * h)
    legs = np.zeros_like(body)
    for u in (0.16, 0.28, 0.52, 0.64):
        legs |= _round_rect(x, y, u * w, 0.5 * h, (u + 0.07) * w, h, 0.03 * w)
    tail = _ellipse(x, y, 0.08 * w, 0.38 * h, 0.08 * w, 0.03 * h)
    mask = body | neck | head | legs | tail
    fur = _shading(y, h, _colour(rng, palette, ((0.08, 0.35), (0.45, 0.8), (0.4, 0.8)))[0])  # (3, ch, 1) green/brown
    wave = np.sin(2 * np.pi * (x / w * rng.uniform(4, 8) + rng.random()))[None]  # (1, 1, cw)
    dark, pale = STRIPES[palette]
    striped = fur * np.where(wave > 0.3, dark, 1.0)  # (3, ch, cw): shades of the fur's own colour
    if pale is not None:
        striped = np.where(wave < -0.3, fur + (1 - fur) * pale, striped)
    return mask, _layer(np.zeros((3,) + mask.shape, np.float32), mask, striped)


def _draw_house(x, y, w, h, rng, palette):
    walls = _round_rect(x, y, 0.1 * w, 0.4 * h, 0.9 * w, h, 0.01 * w)
    apex = rng.uniform(0.4, 0.6) * w
    roof = (y >= 0) & (y <= 0.45 * h) & (np.abs(x - apex) <= 0.5 * w * np.clip(y / (0.45 * h), 0, 1))
    door = _round_rect(x, y, 0.42 * w, 0.7 * h, 0.58 * w, h, 0.02 * w)
    window = _round_rect(x, y, 0.18 * w, 0.55 * h, 0.34 * w, 0.72 * h, 0.01 * w)
    plaster, hue = _colour(rng, palette, ((0.1, 0.16), (0.2, 0.45), (0.75, 0.95)))  # class: pale yellow
    tiles, _ = _colour(rng, palette, ((-0.02, 0.04), (0.6, 0.85), (0.25, 0.45)), hue, "roof")  # class: dark red
    wood, _ = _colour(rng, palette, ((0.05, 0.1), (0.4, 0.7), (0.15, 0.3)), hue, "door")
    rgb = np.zeros((3,) + walls.shape, np.float32)
    rgb = _layer(rgb, walls, plaster)
    rgb = _layer(rgb, roof, tiles)
    rgb = _layer(rgb, door | window, wood)
    return walls | roof, rgb


def _draw_balloon(x, y, w, h, rng, palette):
    body = _ellipse(x, y, 0.5 * w, 0.36 * h, 0.5 * w, 0.36 * h)
    string = (np.abs(x - 0.5 * w - 0.05 * w * np.sin(y / h * 12)) <= max(0.04 * w, 0.6)) & (y >= 0.7 * h)
    highlight = _ellipse(x, y, 0.35 * w, 0.22 * h, 0.1 * w, 0.08 * h)
    # the string is drawn first in the class palette (grey); the balloon's colour leads in the shared one
    if palette == "class":
        cord, _ = _colour(rng, palette, ((0, 1), (0, 0.1), (0.2, 0.35)))
        skin, hue = _colour(rng, palette, ((0.75, 0.9), (0.55, 0.9), (0.6, 0.95)))  # purple/magenta
    else:
        skin, hue = _colour(rng, palette, None)
        cord, _ = _colour(rng, palette, None, hue, "string")
    shine, _ = _colour(rng, palette, ((0.75, 0.9), (0.1, 0.25), (0.9, 1.0)), hue, "highlight")
    rgb = np.zeros((3,) + body.shape, np.float32)
    rgb = _layer(rgb, string, cord)
    rgb = _layer(rgb, body, _shading(y, h, skin))
    rgb = _layer(rgb, highlight & body, shine)
    return body | string, rgb


DRAWERS = {1: _draw_vehicle, 2: _draw_person, 3: _draw_animal, 4: _draw_house, 5: _draw_balloon}


# ----------------------------------------------------------------------------------------------------
# Scene
# ----------------------------------------------------------------------------------------------------
def _upsample(grid, height, width):
    """(C, gh, gw) -> (C, H, W) by separable linear interpolation (grid corners on image corners)."""
    for axis, size in ((1, height), (2, width)):
        pos = np.linspace(0, grid.shape[axis] - 1, size, dtype=np.float32)
        lo = np.minimum(pos.astype(np.int64), grid.shape[axis] - 2)  # (size,)
        frac = (pos - lo).reshape((-1, 1) if axis == 1 else (1, -1))
        low, high = np.take(grid, lo, axis), np.take(grid, lo + 1, axis)
        grid = low + (high - low) * frac
    return grid


def _background(rng, height, width):
    """Greyish textured background (3, H, W) float32: a gradient plus low-frequency blobs of grey and tint."""
    medium = np.full((3,) + BACKGROUND_GRID, rng.uniform(0.3, 0.7), np.float32)  # (3, 11, 14)
    for grid, lum_amp, tint_amp in (((2, 2), 0.2, 0.06), ((5, 6), 0.12, 0.05), (BACKGROUND_GRID, 0.06, 0.03)):
        coarse = lum_amp * rng.uniform(-1, 1, (1,) + grid) + tint_amp * rng.uniform(-1, 1, (3,) + grid)
        medium += _upsample(coarse.astype(np.float32), *BACKGROUND_GRID)
    return _upsample(medium, height, width)  # one full-size interpolation: cheap


def _sample_object(rng, height, width, min_size, max_size, num_classes, palette):
    """One object: (label, (row slice, col slice), full mask crop (ch, cw), rgb crop (3, ch, cw))."""
    label = int(rng.integers(1, num_classes + 1))
    size = np.exp(rng.uniform(np.log(min_size), np.log(max_size)))  # sqrt(w * h) in pixels
    aspect = rng.uniform(*ASPECT_RANGE[label])
    w, h = size * np.sqrt(aspect), size / np.sqrt(aspect)
    shrink = min(1.0, 0.95 * width / w, 0.95 * height / h)  # stay inside the frame
    w, h = w * shrink, h * shrink
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    cols = slice(int(np.floor(x0)), int(np.ceil(x0 + w)))
    rows = slice(int(np.floor(y0)), int(np.ceil(y0 + h)))
    x = (np.arange(cols.start, cols.stop, dtype=np.float32) + 0.5 - x0)[None, :]  # (1, cw) pixel centres
    y = (np.arange(rows.start, rows.stop, dtype=np.float32) + 0.5 - y0)[:, None]  # (ch, 1)
    mask, rgb = DRAWERS[label](x, y, w, h, rng, palette)
    return label, (rows, cols), mask, rgb


def _visible_owner(objects, keep, height, width):
    """(H, W) int map: index of the top-most kept object at each pixel, -1 for background."""
    owner = np.full((height, width), -1, np.int64)
    for k, (_, window, mask, _) in enumerate(objects):
        if keep[k]:
            owner[window][mask] = k
    return owner


def _tight_boxes(masks):
    """(n, H, W) masks -> (n, 4) float32 x1 y1 x2 y2, pixel-edge convention (x2 = last column + 1)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def render_image(rng, height=300, width=400, max_objects=5, min_size=14, max_size=240, num_classes=3,
                 palette="shared"):
    """One synthetic scene; palette 'shared' (one palette for every class) or 'class' (each class its own hues).

    Returns: image uint8 (3, H, W), masks uint8 (n, H, W) visible parts in {0, 1}, labels int64 (n,) in
    1..num_classes, boxes float32 (n, 4) tight x1 y1 x2 y2 (pixel-edge) with 1 <= n <= max_objects.
    """
    check_palette(palette)
    objects = [_sample_object(rng, height, width, min_size, max_size, num_classes, palette)
               for _ in range(int(rng.integers(1, max_objects + 1)))]
    full_area = np.array([obj[2].sum() for obj in objects])  # (n0,)
    owner = _visible_owner(objects, np.ones(len(objects), bool), height, width)
    visible = np.bincount(owner.ravel() + 1, minlength=len(objects) + 1)[1:]  # (n0,)
    keep = (visible >= MIN_VISIBLE_FRAC * full_area) & (visible >= MIN_VISIBLE_PIXELS)
    keep[-1] |= not keep.any()  # the last one painted is never occluded
    # removing objects only uncovers the ones below them, so every kept object stays visible enough
    owner = _visible_owner(objects, keep, height, width)

    image = _background(rng, height, width)  # (3, H, W)
    for k, (_, (rows, cols), mask, rgb) in enumerate(objects):
        if keep[k]:
            image[:, rows, cols] = np.where(mask[None], rgb, image[:, rows, cols])
    noise = rng.integers(-NOISE_LEVELS, NOISE_LEVELS + 1, image.shape, dtype=np.int16)  # (3, H, W)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.int16)  # rounded grey levels
    image = np.clip(image + noise, 0, 255).astype(np.uint8)  # (3, H, W)

    kept = np.flatnonzero(keep)  # (n,)
    masks = (owner[None] == kept[:, None, None]).astype(np.uint8)  # (n, H, W)
    labels = np.array([objects[k][0] for k in kept], np.int64)
    return image, masks, labels, _tight_boxes(masks)


def _render_seeded(seed_seq, **scene):
    return render_image(np.random.default_rng(seed_seq), **scene)


def _rendered_images(num_images, seed, workers, scene):
    """Yield render_image(...) results in image order. Image i draws from its own child seed of `seed`, so
    the files do not depend on `workers` (processes rendering in parallel)."""
    render = functools.partial(_render_seeded, **scene)
    seeds = np.random.SeedSequence(seed).spawn(num_images)
    if workers <= 1:
        yield from map(render, seeds)
        return
    with multiprocessing.Pool(workers, initializer=_leave_stopping_to_the_owner) as pool:
        yield from pool.imap(render, seeds, chunksize=4)


def _leave_stopping_to_the_owner():
    """A rendering worker's start: Ctrl-C is for the process that owns the pool to act on (no traceback from each
    worker), and its terminate() (SIGTERM) ends the worker at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_synthetic_dataset(out_dir, num_images=200, seed=0, max_objects=5, min_size=14, max_size=240,
                            height=300, width=400, workers=2, palette="shared"):
    """Write a synthetic dataset into `out_dir` (created if needed) and return its four paths; palette: render_image's.

    Same file names, h5 key "data", dtypes and layout as the real data (see the module docstring), so
    `BuildDataset(write_synthetic_dataset(...))` works. The same seed gives identical arrays; image i only
    depends on (seed, i), so a larger dataset with the same seed starts with the images of a smaller one.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    check_palette(palette)
    scene = dict(height=height, width=width, max_objects=max_objects, min_size=min_size, max_size=max_size,
                 palette=palette)
    return write_dataset(out_dir, _rendered_images(num_images, seed, workers, scene), num_images, height, width)


def write_synthetic_folder(folder, num_images=200, seed=0, palette="shared", **options):
    """write_synthetic_dataset(folder, ...), whole or not at all, for a set that several runs may need at once
    (dataset.write_synthetic_if_missing: --synthetic N). Returns its four paths.

    The set is written into a temporary folder beside `folder` ('.NAME.<pid>@<host>.<id>.tmp', one per writer) and
    then renamed into place, so that
    - a failure or a kill leaves no partial set that a later run could take for a complete one (a dead writer's
      temporary folder is removed by the next call on that machine);
    - two runs that need the set at once do not write the same h5 files (h5py: 'unable to lock file'): each writes
      its own, the first rename wins, and the other finds the complete set in place and discards its copy;
    - an operating-system error (a full disk) is a WriteError naming `folder`, and the temporary folder is removed.
    A child process writes the files: h5py cannot recover from an HDF5 file whose close failed (on a full disk the
    close writes), and freeing that file's objects later crashes the process that wrote it (a segfault; h5py issues
    914 and 2160). Where `folder` exists without the complete set (an empty folder, or one a version before this
    wrote in place), the new files are moved into it one by one, the ones it lacks last.
    palette, options: write_synthetic_dataset's (max_objects, min_size, workers, ...). A set already in `folder` is
    used whatever its palette: the folder's name tells the sets apart (dataset.resolve_data_dir)."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    check_palette(palette)  # here, not in the child process
    options = dict(options, palette=palette)
    parent, name = os.path.split(os.path.abspath(folder))
    tmp = os.path.join(parent, f".{name}.{os.getpid()}@{socket.gethostname()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_abandoned(parent, name)
        os.mkdir(tmp)
    except OSError as e:
        raise write_error(folder, e) from e
    try:
        _write_in_child(tmp, folder, num_images, seed, options)
        _move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the loser's copy, or what a failed write left
    return dataset_paths(folder)


def _remove_abandoned(parent, name):
    """Remove the temporary folders of writers of `name` on this machine whose process is gone (kill -9)."""
    if os.name != "posix":  # os.kill(pid, 0) only asks on POSIX
        return
    prefix, host = f".{name}.", socket.gethostname()
    for entry in os.listdir(parent):
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        pid, _, writer_host = entry[len(prefix):-len(".tmp")].rpartition(".")[0].partition("@")
        if writer_host != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        except OSError:  # alive (another user's)
            pass


def _write_in_child(tmp, folder, num_images, seed, options):
    """write_synthetic_dataset(tmp, ...) in a child process (forked on Linux: no imports, and what the parent
    patched holds there too); WriteError naming `folder` when the operating system refuses a write."""
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child_write, args=(sender, tmp, num_images, seed, options),
                            name="synthetic set writer")
    child.start()
    sender.close()
    with contextlib.suppress(AttributeError, OSError):  # as the child does: whichever comes first
        os.setpgid(child.pid, child.pid)
    try:
        try:
            report = receiver.recv()
        except EOFError:  # it ended without a word
            report = ()
        child.join()
    finally:
        # at once where this process was stopped (Ctrl-C, SIGTERM) while it waited; rendering workers that a failed
        # write left behind in any case: what they were writing is discarded
        with contextlib.suppress(AttributeError, OSError):
            os.killpg(child.pid, signal.SIGKILL)
        child.kill()
        child.join()
        receiver.close()
    if report is None and child.exitcode == 0:
        return
    if report:
        code, interrupted, message, trace = report
        if interrupted:  # a stop signal sent to the child itself (it has this process's handlers)
            raise KeyboardInterrupt(*([message] if message else []))
        if code:
            raise write_error(folder, OSError(code, os.strerror(code)))
        raise RuntimeError(f"writing the synthetic set {folder} failed in its child process:\n{trace}")
    how = f"with exit code {child.exitcode}"
    if child.exitcode < 0:
        how = f"by signal {-child.exitcode}"
        with contextlib.suppress(ValueError):
            how = f"by signal {signal.Signals(-child.exitcode).name}"
    raise WriteError(None, f"cannot write {folder}: the process writing it ended {how}")


def _child_write(sender, tmp, num_images, seed, options):
    """The child process of _write_in_child: write the set into tmp and fsync its files, send None or what failed
    (errno or None, whether it was a KeyboardInterrupt, its message, its traceback), and end at once (os._exit),
    before h5py frees a file whose close failed. It runs in a process group of its own, with its rendering
    workers: Ctrl-C is for the parent, which ends the group."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpgid(0, 0)
    try:
        for path in write_synthetic_dataset(tmp, num_images=num_images, seed=seed, **options):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        sender.send(None)
    except BaseException as e:  # a KeyboardInterrupt too (SIGTERM sent to this process)
        try:
            sender.send((os_errno(e), isinstance(e, KeyboardInterrupt), str(e), traceback.format_exc()))
        finally:
            os._exit(1)
    os._exit(0)


def _move_into_place(tmp, folder):
    """Rename the written set tmp to folder. Where folder exists (another writer was first, or an empty or partial
    folder is there): a complete set in it is kept (tmp is discarded), else tmp's files are moved into it, those it
    lacks last, so that it looks complete only once it is."""
    try:
        try:
            os.rename(tmp, folder)  # atomic; onto a missing or empty folder only
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if not all(os.path.isfile(p) for p in dataset_paths(folder)):
                for name in sorted(FILE_NAMES, key=lambda n: not os.path.isfile(os.path.join(folder, n))):
                    os.replace(os.path.join(tmp, name), os.path.join(folder, name))
                fsync_dir(folder)
        fsync_dir(os.path.dirname(os.path.abspath(folder)))
    except OSError as e:
        raise write_error(folder, e) from e


def write_synthetic_coco(out_dir, num_images=200, seed=0, max_objects=5, min_size=14, max_size=240, height=300,
                         width=400, workers=2, num_classes=5, image_format="jpg", category_ids=None, palette="shared"):
    """Write a synthetic dataset in COCO format into out_dir: images/NNNNNN.<image_format>, train.json and
    val.json (the 80/20 split every script makes of the course files); returns the two json paths. The scenes
    are write_synthetic_dataset's (with num_classes=3 and the same seed and palette, the same images and objects)."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 1 <= num_classes <= len(CLASS_NAMES_5):
        raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES_5)}, got {num_classes}")
    check_palette(palette)
    scene = dict(height=height, width=width, max_objects=max_objects, min_size=min_size, max_size=max_size,
                 num_classes=num_classes, palette=palette)
    train, val = split_indices(num_images)
    return write_coco(out_dir, _rendered_images(num_images, seed, workers, scene), CLASS_NAMES_5[:num_classes],
                      {"train.json": train, "val.json": val}, image_format, category_ids)


def get_args_parser():
    parser = argparse.ArgumentParser(description="Write a synthetic SOLO dataset (real-data file format).")
    parser.add_argument("--out", default="data/synthetic", type=str, help="output folder")
    parser.add_argument("--num-images", default=400, type=int, help="number of images")
    parser.add_argument("--seed", default=0, type=int, help="random seed (same seed, same files)")
    parser.add_argument("--max-objects", default=5, type=int, help="at most this many objects per image")
    parser.add_argument("--min-size", default=14, type=float, help="smallest sqrt(w*h) in 300x400 pixels")
    parser.add_argument("--max-size", default=240, type=float, help="largest sqrt(w*h) in 300x400 pixels")
    parser.add_argument("--workers", default=2, type=int, help="processes rendering images (1: no pool)")
    parser.add_argument("--format", default="course", choices=("course", "coco"),
                        help="'course': the four h5/npy files; 'coco': JPEG images, train.json and val.json")
    parser.add_argument("--classes", default=3, type=int, choices=(3, 4, 5),
                        help="object classes (4 and 5 add house and balloon; COCO format only)")
    parser.add_argument("--palette", default="shared", choices=PALETTES,
                        help="'shared': every class in one palette (told apart by shape only); 'class': each class "
                             "its own hues (vehicles blue, people red, animals green: figures)")
    return parser


def main(args):
    start = time.perf_counter()
    if args.format == "coco":
        paths = write_synthetic_coco(args.out, args.num_images, args.seed, args.max_objects, args.min_size,
                                     args.max_size, workers=args.workers, num_classes=args.classes,
                                     palette=args.palette)
        print(f"wrote {args.num_images} images and {', '.join(paths)} in {time.perf_counter() - start:.1f} s")
        return
    if args.classes != len(CLASS_NAMES):
        raise SystemExit(f"error: --classes {args.classes} needs --format coco (the course's labels are 1..3)")
    paths = write_synthetic_dataset(args.out, args.num_images, args.seed, args.max_objects, args.min_size,
                                    args.max_size, workers=args.workers, palette=args.palette)
    seconds = time.perf_counter() - start
    labels = np.load(paths[2], allow_pickle=True)  # the object array this run has just written
    counts = np.bincount(np.concatenate(labels), minlength=len(CLASS_NAMES) + 1)[1:]
    per_class = ", ".join(f"{name} {count}" for name, count in zip(CLASS_NAMES, counts))
    print(f"wrote {args.num_images} images, {counts.sum()} objects ({per_class}) to {args.out} in {seconds:.1f} s")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
