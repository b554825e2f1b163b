"""Drawing detections and masks with numpy and matplotlib only (no torch), so that the PyTorch scripts and the
onnxruntime deployment (deploy.py) draw the same overlays: class colours, the blend of masks over an image, the
figure of one image's detections (handout figures 11-14), and the overlays of a folder of photos."""
import os

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from atomic_files import atomic_write
from errors import PhotoError
from imagefiles import letterbox, load_photo, photo_input, resized_sizes

CLASS_COLORS = ((1.0, 0.85, 0.0), (0.0, 0.9, 0.9), (1.0, 0.2, 1.0))  # overlay colours: vehicle, person, animal


def class_colors(num_classes):
    """One overlay colour (r, g, b) per class: the course's three, then matplotlib's tab20, cycling."""
    extra = [tuple(c[:3]) for c in matplotlib.colormaps["tab20"].colors]
    return [(CLASS_COLORS + tuple(extra))[k % (len(CLASS_COLORS) + len(extra))] for k in range(num_classes)]


def rgb(color):
    """A matplotlib colour, or a colormap name such as the handout's "jet", "ocean", "Spectral" (its colour at
    0.8) -> (r, g, b)."""
    if matplotlib.colors.is_color_like(color):
        return matplotlib.colors.to_rgb(color)
    return tuple(float(c) for c in matplotlib.colormaps[color](0.8)[:3])


def overlay(image, masks, labels, color_list, alpha=0.5):
    """image (H, W, 3) in [0, 1], masks (n, H, W) {0, 1}, labels (n,) in 1..C-1 -> (H, W, 3) float32 blended."""
    out = np.array(image, dtype=np.float32)  # a copy
    for mask, label in zip(masks, labels):
        on = np.asarray(mask) > 0
        out[on] = (1 - alpha) * out[on] + alpha * np.array(rgb(color_list[int(label) - 1]), np.float32)
    return out.clip(0, 1)


def detections_figure(image, scores, labels, masks, class_names, color_list, score_thresh=0.3):
    """One image's detections scoring at least score_thresh: the masks blended over image (H, W, 3) in [0, 1],
    each labelled with its class name and score at its top-left pixel. Returns a matplotlib Figure."""
    scores, labels, masks = np.asarray(scores), np.asarray(labels), np.asarray(masks)
    keep = scores >= score_thresh
    scores, labels, masks = scores[keep], labels[keep], masks[keep]
    inches = 6 / max(image.shape[:2])  # the longer side 6 inches, whatever the photo's aspect
    fig, ax = plt.subplots(figsize=(max(image.shape[1] * inches, 1), max(image.shape[0] * inches, 1)))
    ax.imshow(overlay(image, masks, labels, color_list))
    for mask, label, score in zip(masks, labels, scores):
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:  # nothing left in the original frame (e.g. a mask inside the padding)
            continue
        ax.text(xs.min(), ys.min(), f"{class_names[int(label) - 1]} {score:.2f}", fontsize=8, color="white",
                bbox=dict(facecolor=rgb(color_list[int(label) - 1]), alpha=0.8, pad=1, lw=0))
    ax.axis("off")
    return fig


def save_figure(fig, path):
    """fig as a PNG at path (folders made), closed. Written whole or not at all (atomic_files.atomic_write): a
    stopped script leaves the old file, never half of a new one. Returns path."""
    try:
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def overlay_name(photo):
    """The overlay's path for a photo's relative path: the extension kept in the name, so that same.jpg and
    same.png give two files (sub/same.jpg -> sub/same_jpg_infer.png)."""
    stem, ext = os.path.splitext(photo)
    return f"{stem}_{ext[1:]}_infer.png"


def photo_overlays(infer, class_names, folder, photos, input_height, figures_dir, score_thresh, max_long_side=None):
    """The overlay of each photo (relative paths under folder), written as <figures_dir>/<overlay_name>: the photo
    letterboxed to at most 4:1 (and to the exported model's widest input at input_height), made into the network's
    input (imagefiles.photo_input, the frame of input_height and max_long_side), and infer(input (1, 3, H, W)
    float32, size of the letterboxed photo, its resized size inside the input) -> (scores (k,), labels (k,), masks
    (k, h, w)) of that image. A photo that cannot be read is skipped with one warning line
    naming it and why. Overlays already in figures_dir (an earlier run's) are replaced, and one line says how many.
    Returns (overlay paths, skipped)."""
    colours = class_colors(len(class_names))
    out_paths, skipped = [], []
    earlier = {name for name in photos if os.path.isfile(os.path.join(figures_dir, overlay_name(name)))}
    replaced = 0
    for name in tqdm(photos, desc="photos", unit="image"):
        try:
            photo = load_photo(os.path.join(folder, name))  # (3, h, w) uint8
        except PhotoError as err:
            tqdm.write(f"warning: skipped {os.path.join(folder, name)}: {err}")
            skipped.append(name)
            continue
        # the exported model's 2048-pixel width limit binds only in the handout's frame (mmdetection's caps the
        # longer side itself)
        padded = letterbox(photo, input_height=None if max_long_side else input_height)
        scaled_size = resized_sizes(*padded.shape[-2:], input_height, max_long_side)[0]
        scores, labels, masks = infer(photo_input(padded, input_height, max_long_side), padded.shape[-2:], scaled_size)
        masks = np.asarray(masks)[:, :photo.shape[1], :photo.shape[2]]  # the letterbox cut off again
        fig = detections_figure(photo.transpose(1, 2, 0) / 255, scores, labels, masks, class_names, colours,
                                score_thresh)
        out_paths.append(save_figure(fig, os.path.join(figures_dir, overlay_name(name))))
        replaced += name in earlier
    if replaced:
        print(f"{replaced} overlays in {figures_dir} replaced (an earlier run's)")
    return out_paths, skipped
