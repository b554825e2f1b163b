"""colab.ipynb: valid nbformat; run top to bottom twice by nbclient with the tiny CPU configuration, the local
disk wiped in between (a Colab disconnect), it trains, resumes from the Drive copy, infers and writes the report."""
import os
import shutil
import subprocess

import pytest

import run_folder
from checkpoint import latest_checkpoint, load_checkpoint
from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
NOTEBOOK = os.path.join(ROOT, "colab.ipynb")


def test_the_notebook_is_valid_and_every_code_cell_has_a_line_saying_what_it_does():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    cells = notebook.cells
    for k, cell in enumerate(cells):
        if cell.cell_type == "code":
            assert k > 0 and cells[k - 1].cell_type == "markdown" and cells[k - 1].source.strip(), k


def test_the_placeholder_repository_address_stops_the_clone_cell_with_what_to_set(tmp_path, monkeypatch):
    cells = [cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]
    settings, clone = cells[0], next(source for source in cells if '"clone"' in source)
    monkeypatch.delenv("SOLO_REPO_URL", raising=False)
    monkeypatch.setenv("SOLO_WORKDIR", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    namespace = {}
    exec(settings, namespace)
    with pytest.raises(ValueError, match="set REPO_URL in the settings cell"):
        exec(clone, namespace)


def test_mirror_folder_copies_new_versions_and_an_interrupted_copy_keeps_the_old_file(tmp_path, monkeypatch):
    src, dst = tmp_path / "run", tmp_path / "drive"
    src.mkdir()
    (src / "epoch_000.pth").write_bytes(b"a" * 10)
    (src / ".lock").write_text("process 1")
    assert run_folder.mirror_folder(str(src), str(dst)) == ["epoch_000.pth"]
    assert run_folder.mirror_folder(str(src), str(dst)) == []  # unchanged: not copied again
    (src / "epoch_000.pth").write_bytes(b"b" * 20)

    def cut_short(source, target):
        with open(target, "wb") as f:
            f.write(b"b" * 3)
        raise OSError("Drive went away")
    monkeypatch.setattr(run_folder.shutil, "copy2", cut_short)
    with pytest.raises(OSError, match="Drive went away"):
        run_folder.mirror_folder(str(src), str(dst))
    assert (dst / "epoch_000.pth").read_bytes() == b"a" * 10 and os.listdir(dst) == ["epoch_000.pth"]


def test_mirror_folder_copies_a_hard_linked_checkpoint_once(tmp_path):
    # checkpoint.pth links the newest epoch file: Drive keeps one copy; a checkpoint.pth of its own is copied
    src, dst = tmp_path / "run", tmp_path / "drive"
    src.mkdir()
    (src / "epoch_001.pth").write_bytes(b"a" * 10)
    os.link(src / "epoch_001.pth", src / "checkpoint.pth")
    assert run_folder.mirror_folder(str(src), str(dst)) == ["epoch_001.pth"]
    assert os.listdir(dst) == ["epoch_001.pth"]
    (src / "checkpoint.pth").unlink()
    (src / "checkpoint.pth").write_bytes(b"c" * 10)  # a filesystem without hard links: a copy
    assert run_folder.mirror_folder(str(src), str(dst)) == ["checkpoint.pth"]


def test_mirror_folder_drops_the_epochs_the_run_removed_and_a_wiped_run_removes_nothing(tmp_path, monkeypatch):
    src, dst = tmp_path / "run", tmp_path / "drive"
    src.mkdir()
    dst.mkdir()
    for epoch in range(4):
        (dst / f"epoch_{epoch:03d}.pth").write_bytes(b"old")
    (dst / "losses.csv").write_text("iteration\n")
    shutil.rmtree(src)
    src.mkdir()  # the local disk wiped: Drive keeps everything
    assert run_folder.mirror_folder(str(src), str(dst)) == [] and len(os.listdir(dst)) == 5
    for epoch in (2, 3, 4):  # --keep-epochs 3 after epoch 4
        (src / f"epoch_{epoch:03d}.pth").write_bytes(b"newer")

    def cut_short(source, target):
        raise OSError("Drive went away")
    with monkeypatch.context() as m:  # a copy cut short removes nothing either
        m.setattr(run_folder.shutil, "copy2", cut_short)
        with pytest.raises(OSError, match="Drive went away"):
            run_folder.mirror_folder(str(src), str(dst))
    assert len(os.listdir(dst)) == 5
    assert run_folder.mirror_folder(str(src), str(dst)) == ["epoch_002.pth", "epoch_003.pth", "epoch_004.pth"]
    assert sorted(os.listdir(dst)) == ["epoch_002.pth", "epoch_003.pth", "epoch_004.pth", "losses.csv"]


@pytest.mark.slow
def test_the_notebook_trains_resumes_after_a_disconnect_and_writes_the_report(tmp_path):
    # the repository as Colab would clone it: this working tree's files (committed or not) in a git repository
    source = tmp_path / "origin"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(source / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), source / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q", str(source)], check=True)
    subprocess.run(git + ["-C", str(source), "add", "-A"], check=True)
    subprocess.run(git + ["-C", str(source), "commit", "-qm", "snapshot"], check=True)
    work, drive = tmp_path / "content", tmp_path / "drive"
    env = dict(SOLO_NOTEBOOK_TINY="1", SOLO_REPO_URL=str(source), SOLO_WORKDIR=str(work), SOLO_DRIVE_DIR=str(drive),
               SOLO_RUN="tiny")

    def run_notebook(epochs):
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        os.environ.update(env, SOLO_EPOCHS=str(epochs))
        try:
            nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                    resources={"metadata": {"path": str(tmp_path)}}).execute()
        finally:
            for key in (*env, "SOLO_EPOCHS"):
                os.environ.pop(key, None)
        return "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))

    first = run_notebook(epochs=1)
    assert "new run in" in first
    assert load_checkpoint(latest_checkpoint(drive / "tiny"))["epoch"] == 0
    shutil.rmtree(work / "runs")  # the disconnect: Colab's local disk is gone, Drive keeps the run
    second = run_notebook(epochs=2)
    assert "from Drive:" in second and "resuming from" in second
    newest = latest_checkpoint(drive / "tiny")
    assert os.path.basename(newest) == "epoch_001.pth", os.listdir(drive / "tiny")  # one copy of checkpoint.pth
    assert load_checkpoint(newest)["epoch"] == 1  # continued, not restarted
    history = load_checkpoint(newest)["history"]
    assert [row[0] for row in history["test"]] == [0, 1]
    for name in ("report.html", "report.pdf"):
        assert (drive / "tiny" / "report" / name).stat().st_size > 0
