"""Specification of the photo and exported-model failures of the second fault probe (issue 24):

- 16-bit images (PNG: Pillow's modes I;16 and I) are read as 8 bits by v / 257, rounded (0..65535 onto 0..255,
  the full range, no contrast stretch), as --images photos (imagefiles.load_photo) and as a COCO dataset's images;
  16-bit RGB PNGs, which Pillow reduces to their high byte, are within one level of that.
- A tall photo (1:4) through deploy.py --images is letterboxed and padded into the exported model's input as
  main_infer.py --images does (the same pixels): its overlay is written and the photos after it too; a wide photo
  at a large input height is padded to the exported model's widest input (2048).
- An ONNX file whose 'solo' metadata is not json, or lacks keys export.py writes, ends deploy.py with one line
  "error: FILE: not a model exported by export.py (...)" saying what is wrong, exit code 1, no traceback.
- --images into a figures folder holding an earlier run's overlays replaces them and says how many in one line.

The deployment tests reuse tests/test_export.py's tiny exported model (its module-scoped `exported` fixture).
"""
import json
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import onnx
import pytest
from PIL import Image

import deploy
import main_infer
import test_export
from dataset import COCODataset
from imagefiles import letterbox, load_photo, photo_input
from plots import photo_overlays

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data_dir, exported = test_export.data_dir, test_export.exported  # the fixtures: one tiny exported model


def png16_rgb(path, rgb):
    """A 16-bit RGB PNG of rgb uint16 (H, W, 3), written by hand (Pillow cannot write one)."""
    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                + chunk(b"IEND", b""))


def eight_bits(values):
    return np.round(np.asarray(values, np.float64) / 257).astype(np.uint8)


def test_16_bit_pngs_are_read_as_8_bits_not_white(tmp_path):
    gradient = (np.arange(256 * 3, dtype=np.uint16).reshape(3, 256) * 85)  # 0..65195, every level
    full = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value, 0..65535
    for name, values in (("gradient.png", gradient), ("full.png", full)):
        Image.fromarray(values).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == "I;16"  # what Pillow makes of a 16-bit grey PNG
        photo = load_photo(str(tmp_path / name))
        assert photo.dtype == np.uint8 and photo.shape == (3,) + values.shape
        for channel in photo:
            np.testing.assert_array_equal(channel, eight_bits(values), err_msg=name)
    assert load_photo(str(tmp_path / "full.png"))[0].min() == 0 and (load_photo(str(tmp_path / "full.png")) == 255
                                                                      ).mean() < 0.01
    rgb = np.stack([gradient, gradient // 2, 65535 - gradient], -1)
    png16_rgb(tmp_path / "rgb.png", rgb)
    photo = load_photo(str(tmp_path / "rgb.png")).transpose(1, 2, 0)
    assert np.abs(photo.astype(int) - eight_bits(rgb)).max() <= 1  # Pillow's high byte: v // 256


def test_16_bit_png_in_a_coco_dataset(tmp_path):
    values = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 32)  # 0..63968
    Image.fromarray(values).save(tmp_path / "deep.png")
    square = [[10, 10, 30, 10, 30, 30, 10, 30]]
    with open(tmp_path / "data.json", "w") as f:
        json.dump(dict(images=[dict(id=1, file_name="deep.png", height=40, width=50)],
                       annotations=[dict(id=1, image_id=1, category_id=1, segmentation=square, area=400,
                                         bbox=[10, 10, 20, 20], iscrowd=0)],
                       categories=[dict(id=1, name="cat")]), f)
    dataset = COCODataset(str(tmp_path / "data.json"), str(tmp_path), input_height=64)
    img = dataset.get_raw(0)[0].numpy()
    for channel in img:
        np.testing.assert_array_equal(channel, eight_bits(values))
    item = dataset[0][0].numpy()  # the network's input: the image's 8-bit values, normalised
    expected = photo_input(np.repeat(eight_bits(values)[None], 3, 0), 64)[0]
    assert item.shape == expected.shape and np.abs(item - expected).max() < 0.05


def test_a_wide_photo_is_padded_to_the_exported_models_widest_input():
    wide = np.zeros((3, 100, 400), np.uint8)  # 4:1: 3200 wide at height 800
    padded = letterbox(wide, input_height=800)
    assert padded.shape == (3, 157, 400)  # ceil(400 * 800 / 2048) rows: 2038 wide at 800
    assert photo_input(padded, 800).shape == (1, 3, 800, 2048)
    assert letterbox(wide, input_height=64).shape == (3, 100, 400)  # 4:1 at 64 is 256 wide: as it was
    assert photo_input(np.zeros((3, 160, 40), np.uint8), 64).shape == (1, 3, 64, 64)  # 16 wide, padded to 64


def test_deploy_overlays_a_tall_photo_and_the_ones_after_it_as_main_infer_does(exported, tmp_path):
    arch, checkpoint, path = exported
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (60, 80, 3)), ("b_tall.png", (160, 40, 3)), ("c.png", (90, 70, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(photos / name)
    names = ["a_png_infer.png", "b_tall_png_infer.png", "c_png_infer.png"]
    ours = deploy.main(deploy.get_args_parser().parse_args(
        ["--model", path, "--images", str(photos), "--figures-dir", str(tmp_path / "onnx"), "--plot-score-thresh",
         "0"]))
    theirs = main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint", checkpoint, "--images", str(photos), "--figures-dir", str(tmp_path / "torch"),
         "--plot-score-thresh", "0", "--device", "cpu", "--amp", "off"]))  # float32, as the exported graph
    assert ours["skipped"] == theirs["skipped"] == []
    assert sorted(os.listdir(tmp_path / "onnx")) == sorted(os.listdir(tmp_path / "torch")) == names
    for name in names:  # the same picture, pixel for pixel
        a, b = (np.asarray(Image.open(tmp_path / folder / name)) for folder in ("onnx", "torch"))
        assert a.shape == b.shape and (a != b).any(-1).mean() < 1e-3, name


