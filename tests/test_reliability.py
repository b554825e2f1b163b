"""What a run survives and what bad input gets (docs/reliability.md): a run folder belongs to one run, an
interrupted or failed write leaves the newest checkpoint intact and says which to resume from, data files cannot
run code and every read error names the file and the image, and bad photos are skipped one by one.

Tiny models and temporary folders throughout, on the CPU; the subprocess tests run the scripts as a user does.
"""
import errno
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import imagefiles
import main_infer
import main_train
from conftest import learning_history, parse_train
from atomic_files import atomic_write
from checkpoint import latest_checkpoint, load_checkpoint, load_model
from datafiles import write_dataset
from dataset import BuildDataLoader, BuildDataset
from errors import CheckpointError, DataError, NonFiniteLossError, RunFolderError, WriteError, error_message
from run_folder import run_folder, stopped_message
from solo_head import SOLOHead
from synthetic import write_synthetic_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--backbone", "resnet18", "--backbone-weights", "none", "--set", "stacked_convs=1",
        "seg_feat_channels=32", "num_grids=8,6,4,3,2", "--input-height", "64", "--batch-size", "1", "--log-every", "1",
        "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def data_dir(three_images):
    return three_images


def train(data_dir, run_dir, *extra):
    return main_train.main(parse_train(TINY + ["--data-dir", data_dir, "--output-dir", str(run_dir),
                                                         *map(str, extra)]))


def script(*argv, timeout=240, **kwargs):
    """Run a script of the repository as a user does: (return code, stdout, stderr)."""
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            **kwargs)
    return result.returncode, result.stdout, result.stderr


