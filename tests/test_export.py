"""Specification of the deployment: export.py (a checkpoint of any head -> ONNX), onnx_infer.py (onnxruntime and
numpy post-processing) and deploy.py (photos without PyTorch, or the mask mAP).

Tiny random models (ResNet-18 FPN, one conv per tower, 32 channels, small grids) at input height 64, exported
once per head (about half a minute each on 2 cores: the successors' are slow-marked). Tolerances: raw outputs
within 1e-4 (float32 through two runtimes), detections the same in number and labels, scores within 1e-3, mask
IoU >= 0.99 per detection.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import deploy
import export
import main_infer
from checkpoint import load_model, save_checkpoint
from dataset import build_test_split
from model import build_model
from onnx_export import ExportGraph, output_names
from onnx_infer import ExportedSOLO, cell_masks, postprocess
from plots import detections_figure, save_figure
from solo_head import POSTPROCESS_HANDOUT, POSTPROCESS_MAP
from synthetic import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = [pytest.param("solo"), pytest.param("decoupled", marks=pytest.mark.slow),
         pytest.param("solov2", marks=pytest.mark.slow)]
INPUT_HEIGHT = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("export_data")
    write_synthetic_dataset(str(directory), num_images=10, seed=0, workers=1)  # 2 test images
    return str(directory)


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, data_dir, tmp_path_factory):
    """(arch, checkpoint path, onnx path) of a tiny random model whose category maps give candidates."""
    arch, folder = request.param, tmp_path_factory.mktemp(f"export_{request.param}")
    cfg = dict(arch=arch, backbone="resnet18", backbone_weights="none", stacked_convs=1, seg_feat_channels=32,
               mask_feat_channels=32, num_grids=(8, 6, 4, 3, 2))
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.nn.init.constant_(model.head.cate_out.bias, -1.0)  # scores around 0.27: some cells pass 0.1 and 0.2
    if arch == "decoupled":  # products of two sigmoids around 0.5 stay under the 0.5 mask threshold: lift both
        for conv in [*model.head.ins_out_x, *model.head.ins_out_y]:
            torch.nn.init.constant_(conv.bias, 1.0)
    checkpoint = {"format": "solo-checkpoint-v1", "model": model.state_dict(), "model_cfg": cfg, "optimizer": {},
                  "scheduler": {}, "scaler": None, "epoch": 0, "iteration": 1, "history": {"train": [], "test": []},
                  "rng": {}, "args": dict(data_dir=data_dir, synthetic=0, input_height=INPUT_HEIGHT)}
    save_checkpoint(checkpoint, str(folder / "checkpoint.pth"))
    export.main(export.get_args_parser().parse_args(["--checkpoint", str(folder / "checkpoint.pth"), "--out",
                                                     str(folder / "model.onnx"), "--no-check"]))
    return arch, str(folder / "checkpoint.pth"), str(folder / "model.onnx")


def test_raw_outputs_equal_pytorch_at_two_sizes_and_batch_sizes(exported):
    arch, checkpoint, path = exported
    graph = ExportGraph(load_model(checkpoint)).eval()
    session = ExportedSOLO(path)
    assert session.names == output_names(arch)
    for batch, height, width in ((1, 64, 96), (1, 96, 160), (3, 64, 96), (3, 96, 160)):
        image = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = graph(image)
        got = session.forward(image.numpy())
        assert got["cate_0"].shape == (batch, 8, 8, 3)
        for name, e in zip(session.names, expected):
            assert got[name].shape == tuple(e.shape), name
            np.testing.assert_allclose(got[name], e.numpy(), atol=1e-4, rtol=0, err_msg=name)


def assert_same_detections(ours, theirs):
    """Per image: the same number and labels, scores within 1e-3, mask IoU >= 0.99."""
    for (s1, l1, m1), (s2, l2, m2) in zip(zip(*ours), zip(*theirs)):
        s2, l2, m2 = (np.asarray(torch.as_tensor(x).cpu()) for x in (s2, l2, m2))
        assert len(s1) == len(s2) and (l1 == l2).all()
        np.testing.assert_allclose(s1, s2, atol=1e-3)
        for a, b in zip(m1, m2 > 0):
            assert (a & b).sum() >= 0.99 * max((a | b).sum(), 1)


def test_detections_agree_with_pytorch_end_to_end(exported):
    arch, checkpoint, path = exported
    model, session = load_model(checkpoint), ExportedSOLO(path)
    test_set = build_test_split(session.meta["data"])  # the run's data settings, from the model's metadata
    image = torch.stack([test_set[i][0] for i in range(len(test_set))] * 2)[:3]  # 3 images at 64 x 96
    sizes = [(300, 400), (240, 360), (96, 128)]  # each image its own original frame (the 4:3 of the input)
    agnostic_linear = dict(POSTPROCESS_MAP, class_wise=False, nms_kernel="linear")
    for cfg in (POSTPROCESS_MAP, POSTPROCESS_HANDOUT, agnostic_linear):
        theirs = model.infer(image, sizes, cfg)
        ours = session.infer(image.numpy(), sizes, cfg)
        assert sum(len(s) for s in ours[0]) > 0  # a case with detections
        assert all(m.dtype == bool and m.shape[1:] == size for m, size in zip(ours[2], sizes))
        assert_same_detections(ours, theirs)


def test_no_one_and_more_than_top_k_candidates_in_one_batch(exported):
    # the category maps made by hand, the head's real mask inputs: image 0 has no candidate, image 1 exactly one,
    # image 2 every cell (more than the pre-NMS top-k of 7); both post-processings agree on each
    arch, checkpoint, path = exported
    model, session = load_model(checkpoint), ExportedSOLO(path)
    image = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cate, ins = model(image, eval=True)
    outputs = session.forward(image.numpy())
    # image 1's candidate: a cell of level 2 (stride 16, cells 100..115) whose mask passes the stride filter
    level_2 = np.arange(100, 116)
    area = (cell_masks(outputs, 1, level_2, session.meta) > 0.5).sum((1, 2))
    chosen = int(np.flatnonzero(area > 16)[0])
    for level, c in enumerate(cate):
        c.zero_()
        c[2] = torch.linspace(0.3, 0.9, c[2].numel()).view_as(c[2])  # image 2: every (cell, class), distinct
        if level == 2:
            c[1, chosen // 4, chosen % 4, 0] = 0.8  # image 1: one (cell, class)
        outputs[f"cate_{level}"] = c.numpy()
    cfg = dict(POSTPROCESS_MAP, pre_NMS_num=7, keep_instance=5)
    with torch.no_grad():
        theirs = model.head.PostProcess(ins, cate, (300, 400), cfg)
    ours = postprocess(outputs, session.meta, (300, 400), cfg)
    assert [len(s) for s in ours[0]] == [0, 1, 5]  # the top 5 of many, after Matrix NMS
    assert ours[0][0].shape == (0,) and ours[1][0].shape == (0,) and ours[2][0].shape == (0, 300, 400)
    assert_same_detections(ours, theirs)


def test_photos_need_no_pytorch_and_give_main_infers_overlays(exported, tmp_path):
    arch, checkpoint, path = exported
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(photos / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (90, 60), dtype=np.uint8)).save(photos / "grey.png")
    (photos / "broken.png").write_bytes(b"not an image")
    # deploy.py in a fresh interpreter where importing torch fails
    script = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path('deploy.py', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", script, "deploy.py", "--model", path, "--images", str(photos),
                          "--figures-dir", str(tmp_path / "onnx"), "--plot-score-thresh", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, MPLBACKEND="Agg"))
    assert run.returncode == 0, run.stderr
    assert "skipped 1 photos" in run.stdout and "broken.png" in run.stderr + run.stdout
    assert sorted(os.listdir(tmp_path / "onnx")) == ["a_jpg_infer.png", "grey_png_infer.png"]
    main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint", checkpoint, "--images", str(photos), "--figures-dir", str(tmp_path / "torch"),
         "--plot-score-thresh", "0", "--device", "cpu", "--amp", "off"]))  # float32, as the graph
    photo = np.asarray(Image.open(photos / "a.jpg")).astype(np.float32) / 255  # (150, 200, 3)
    save_figure(detections_figure(photo, [], [], np.zeros((0, 150, 200)), ["a", "b", "c"], ["r", "g", "b"]),
                str(tmp_path / "bare.png"))
    bare = np.asarray(Image.open(tmp_path / "bare.png"))
    for name in ("a_jpg_infer.png", "grey_png_infer.png"):  # the same picture, pixel for pixel
        ours, theirs = (np.asarray(Image.open(tmp_path / folder / name)) for folder in ("onnx", "torch"))
        assert ours.shape == theirs.shape and (ours != theirs).any(-1).mean() < 1e-3, name
    ours = np.asarray(Image.open(tmp_path / "onnx" / "a_jpg_infer.png"))
    assert ours.shape == bare.shape and (ours != bare).any(-1).mean() > 0.01  # detections were drawn


def test_evaluation_gives_main_infers_map(exported, tmp_path):
    arch, checkpoint, path = exported
    ours = deploy.main(deploy.get_args_parser().parse_args(["--model", path, "--evaluate", "--figures-dir",
                                                            str(tmp_path / "onnx")]))
    theirs = main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint", checkpoint, "--figures-dir", str(tmp_path / "torch"), "--device", "cpu", "--workers", "0",
         "--num-figures", "0", "--amp", "off"]))  # float32, as the exported graph
    assert ours["num_detections"] == theirs["num_detections"] > 0
    for key in ("AP", "AP50", "AP75"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-3, nan_ok=True)
    # detection by detection: the same images, categories and scores in the two results jsons
    ours_dets, theirs_dets = (sorted((d["image_id"], d["category_id"], d["score"]) for d in json.load(open(r)))
                              for r in (ours["results_json"], theirs["results_json"]))
    assert len(ours_dets) == ours["num_detections"] and [d[:2] for d in ours_dets] == [d[:2] for d in theirs_dets]
    np.testing.assert_allclose([d[2] for d in ours_dets], [d[2] for d in theirs_dets], atol=1e-3)


@pytest.mark.parametrize("stored_palette", ["shared", None])  # a run since the shared palette; one before it
def test_evaluation_reads_a_synthetic_runs_set_in_its_palette(stored_palette, tmp_path):
    """The model file carries the palette of the run's synthetic set, so deploy.py --evaluate scores the very
    images main_infer.py scores: a run without a stored palette (before the shared one) keeps the per-class set."""
    torch.manual_seed(0)
    cfg = dict(arch="solo", backbone="resnet18", backbone_weights="none", stacked_convs=1, seg_feat_channels=32,
               num_grids=(8, 6, 4, 3, 2))
    model = build_model(cfg)
    torch.nn.init.constant_(model.head.cate_out.bias, -1.0)  # scores around 0.27: candidates in every image
    args = dict(data_dir=str(tmp_path / "data"), synthetic=10, synthetic_min_size=30, input_height=INPUT_HEIGHT)
    if stored_palette:
        args["synthetic_palette"] = stored_palette
    checkpoint = {"format": "solo-checkpoint-v1", "model": model.state_dict(), "model_cfg": cfg, "optimizer": {},
                  "scheduler": {}, "scaler": None, "epoch": 0, "iteration": 1, "history": {"train": [], "test": []},
                  "rng": {}, "args": args}
    save_checkpoint(checkpoint, str(tmp_path / "checkpoint.pth"))
    theirs = main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint", str(tmp_path / "checkpoint.pth"), "--figures-dir", str(tmp_path / "torch"), "--device",
         "cpu", "--workers", "0", "--num-figures", "0", "--amp", "off"]))  # writes the set it reads
    written = sorted(os.listdir(tmp_path / "data"))
    assert written == [f"synthetic_10_min_size30_palette{stored_palette or 'class'}"]
    export.main(export.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--out",
                                                     str(tmp_path / "model.onnx"), "--no-check"]))
    assert ExportedSOLO(str(tmp_path / "model.onnx")).meta["data"]["synthetic_palette"] == (stored_palette or "class")
    ours = deploy.main(deploy.get_args_parser().parse_args(["--model", str(tmp_path / "model.onnx"), "--evaluate",
                                                            "--figures-dir", str(tmp_path / "onnx")]))
    assert sorted(os.listdir(tmp_path / "data")) == written  # no set of another palette written
    ours_dets, theirs_dets = (sorted((d["image_id"], d["category_id"], d["score"]) for d in json.load(open(r)))
                              for r in (ours["results_json"], theirs["results_json"]))
    assert len(ours_dets) == len(theirs_dets) > 0 and [d[:2] for d in ours_dets] == [d[:2] for d in theirs_dets]
    np.testing.assert_allclose([d[2] for d in ours_dets], [d[2] for d in theirs_dets], atol=1e-3)


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--model .*nothing.onnx: no such file \(export.py writes one"):
        deploy.main(deploy.get_args_parser().parse_args(["--model", str(tmp_path / "nothing.onnx"), "--evaluate"]))
    with pytest.raises(SystemExit, match="give --images DIR .* or --evaluate"):
        deploy.main(deploy.get_args_parser().parse_args(["--model", "m.onnx"]))
    import onnx
    from onnx import TensorProto, helper
    plain = helper.make_model(helper.make_graph([helper.make_node("Identity", ["image"], ["out"])], "g",
                                                [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])],
                                                [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])]))
    onnx.save(plain, str(tmp_path / "other.onnx"))
    with pytest.raises(ValueError, match=r"other.onnx is not a model written by export.py"):
        ExportedSOLO(str(tmp_path / "other.onnx"))
    (tmp_path / "cut.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(ValueError, match=r"cut.onnx is not a readable ONNX model"):
        ExportedSOLO(str(tmp_path / "cut.onnx"))


def test_inputs_outside_the_exported_contract_are_refused(exported):
    _, _, path = exported
    session = ExportedSOLO(path)
    for shape in ((1, 3, 100, 100), (0, 3, 64, 64), (1, 3, 32, 64), (1, 3, 64, 2080), (3, 64, 64)):
        with pytest.raises(ValueError, match=r"takes \(batch >= 1, 3, H, W\) with H and W multiples of 32 from 64"):
            session.forward(np.zeros(shape, np.float32))
    outputs = session.forward(np.zeros((3, 3, 64, 96), np.float32))
    with pytest.raises(ValueError, match="2 image sizes for a batch of 3 images"):
        postprocess(outputs, session.meta, [(300, 400)] * 2, POSTPROCESS_MAP)
    with pytest.raises(ValueError, match="MatrixNMS method must be 'gauss' or 'linear', got 'box'"):
        postprocess(outputs, session.meta, (300, 400), dict(POSTPROCESS_MAP, nms_kernel="box", cate_thresh=0))