@pytest.mark.parametrize("metadata, what", [
    ('{"arch": "solo", "class_names": [', "its 'solo' metadata is not valid JSON: Expecting value: line 1"),
    ("without", "its 'solo' metadata lacks 'class_names', 'postprocess.map'"),
], ids=["not-json", "missing-keys"])
def test_bad_solo_metadata_is_one_error_line_naming_the_file(exported, tmp_path, metadata, what):
    _, _, path = exported
    model = onnx.load(path)
    entry = next(p for p in model.metadata_props if p.key == "solo")
    if metadata == "without":
        meta = json.loads(entry.value)
        del meta["class_names"], meta["postprocess"]["map"]
        metadata = json.dumps(meta)
    entry.value = metadata
    bad = tmp_path / "bad model.onnx"
    onnx.save(model, str(bad))
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "photos" / "a.png")
    run = subprocess.run([sys.executable, "deploy.py", "--model", str(bad), "--images", str(tmp_path / "photos"),
                          "--figures-dir", str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, MPLBACKEND="Agg"))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors == run.stderr.strip().splitlines()[-1:]
    assert errors[0].startswith(f"error: {bad}: not a model exported by export.py (")
    assert errors[0].endswith(")") and re.search(what, errors[0]), errors[0]


def test_a_second_run_into_the_same_folder_says_its_overlays_replace_the_earlier_ones(tmp_path, capsys):
    photos, figures = tmp_path / "photos", tmp_path / "figures"
    photos.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.new("RGB", (40, 30), (200, 100, 50)).save(photos / name)

    def infer(image, size, scaled_size):  # no detections: only the files matter here
        return np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros((0, *size), bool)

    def run(names):
        paths, skipped = photo_overlays(infer, ["thing"], str(photos), names, 64, str(figures), 0.3)
        assert len(paths) == len(names) and not skipped
        return capsys.readouterr().out
    assert "replaced" not in run(["a.png", "b.jpg"])
    Image.new("RGB", (40, 30)).save(photos / "c.png")
    out = run(["a.png", "b.jpg", "c.png"])  # c's overlay is new: 2 replaced
    assert f"2 overlays in {figures} replaced (an earlier run's)" in out.splitlines()
    assert sorted(os.listdir(figures)) == ["a_png_infer.png", "b_jpg_infer.png", "c_png_infer.png"]