def error_line(stderr):
    """The one line a script prints when it stops on a user's error: 'error: ...', and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished")
    train(data_dir, run_dir, "--epochs", 2)
    return run_dir


def copy_run(source, target):
    target.mkdir()
    for name in os.listdir(source):
        if not name.startswith("."):
            (target / name).write_bytes((source / name).read_bytes())
    return target


# ----------------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------------
class TestRunFolder:
    def test_a_second_process_is_refused_while_one_holds_the_folder(self, tmp_path):
        with run_folder(str(tmp_path)):
            with pytest.raises(RunFolderError, match=f"{tmp_path} is in use by a training run \\(process "
                                                     f"{os.getpid()} on .*\\): wait for it to end"):
                with run_folder(str(tmp_path)):
                    pass
        with run_folder(str(tmp_path)):  # released at the end of the block
            pass

    def test_a_killed_run_leaves_no_stuck_lock(self, tmp_path):
        hold = (f"import time, run_folder\nwith run_folder.run_folder({str(tmp_path)!r}):\n"
                f"    print('locked', flush=True)\n    time.sleep(120)")
        holder = subprocess.Popen([sys.executable, "-c", hold], cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(RunFolderError, match="is in use"):
                with run_folder(str(tmp_path)):
                    pass
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
        with run_folder(str(tmp_path)):  # kill -9 released it
            pass

    def test_a_new_run_into_another_runs_folder_is_refused(self, data_dir, finished_run, tmp_path):
        before = {n: (finished_run / n).read_bytes() for n in os.listdir(finished_run) if not n.startswith(".")}
        with pytest.raises(RunFolderError, match=f"{finished_run} holds the checkpoints of another run \\("
                                                 f"checkpoint.pth, epoch_000.pth, epoch_001.pth\\): continue it with "
                                                 f"`python main_train.py --resume {finished_run}`.*--overwrite"):
            train(data_dir, finished_run, "--epochs", 1)
        assert {n: (finished_run / n).read_bytes() for n in before} == before  # nothing touched, logs included

    def test_overwrite_starts_over(self, data_dir, finished_run, tmp_path):
        run = copy_run(finished_run, tmp_path / "run")
        summary = train(data_dir, run, "--epochs", 1, "--overwrite")
        assert summary["epoch"] == 0
        assert sorted(n for n in os.listdir(run) if not n.startswith(".")) == [
            "checkpoint.pth", "epoch_000.pth", "loss_curve.png", "losses.csv", "test_losses.csv"]
        assert [int(line.split(",")[0]) for line in open(run / "losses.csv").readlines()[1:]] == [1, 2]
        # resuming this run does not inherit --overwrite: it would delete what another folder holds
        assert load_checkpoint(run / "checkpoint.pth")["args"]["overwrite"] is True
        assert parse_train(["--resume", str(run)]).overwrite is False

    def test_resuming_the_folders_own_run_is_allowed_and_stale_temporary_files_go(self, finished_run, tmp_path):
        run = copy_run(finished_run, tmp_path / "run")
        (run / ".epoch_002.pth.x7y8.tmp").write_bytes(b"PK half a checkpoint a killed run left")
        (run / ".losses.csv.a1b2.tmp").write_text("iteration,total")
        main_train.main(parse_train(["--resume", str(run), "--epochs", "3"]))
        assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
        assert load_checkpoint(run / "checkpoint.pth")["epoch"] == 2

    def test_resuming_an_older_checkpoint_of_the_folder_is_refused_or_its_future_deleted(self, finished_run,
                                                                                        tmp_path):
        run = copy_run(finished_run, tmp_path / "run")
        with pytest.raises(RunFolderError, match=f"{run} holds checkpoints newer than {run / 'epoch_000.pth'} "
                                                 f"\\(checkpoint.pth, epoch_001.pth\\).*--overwrite"):
            main_train.main(parse_train(["--resume", str(run / "epoch_000.pth"), "--epochs", "2"]))
        main_train.main(parse_train(["--resume", str(run / "epoch_000.pth"), "--epochs", "2",
                                               "--overwrite"]))
        resumed, straight = load_checkpoint(run / "checkpoint.pth"), load_checkpoint(finished_run / "checkpoint.pth")
        assert resumed["epoch"] == 1  # epoch 1 trained again
        assert learning_history(resumed["history"]) == learning_history(straight["history"])

    def test_the_newest_checkpoint_is_chosen_by_the_epoch_it_holds_not_by_time(self, finished_run, tmp_path):
        run = copy_run(finished_run, tmp_path / "run")
        (run / "checkpoint.pth").write_bytes((run / "epoch_000.pth").read_bytes())  # a stale rolling copy
        for name in os.listdir(run):
            os.utime(run / name, (1000, 1000))  # a copied folder: every file of the same time
        assert latest_checkpoint(str(run)) == str(run / "epoch_001.pth")
        os.utime(run / "checkpoint.pth", (2000, 2000))  # even when the stale one looks newer
        assert latest_checkpoint(str(run)) == str(run / "epoch_001.pth")


class TestInterruptions:
    def test_sigterm_stops_with_one_line_naming_the_checkpoint_to_resume(self, data_dir, tmp_path):
        run = tmp_path / "run"
        process = subprocess.Popen([sys.executable, "main_train.py", *TINY, "--data-dir", data_dir, "--output-dir",
                                    str(run), "--epochs", "500"], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 180
            while not (run / "epoch_001.pth").exists() and time.time() < deadline:
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=120)
        finally:
            process.kill()
        assert process.returncode == 1
        newest = latest_checkpoint(str(run))
        assert error_line(stderr) == (f"error: stopped by signal SIGTERM; the newest checkpoint is {newest}: continue "
                                      f"with python main_train.py --resume {newest}")
        assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
        assert load_checkpoint(newest)["epoch"] >= 1

    def test_a_full_disk_names_the_file_and_the_cause_and_keeps_the_previous_checkpoint(self, data_dir,
                                                                                         finished_run, tmp_path,
                                                                                         monkeypatch):
        run = copy_run(finished_run, tmp_path / "run")
        before = (run / "checkpoint.pth").read_bytes()
        real_save = torch.save

        def full_disk(obj, f, *args, **kwargs):  # torch.save's zip writer reports ENOSPC as a RuntimeError
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

        args = parse_train(["--resume", str(run), "--epochs", "3"])
        monkeypatch.setattr(torch, "save", full_disk)
        with pytest.raises(WriteError) as raised:
            main_train.main(args)
        assert str(raised.value) == f"cannot write {run / 'epoch_002.pth'}: No space left on device"
        monkeypatch.setattr(torch, "save", real_save)
        assert (run / "checkpoint.pth").read_bytes() == before
        assert not [n for n in os.listdir(run) if n.endswith(".tmp")] and not (run / "epoch_002.pth").exists()
        assert stopped_message(args.output_dir, raised.value.strerror) == (
            f"error: cannot write {run / 'epoch_002.pth'}: No space left on device; the newest checkpoint is "
            f"{latest_checkpoint(str(run))}: continue with python main_train.py --resume "
            f"{latest_checkpoint(str(run))}")

    def test_a_programming_error_inside_a_write_is_not_disguised_as_a_disk_error(self, tmp_path):
        def broken(f):
            raise TypeError("a bug in the writer")
        with pytest.raises(TypeError, match="a bug in the writer"):
            atomic_write(str(tmp_path / "file.csv"), broken)
        assert os.listdir(tmp_path) == []

    def test_a_log_line_that_cannot_be_written_names_the_file(self, data_dir, tmp_path, monkeypatch):
        real_open = open

        def no_space(path, mode="r", *args, **kwargs):
            if str(path).endswith("losses.csv") and "a" in mode:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_open(path, mode, *args, **kwargs)
        monkeypatch.setattr("builtins.open", no_space)
        with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'losses.csv'}: No space left on device"):
            train(data_dir, tmp_path, "--epochs", 1)

    def test_a_non_finite_test_loss_stops_like_a_train_loss(self, data_dir, tmp_path, monkeypatch):
        real_loss = SOLOHead.loss

        def nan_in_eval(self, *args):
            losses = real_loss(self, *args)
            return tuple(x * float("nan") for x in losses) if not self.training else losses
        monkeypatch.setattr(SOLOHead, "loss", nan_in_eval)
        with pytest.raises(NonFiniteLossError, match=r"non-finite test loss after epoch 0: total nan.*newest "
                                                     r"checkpoint in .* is the last good one"):
            train(data_dir, tmp_path, "--epochs", 2)
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".pth")]
        assert open(tmp_path / "test_losses.csv").read() == "epoch,total_loss,focal_loss,dice_loss\n"

    @pytest.mark.slow  # subprocesses of the scripts, each importing torch
    def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_result(self, data_dir, finished_run, tmp_path):
        run = tmp_path / "run"
        command = ["main_train.py", *TINY, "--data-dir", data_dir, "--output-dir", str(run), "--epochs", "2"]
        process = subprocess.Popen([sys.executable, *command], cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while not (run / "epoch_000.pth").exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # during epoch 1, or while epoch 0's files are written
        process.wait(timeout=30)
        code, _, stderr = script("main_train.py", "--resume", str(run), "--epochs", "2")
        assert code == 0, stderr
        straight, resumed = load_checkpoint(finished_run / "checkpoint.pth"), load_checkpoint(run / "checkpoint.pth")
        assert all(torch.equal(v, resumed["model"][k]) for k, v in straight["model"].items())
        assert learning_history(straight["history"]) == learning_history(resumed["history"])


class TestBadCheckpointsInInference:
    def test_nan_weights_are_refused_naming_the_file(self, finished_run, tmp_path):
        checkpoint = load_checkpoint(finished_run / "checkpoint.pth")
        checkpoint["model"]["head.cate_out.bias"][0] = float("nan")
        path = tmp_path / "nan.pth"
        torch.save(checkpoint, path)
        with pytest.raises(CheckpointError, match=f"checkpoint {path} holds NaN or infinite weights \\(1 tensors, "
                                                  f"the first head.cate_out.bias\\)"):
            load_model(str(path))
        code, _, stderr = script("main_infer.py", "--checkpoint", str(path), "--device", "cpu")
        assert code == 1 and error_line(stderr).startswith(f"error: checkpoint {path} holds NaN")

    @pytest.mark.parametrize("edit, message", [
        (dict(input_height="sixty-four"), r"its stored setting input_height='sixty-four' is not a int"),
        (dict(input_height=None), r"its stored settings lack \['input_height'\]"),
    ], ids=["wrong type", "missing"])
    def test_main_infer_refuses_hand_edited_settings_naming_the_file(self, finished_run, tmp_path, edit, message):
        checkpoint = load_checkpoint(finished_run / "checkpoint.pth")
        checkpoint["args"].update(edit)
        checkpoint["args"] = {k: v for k, v in checkpoint["args"].items() if v is not None}
        path = tmp_path / "edited.pth"
        torch.save(checkpoint, path)
        with pytest.raises(CheckpointError, match=f"checkpoint {path}: " + message):
            main_infer.main(main_infer.get_args_parser().parse_args(["--checkpoint", str(path), "--device", "cpu"]))

    def test_a_hand_edited_setting_is_refused_naming_the_file(self, finished_run, tmp_path):
        checkpoint = load_checkpoint(finished_run / "checkpoint.pth")
        checkpoint["args"]["input_height"] = "sixty-four"
        (tmp_path / "run").mkdir()
        path = tmp_path / "run" / "checkpoint.pth"
        torch.save(checkpoint, path)
        with pytest.raises(CheckpointError, match=f"checkpoint {path}: its stored setting input_height='sixty-four' "
                                                  f"is not a int"):
            parse_train(["--resume", str(path)])


# ----------------------------------------------------------------------------------------------------
# Data files
# ----------------------------------------------------------------------------------------------------
def tiny_items(boxes=None, masks=None):
    """Two 30 x 40 images with one object each, for write_dataset."""
    image = np.zeros((3, 30, 40), np.uint8)
    mask = np.zeros((1, 30, 40), np.uint8)
    mask[0, 5:15, 5:20] = 1
    masks = [mask, mask] if masks is None else masks
    boxes = [np.array([[5, 5, 20, 15]], np.float32)] * 2 if boxes is None else boxes
    return [(image, m, np.array([1]), b) for m, b in zip(masks, boxes)]


class Marker:
    """Unpickling this writes a marker file: what a crafted .npy could do with np.load(allow_pickle=True)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


