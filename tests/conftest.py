"""Shared pytest fixtures. Add new fixtures below; keep existing ones unchanged."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules are flat files at the repository root
os.environ.setdefault("MPLBACKEND", "Agg")  # figures are saved, never shown (a script chooses Agg itself)


def parse_train(argv):
    """main_train.py's resolved settings for the command line argv (its parser's parse_args)."""
    import main_train

    return main_train.get_args_parser().parse_args(argv)


@pytest.fixture(scope="session")
def synthetic_paths(tmp_path_factory):
    """Paths [images_h5, masks_h5, labels_npy, bboxes_npy] of a 12-image synthetic dataset (seed 0)."""
    from synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_images=12, seed=0, workers=1)



@pytest.fixture(scope="session")
def three_images(tmp_path_factory):
    """The folder of a 3-image synthetic dataset (seed 0): 2 train images and 1 test image, for tiny runs."""
    from synthetic import write_synthetic_dataset

    directory = tmp_path_factory.mktemp("three_images")
    write_synthetic_dataset(str(directory), num_images=3, seed=0, workers=1)
    return str(directory)


class ReportsCuda(torch.Tensor):
    """A CPU tensor whose .device says cuda:0, so that code branching on the device type takes its GPU branch;
    the arithmetic still runs on the CPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def learning_history(history):
    """A checkpoint's history without the wall-clock times: what a resumed run must repeat exactly."""
    return {key: value for key, value in history.items() if key != "epoch_times"}


def assert_same_training_state(straight, resumed):
    """Two checkpoints of the same run, one resumed: the same weights, momentum and learning history, bit for bit."""
    assert straight["model"].keys() == resumed["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert learning_history(straight["history"]) == learning_history(resumed["history"])
