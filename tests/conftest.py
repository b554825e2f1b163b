"""Shared pytest fixtures. Add new fixtures below; keep existing ones unchanged."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules are flat files at the repository root


@pytest.fixture(scope="session")
def synthetic_paths(tmp_path_factory):
    """Paths [images_h5, masks_h5, labels_npy, bboxes_npy] of a 12-image synthetic dataset (seed 0)."""
    from synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), num_images=12, seed=0, workers=1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: torch.compile and similar, a minute or more on 2 CPU cores")