class TestDataFiles:
    def test_a_crafted_npy_cannot_run_code(self, tmp_path):
        paths = write_dataset(str(tmp_path), tiny_items(), 2, 30, 40)
        marker = tmp_path / "marker"
        crafted = np.empty(2, dtype=object)
        crafted[0], crafted[1] = np.array([1]), Marker(str(marker))
        np.save(paths[2], crafted, allow_pickle=True)
        with pytest.raises(DataError, match=f"labels file {paths[2]} is not a readable .npy file of numpy arrays "
                                            f"\\(UnpicklingError: it refers to io.open, which an array of numpy "
                                            f"arrays never does\\)"):
            BuildDataset(paths)
        assert not marker.exists()

    def test_a_truncated_npy_names_the_file(self, tmp_path):
        paths = write_dataset(str(tmp_path), tiny_items(), 2, 30, 40)
        data = open(paths[3], "rb").read()
        open(paths[3], "wb").write(data[:len(data) - 40])
        with pytest.raises(DataError, match=f"bboxes file {paths[3]} is not a readable .npy file"):
            BuildDataset(paths)

    def test_a_corrupt_image_names_the_file_and_the_image_even_inside_the_loader(self, tmp_path):
        paths = write_synthetic_dataset(str(tmp_path), num_images=8, seed=0, workers=1)
        with h5py.File(paths[0], "r") as f:
            offset, size = f["data"].id.get_chunk_info(5).byte_offset, f["data"].id.get_chunk_info(5).size
        with open(paths[0], "r+b") as f:  # scramble the middle of image 5's compressed block
            f.seek(offset + size // 2)
            f.write(bytes(range(256)) * 4)
        dataset = BuildDataset(paths, input_height=64)
        dataset[4]  # the others read fine
        with pytest.raises(DataError, match=f"images file {paths[0]}: image 5 cannot be read"):
            dataset[5]
        loader = BuildDataLoader(torch.utils.data.Subset(dataset, [5]), 1, False, 1).loader()
        with pytest.raises(DataError, match=f"images file {paths[0]}: image 5 cannot be read"):
            next(iter(loader))

    def test_boxes_beyond_the_image_are_clipped_and_said_once(self, tmp_path, capsys):
        boxes = [np.array([[-10, 5, 20, 15]], np.float32), np.array([[5, 5, 1e30, 15]], np.float32)]
        paths = write_dataset(str(tmp_path), tiny_items(boxes), 2, 30, 40)
        dataset = BuildDataset(paths, input_height=64)
        assert dataset.bboxes[0].tolist() == [[0, 5, 20, 15]] and dataset.bboxes[1].tolist() == [[5, 5, 40, 15]]
        BuildDataset(paths, input_height=64)  # the test split reads it again
        assert capsys.readouterr().out.count(f"warning: bboxes file {paths[3]}: 2 boxes reach beyond the 30x40 "
                                             f"images; they are clipped to them") == 1

    @pytest.mark.parametrize("box, message", [
        ([[50, 5, 60, 15]], r"image 1 has a box outside the 30x40 image: \[50.0, 5.0, 60.0, 15.0\]"),
        ([[5, 5, float("inf"), 15]], r"image 1 has a box that is not finite"),
    ], ids=["outside", "infinite"])
    def test_boxes_that_cannot_be_right_are_refused(self, tmp_path, box, message):
        paths = write_dataset(str(tmp_path), tiny_items([np.array([[5, 5, 20, 15]], np.float32),
                                                         np.array(box, np.float32)]), 2, 30, 40)
        with pytest.raises(DataError, match=f"bboxes file {paths[3]}: " + message):
            BuildDataset(paths)

    def test_a_corrupt_first_mask_names_the_file(self, tmp_path):
        paths = write_synthetic_dataset(str(tmp_path), num_images=4, seed=0, workers=1)
        with h5py.File(paths[1], "r") as f:
            info = f["data"].id.get_chunk_info(0)
        with open(paths[1], "r+b") as f:
            f.seek(info.byte_offset + info.size // 2)
            f.write(bytes(range(256)))
        with pytest.raises(DataError, match=f"masks file {paths[1]}: its first .* masks cannot be read"):
            BuildDataset(paths)

    def test_a_dataset_whose_masks_are_all_empty_is_refused(self, tmp_path):
        empty = np.zeros((1, 30, 40), np.uint8)
        paths = write_dataset(str(tmp_path), tiny_items(masks=[empty, empty]), 2, 30, 40)
        with pytest.raises(DataError, match=f"masks file {paths[1]}: its first 2 masks are all empty"):
            BuildDataset(paths)

    @pytest.mark.slow  # subprocesses of the scripts, each importing torch
    def test_scripts_print_one_error_line(self, tmp_path):
        paths = write_dataset(str(tmp_path / "data"), tiny_items(), 2, 30, 40)
        open(paths[2], "wb").write(b"not an npy file")
        code, _, stderr = script("main_train.py", *TINY, "--data-dir", str(tmp_path / "data"), "--output-dir",
                                 str(tmp_path / "run"))
        assert code == 1 and error_line(stderr).startswith(f"error: labels file {paths[2]} is not a readable")
        code, _, stderr = script("dataset.py", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "fig"))
        assert code == 1 and error_line(stderr).startswith(f"error: labels file {paths[2]} is not a readable")
        code, _, stderr = script("main_train.py", "--input-height", "100")
        assert code == 2 and "input_height 100 is not a multiple of 32" in stderr and "Traceback" not in stderr
        code, _, stderr = script("main_train.py", "--set", "seg_feat_channels=48")
        assert code == 2 and "seg_feat_channels 48 must be a multiple of 32" in stderr and "Traceback" not in stderr
        if not torch.cuda.is_available():
            code, _, stderr = script("main_infer.py", "--device", "cuda", "--checkpoint-dir", str(tmp_path))
            assert code == 1 and error_line(stderr) == ("error: --device cuda, but CUDA is not available here: pass "
                                                        "--device cpu")

    @pytest.mark.slow  # a training subprocess
    def test_an_error_inside_a_loader_worker_is_one_line_too(self, tmp_path):
        paths = write_synthetic_dataset(str(tmp_path / "data"), num_images=5, seed=0, workers=1)
        with h5py.File(paths[0], "r") as f:
            info = f["data"].id.get_chunk_info(2)
        with open(paths[0], "r+b") as f:  # image 2, in the train or the test split: read by a worker either way
            f.seek(info.byte_offset + info.size // 2)
            f.write(bytes(range(256)) * 4)
        code, _, stderr = script("main_train.py", *TINY[:-2], "--workers", "1", "--data-dir", str(tmp_path / "data"),
                                 "--output-dir", str(tmp_path / "run"), "--epochs", "1")
        assert code == 1 and error_line(stderr).startswith(f"error: images file {paths[0]}: image 2 cannot be read")

    def test_error_message_keeps_a_workers_original_message(self):
        wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                            "last):\n  File \"x.py\", line 1, in f\n    g()\ndatafiles.DataError: images file a.h5: "
                            "image 5 cannot be read (OSError: broken)\n")
        assert error_message(wrapped) == "images file a.h5: image 5 cannot be read (OSError: broken)"
        assert error_message(DataError("one line")) == "one line"


# ----------------------------------------------------------------------------------------------------
# Your own photos
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_dir(finished_run):
    return str(finished_run)


def photo(path, size, mode="RGB", seed=0):
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3) if mode == "RGB" else size, dtype=np.uint8)
    Image.fromarray(array).save(path)


def infer_photos(checkpoint_dir, folder, out, *extra):
    return main_infer.main(main_infer.get_args_parser().parse_args(
        ["--checkpoint-dir", checkpoint_dir, "--device", "cpu", "--images", str(folder), "--figures-dir", str(out),
         "--plot-score-thresh", "0", *extra]))


class TestPhotos:
    def test_bad_files_are_skipped_one_warning_each_the_rest_processed(self, checkpoint_dir, tmp_path, capsys):
        folder = tmp_path / "photos"
        folder.mkdir()
        photo(folder / "good.jpg", (60, 80))
        photo(folder / "good2.png", (50, 50), mode="L")
        (folder / "empty.png").write_bytes(b"")
        (folder / "notes.png").write_text("a text file named .png")
        good = (folder / "good.jpg").read_bytes()
        (folder / "truncated.jpg").write_bytes(good[:len(good) // 2])
        (folder / "x.png").mkdir()
        result = infer_photos(checkpoint_dir, folder, tmp_path / "out")
        assert sorted(os.path.basename(p) for p in result["overlays"]) == ["good2_png_infer.png", "good_jpg_infer.png"]
        assert sorted(result["skipped"]) == ["empty.png", "notes.png", "truncated.jpg", "x.png"]
        out = capsys.readouterr()
        for name in result["skipped"]:
            assert out.err.count(f"warning: skipped {folder / name}: ") + out.out.count(
                f"warning: skipped {folder / name}: ") == 1, name
        assert "warning: skipped " + str(folder / "x.png") + ": it is a folder" in out.err + out.out
        assert "wrote 2 overlays to " + str(tmp_path / "out") + ", skipped 4 photos" in out.out

    @pytest.mark.slow  # subprocesses of the scripts, each importing torch
    def test_the_script_fails_only_when_no_photo_could_be_read(self, checkpoint_dir, tmp_path):
        folder = tmp_path / "photos"
        folder.mkdir()
        (folder / "a.png").write_text("not an image")
        code, _, stderr = script("main_infer.py", "--checkpoint-dir", checkpoint_dir, "--device", "cpu",
                                 "--images", str(folder), "--figures-dir", str(tmp_path / "out"))
        assert code == 1 and error_line(stderr) == "error: none of the 1 photos could be read"
        photo(folder / "b.png", (40, 40))
        code, stdout, stderr = script("main_infer.py", "--checkpoint-dir", checkpoint_dir, "--device", "cpu",
                                      "--images", str(folder), "--figures-dir", str(tmp_path / "out"))
        assert code == 0 and "wrote 1 overlays" in stdout, stderr

    def test_extreme_aspect_ratios_and_huge_photos(self, checkpoint_dir, tmp_path):
        folder = tmp_path / "photos"
        folder.mkdir()
        photo(folder / "strip.png", (3000, 10))
        photo(folder / "banner.png", (10, 3000))
        Image.new("RGB", (8000, 6000), (90, 120, 150)).save(folder / "huge.jpg", quality=80)
        assert imagefiles.load_photo(str(folder / "huge.jpg")).shape == (3, 1200, 1600)  # shrunk first
        assert imagefiles.letterbox(imagefiles.load_photo(str(folder / "strip.png"))).shape == (3, 1600, 400)
        result = infer_photos(checkpoint_dir, folder, tmp_path / "out")
        assert len(result["overlays"]) == 3 and not result["skipped"]
        for name, size in (("strip_png_infer.png", (3000, 10)), ("banner_png_infer.png", (10, 3000))):
            assert os.path.getsize(tmp_path / "out" / name) > 0, name

    def test_names_stay_unique_and_subfolders_are_searched_only_when_asked(self, checkpoint_dir, tmp_path, capsys):
        folder = tmp_path / "photos"
        (folder / "trip").mkdir(parents=True)
        photo(folder / "same.jpg", (40, 60))
        photo(folder / "same.png", (40, 60), seed=1)
        photo(folder / "trip" / "beach.jpg", (40, 60), seed=2)
        result = infer_photos(checkpoint_dir, folder, tmp_path / "out")
        assert sorted(os.path.relpath(p, tmp_path / "out") for p in result["overlays"]) == [
            "same_jpg_infer.png", "same_png_infer.png"]
        assert "1 subfolders not searched (--recursive)" in capsys.readouterr().out
        result = infer_photos(checkpoint_dir, folder, tmp_path / "out2", "--recursive")
        assert sorted(os.path.relpath(p, tmp_path / "out2") for p in result["overlays"]) == [
            "same_jpg_infer.png", "same_png_infer.png", os.path.join("trip", "beach_jpg_infer.png")]


# ----------------------------------------------------------------------------------------------------
# Reliability, second round (issue 24): a stop signal inside a checkpoint write, a full disk at the run folder's
# lock and inside the synthetic set, two runs writing one synthetic set, DataLoader workers outliving kill -9
# ----------------------------------------------------------------------------------------------------
import contextlib  # noqa: E402  (this section's)
import socket  # noqa: E402

from dataset import resolve_data_dir, write_synthetic_if_missing  # noqa: E402


def patched_script(preamble, name, *argv, timeout=240):
    """Run the script `name` as a user does, after the Python code `preamble` (a fault probe's patches) ran in the
    same process: (return code, stdout, stderr)."""
    code = (f"{preamble}\nimport runpy, sys\nsys.argv = {[name, *map(str, argv)]!r}\n"
            f"runpy.run_path({name!r}, run_name='__main__')")
    return script("-c", code, timeout=timeout)


# torch.save sends its own process SIGTERM (once or twice) half-way through writing epoch 1's checkpoint
SIGNAL_WHILE_SAVING = """
import os, signal, torch
real_save = torch.save

class Halfway:
    def __init__(self, f, signals):
        self.f, self.written, self.signals = f, 0, signals

    def write(self, data):
        self.written += len(memoryview(data).cast("B"))
        if self.signals and self.written > (3 - self.signals) << 20:  # the last at 2 MiB, a first of two at 1
            self.signals -= 1
            os.kill(os.getpid(), signal.SIGTERM)
        return self.f.write(data)

    def flush(self):
        self.f.flush()

def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("epoch") == 1:
        f = Halfway(f, SIGNALS)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
"""


class TestRoundTwoTraining:
    @pytest.mark.parametrize("signals", [1, 2], ids=["one signal", "a second signal"])
    def test_a_stop_signal_while_a_checkpoint_is_written_ends_with_one_line(self, data_dir, tmp_path, signals):
        # one signal waits for the checkpoint being written; a second abandons it (torch's zip writer turns the
        # KeyboardInterrupt into 'RuntimeError: [enforce fail at inline_container.cc] unexpected pos')
        run = tmp_path / "run"
        code, _, stderr = patched_script(f"SIGNALS = {signals}\n" + SIGNAL_WHILE_SAVING, "main_train.py", *TINY,
                                         "--data-dir", data_dir, "--output-dir", run, "--epochs", 3)
        newest = latest_checkpoint(str(run))
        assert code == 1, stderr
        assert error_line(stderr) == (f"error: stopped by signal SIGTERM; the newest checkpoint is {newest}: continue "
                                      f"with python main_train.py --resume {newest}")
        assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
        assert load_checkpoint(run / "epoch_000.pth")["epoch"] == 0  # the previous checkpoint, intact
        # one signal: epoch 1's checkpoint is finished, then the run stops; two: it is abandoned
        assert load_checkpoint(newest)["epoch"] == (1 if signals == 1 else 0)
        assert (run / "epoch_001.pth").exists() == (signals == 1) and not (run / "epoch_002.pth").exists()

    @pytest.mark.parametrize("failing", ["creating", "writing"])
    def test_a_full_disk_at_the_lock_names_the_lock_file_and_leaves_none(self, tmp_path, monkeypatch, failing):
        lock = tmp_path / "run" / ".lock"
        real_open, real_write = os.open, os.write

        def no_space():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(lock))

        def open_(path, flags, *args, **kwargs):
            if failing == "creating" and os.fspath(path) == str(lock) and flags & os.O_CREAT:
                no_space()
            return real_open(path, flags, *args, **kwargs)

        def write(fd, data):  # an empty file is created on a full disk, its first block is not
            if failing == "writing" and lock.exists() and os.path.samestat(os.fstat(fd), os.stat(lock)):
                no_space()
            return real_write(fd, data)
        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "write", write)
        with pytest.raises(WriteError) as raised:
            with run_folder(str(tmp_path / "run")):
                pass
        assert str(raised.value) == f"cannot write {lock}: No space left on device"
        assert not lock.exists()
        monkeypatch.undo()
        with run_folder(str(tmp_path / "run")):  # nothing stuck
            assert lock.exists()

    def test_main_train_says_one_line_when_the_lock_cannot_be_written(self, data_dir, tmp_path):
        run = tmp_path / "run"
        preamble = (f"import errno, os\nreal_write = os.write\nlock = {str(run / '.lock')!r}\n"
                    f"def write(fd, data):\n"
                    f"    if os.path.exists(lock) and os.path.samestat(os.fstat(fd), os.stat(lock)):\n"
                    f"        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), lock)\n"
                    f"    return real_write(fd, data)\n"
                    f"os.write = write")
        code, _, stderr = patched_script(preamble, "main_train.py", *TINY, "--data-dir", data_dir, "--output-dir",
                                         run, "--epochs", 1)
        assert code == 1
        assert error_line(stderr) == (f"error: cannot write {run / '.lock'}: No space left on device; no checkpoint "
                                      f"was written")
        assert os.listdir(run) == []

    def test_forked_workers_do_not_inherit_the_run_folders_lock(self, tmp_path):
        # a DataLoader worker is a fork of the run; after kill -9 of the run it lives on for seconds
        hold = (f"import os, time, run_folder\nwith run_folder.run_folder({str(tmp_path)!r}):\n"
                f"    worker = os.fork()\n    if worker == 0:\n        time.sleep(120)\n        os._exit(0)\n"
                f"    print(worker, flush=True)\n    time.sleep(120)")
        holder = subprocess.Popen([sys.executable, "-c", hold], cwd=REPO, stdout=subprocess.PIPE, text=True)
        worker = None
        try:
            worker = int(holder.stdout.readline())
            with pytest.raises(RunFolderError, match=f"in use by a training run \\(process {holder.pid} on "):
                with run_folder(str(tmp_path)):
                    pass
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
            os.kill(worker, 0)  # the worker still lives ...
            with run_folder(str(tmp_path)):  # ... and holds nothing
                pass
        finally:
            holder.kill()
            holder.wait(timeout=30)
            holder.stdout.close()
            if worker:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGKILL)


class TestRoundTwoSyntheticSet:
    def test_a_full_disk_while_the_synthetic_set_is_written_leaves_no_partial_set(self, tmp_path, monkeypatch):
        import synthetic
        real_write = synthetic.write_dataset

        def full_disk(out_dir, items, *args, **kwargs):
            def failing():  # two images into the h5 files, then the disk is full
                for i, item in enumerate(items):
                    if i == 2:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    yield item
            return real_write(out_dir, failing(), *args, **kwargs)
        monkeypatch.setattr(synthetic, "write_dataset", full_disk)
        folder = tmp_path / "synthetic_4_paletteshared"
        with pytest.raises(WriteError) as raised:
            resolve_data_dir(str(tmp_path), 4)
        assert str(raised.value) == f"cannot write {folder}: No space left on device"
        assert os.listdir(tmp_path) == []  # no set, no temporary folder
        monkeypatch.undo()
        gone = subprocess.Popen([sys.executable, "-c", "pass"])  # a writer killed with kill -9 left its copy
        gone.wait(timeout=60)
        (tmp_path / f".synthetic_4_paletteshared.{gone.pid}@{socket.gethostname()}.0123abcd.tmp").mkdir()
        assert resolve_data_dir(str(tmp_path), 4) == str(folder)
        assert len(BuildDataset(write_synthetic_if_missing(str(folder), 4))) == 4
        assert os.listdir(tmp_path) == ["synthetic_4_paletteshared"]

    def test_two_processes_writing_one_synthetic_set_at_once_both_use_it(self, tmp_path):
        marks, folder = tmp_path / "marks", tmp_path / "data" / "synthetic_4"
        marks.mkdir()
        # each writer waits, its h5 files open, until the other is writing too
        code = (f"import os, sys, time, numpy, dataset, synthetic\nreal = synthetic._rendered_images\n"
                f"def together(*args):\n    items = real(*args)\n    yield next(items)\n"
                f"    open(os.path.join({str(marks)!r}, sys.argv[1]), 'w').close()\n"
                f"    deadline = time.time() + 60\n"
                f"    while len(os.listdir({str(marks)!r})) < 2 and time.time() < deadline:\n"
                f"        time.sleep(0.05)\n    yield from items\n"
                f"synthetic._rendered_images = together\n"
                f"paths = dataset.write_synthetic_if_missing({str(folder)!r}, num_images=4, workers=1)\n"
                f"data = dataset.BuildDataset(paths)\n"
                f"print(len(data), [label.tolist() for label in data.labels])")
        writers = [subprocess.Popen([sys.executable, "-c", code, name], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
        results = [writer.communicate(timeout=180) for writer in writers]
        assert [writer.returncode for writer in writers] == [0, 0], results
        assert sorted(os.listdir(marks)) == ["a", "b"]  # they did write at the same time
        outputs = [out.splitlines()[-1] for out, _ in results]
        assert outputs[0] == outputs[1] and outputs[0].startswith("4 [")
        assert os.listdir(tmp_path / "data") == ["synthetic_4"]  # the loser's temporary folder is gone
