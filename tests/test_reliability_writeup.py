"""What a failure or a stop may leave of the write-up and of the notebook's Drive copy (issue 24, second round):
- report.py: a cached figure that does not load is made again (and the PDF keeps every page); report.html,
  report.pdf and the figures of plots.save_figure are written whole or not at all, so a failure or a kill half-way
  (a real SIGTERM to a real report.py) leaves the previous files byte for byte and no temporary file; a stopped
  report leaves its report folder and figures/ in place, empty if no figure was made yet, and the next run removes
  the temporary files a kill -9 left.
- run_folder.mirror_folder: temporary files of earlier, interrupted copies are removed from the copy, an interrupted
  copy leaves none, and a file the run removes while it is listed or copied is skipped.
- run_folder.run_mirrored: a failed copy while training is a warning and the final copy always runs; SIGINT to it
  (the notebook's stop button, real processes) reaches the training process, which ends, the last files are
  copied, and the notebook cell shows one line."""
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import matplotlib.figure
import matplotlib.pyplot as plt
import pytest
from matplotlib.backends.backend_pdf import PdfPages

import main_train
import report
import run_folder
from conftest import ROOT, parse_train
from plots import save_figure

NUM = 2  # images per figure set
PAGES = 3 * NUM + 5


def report_args(run, *extra):
    return report.get_args_parser().parse_args(["--checkpoint-dir", str(run), "--workers", "0", "--num-figures",
                                                str(NUM), "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-epoch run on 40 synthetic images and its report (<run>/report): (run folder, report.main's result)."""
    root = tmp_path_factory.mktemp("reliability_run")
    main_train.main(parse_train(["--demo", "--synthetic", "40", "--epochs", "1", "--workers", "0",
                                 "--data-dir", str(root / "data"), "--output-dir", str(root / "run")]))
    result = report.main(report_args(root / "run"))
    assert result["pages"] == PAGES
    return root / "run", result


def temporaries(*folders):
    return [name for folder in folders for name in os.listdir(folder) if name.endswith(".tmp")]


def pdf_pages(path):
    pypdf = pytest.importorskip("pypdf")
    return len(pypdf.PdfReader(str(path)).pages)


# ----------------------------------------------------------------------------------------------------
# report.py
# ----------------------------------------------------------------------------------------------------
def test_a_cached_figure_that_does_not_load_is_made_again_and_the_pdf_keeps_every_page(tiny_run, capsys):
    run, result = tiny_run
    out, figures = run / "report", run / "report" / "figures"
    (figures / "dataset_0.png").write_bytes(b"")  # the probe's 0-byte figure
    overlay = figures / "infer_1.png"
    overlay.write_bytes(overlay.read_bytes()[:200])  # cut short
    (figures / ".dataset_1.png.0badc0de.tmp").write_bytes(b"half")  # what kill -9 leaves
    (out / ".report.pdf.0badc0de.tmp").write_bytes(b"%PDF-half")
    capsys.readouterr()
    again = report.main(report_args(run))
    printed = capsys.readouterr().out
    assert f"dataset figures: {figures / 'dataset_0.png'} is missing or does not load: making it again" in printed
    assert f"inference overlays: {overlay} is missing or does not load" in printed
    assert "target plots: reused" in printed and "evaluation: reused" in printed
    assert all(plt.imread(str(p)).size for p in (figures / "dataset_0.png", overlay))  # made again, whole
    assert again["pages"] == pdf_pages(again["pdf"]) == PAGES
    assert temporaries(out, figures) == []


def fails_after_one(real):
    """real, raising RuntimeError('cut short') from its second call on."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("cut short")
        return real(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("where", ["pdf", "html"])
def test_a_failure_half_way_through_the_pdf_or_the_page_keeps_the_previous_files(tiny_run, monkeypatch, where):
    run, result = tiny_run
    out = os.path.dirname(result["pdf"])
    before = {path: open(path, "rb").read() for path in (result["pdf"], result["html"])}
    if where == "pdf":  # the PDF writer fails after its first page
        monkeypatch.setattr(PdfPages, "savefig", fails_after_one(PdfPages.savefig))
    else:  # the page fails after embedding its first figure
        monkeypatch.setattr(base64, "b64encode", fails_after_one(base64.b64encode))
    with pytest.raises(RuntimeError, match="cut short"):
        report.main(report_args(run))
    monkeypatch.undo()
    assert open(result["pdf"], "rb").read() == before[result["pdf"]] and pdf_pages(result["pdf"]) == PAGES
    if where == "html":  # written before the PDF, which the failure never reached
        assert open(result["html"], "rb").read() == before[result["html"]]
    assert temporaries(out) == []


def test_a_figure_that_fails_half_way_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "figure.png"
    fig, _ = plt.subplots()
    save_figure(fig, str(path))
    before = path.read_bytes()

    def half(self, f, **kwargs):
        f.write(before[:100])
        raise RuntimeError("killed half-way")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half)
    with pytest.raises(RuntimeError, match="killed half-way"):
        save_figure(plt.subplots()[0], str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["figure.png"]


def last_line(text):
    return (text.strip().splitlines() or [""])[-1]


def start_report(run, out, stop_when):
    """A real report.py on run writing into out, sent SIGTERM as soon as stop_when() holds: (exit code, stderr)."""
    process = subprocess.Popen([sys.executable, "report.py", "--checkpoint-dir", str(run), "--out", str(out),
                                "--workers", "0", "--num-figures", str(NUM), "--device", "cpu"], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not stop_when():
            assert process.poll() is None and time.monotonic() < deadline, "report.py ended before the moment"
            time.sleep(0.002)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, err


def test_a_report_killed_while_it_writes_the_pdf_leaves_the_previous_pdf(tiny_run, tmp_path):
    run, result = tiny_run
    out = tmp_path / "report"
    shutil.copytree(os.path.dirname(result["pdf"]), out)  # figures/stages.json keeps its paths: all reused
    before = (out / "report.pdf").read_bytes()
    code, err = start_report(run, out, lambda: any(n.startswith(".report.pdf.") for n in os.listdir(out)))
    assert code != 0
    assert last_line(err).startswith("error: report.py stopped by signal SIGTERM; the files it had not finished "
                                     "are as they were"), err
    assert (out / "report.pdf").read_bytes() == before
    assert temporaries(out, out / "figures") == []


def test_a_report_stopped_before_its_first_figure_leaves_its_empty_figures_folder(tiny_run, tmp_path):
    # the documented choice (report.py's docstring): the folders stay, the cache the next run fills
    run, _ = tiny_run
    out = tmp_path / "fresh"
    code, err = start_report(run, out, lambda: os.path.isdir(out / "figures"))
    assert code != 0 and last_line(err).startswith("error: report.py stopped by signal SIGTERM"), err
    assert os.listdir(out) == ["figures"] and os.listdir(out / "figures") == []


# ----------------------------------------------------------------------------------------------------
# The notebook's Drive copy
# ----------------------------------------------------------------------------------------------------
def test_mirror_folder_removes_the_temporary_files_of_earlier_copies_and_leaves_none_itself(tmp_path, monkeypatch):
    src, dst = tmp_path / "run", tmp_path / "drive"
    (src / "sub").mkdir(parents=True)
    (dst / "sub").mkdir(parents=True)
    (src / "epoch_000.pth").write_bytes(b"a" * 10)
    (src / "sub" / "losses.csv").write_text("iteration\n")
    (dst / ".epoch_000.pth.abcd.tmp").write_bytes(b"half a checkpoint")
    (dst / "sub" / ".losses.csv.0123.tmp").write_text("half")
    assert sorted(run_folder.mirror_folder(str(src), str(dst))) == ["epoch_000.pth", os.path.join("sub", "losses.csv")]
    assert sorted(os.listdir(dst)) == ["epoch_000.pth", "sub"] and os.listdir(dst / "sub") == ["losses.csv"]
    (src / "epoch_001.pth").write_bytes(b"b" * 10)
    real_copy = shutil.copy2

    def interrupted(source, target):  # the notebook's stop half-way through a copy
        with open(target, "wb") as f:
            f.write(b"b" * 3)
        raise KeyboardInterrupt
    monkeypatch.setattr(run_folder.shutil, "copy2", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_folder.mirror_folder(str(src), str(dst))
    assert sorted(os.listdir(dst)) == ["epoch_000.pth", "sub"]
    monkeypatch.setattr(run_folder.shutil, "copy2", real_copy)
    assert run_folder.mirror_folder(str(src), str(dst)) == ["epoch_001.pth"]


def test_mirror_folder_skips_a_file_the_run_removes_while_it_is_listed_or_copied(tmp_path, monkeypatch):
    src, dst = tmp_path / "run", tmp_path / "drive"
    src.mkdir()
    for epoch in range(3):
        (src / f"epoch_{epoch:03d}.pth").write_bytes(b"x" * 10)
    (src / "losses.csv").write_text("iteration\n")
    real_stat, real_copy = os.stat, shutil.copy2

    def stat(path, *args, **kwargs):  # --keep-epochs removes epoch 0 between the listing and os.stat
        if str(path) == str(src / "epoch_000.pth") and os.path.lexists(path):
            os.remove(path)
        return real_stat(path, *args, **kwargs)

    def copy2(source, target):  # ... and epoch 1 between os.stat and the copy
        if str(source) == str(src / "epoch_001.pth"):
            os.remove(source)
        return real_copy(source, target)
    monkeypatch.setattr(run_folder.os, "stat", stat)
    monkeypatch.setattr(run_folder.shutil, "copy2", copy2)
    assert run_folder.mirror_folder(str(src), str(dst)) == ["epoch_002.pth", "losses.csv"]
    assert sorted(os.listdir(dst)) == ["epoch_002.pth", "losses.csv"]


def write_script(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


# a stand-in for main_train.py: an epoch file every 50 ms, the one before the last removed (--keep-epochs 2); on
# SIGINT it writes stopped.txt and ends with its own error line
CHILD = """
    import os, sys, time
    src = sys.argv[1]
    with open(os.path.join(src, "child.pid"), "w") as f:
        f.write(str(os.getpid()))
    try:
        for epoch in range(int(sys.argv[2])):
            with open(os.path.join(src, f"epoch_{epoch:03d}.pth"), "w") as f:
                f.write("x" * 1000)
            if epoch >= 2:
                os.remove(os.path.join(src, f"epoch_{epoch - 2:03d}.pth"))
            time.sleep(0.05)
    except KeyboardInterrupt:
        with open(os.path.join(src, "stopped.txt"), "w") as f:
            f.write("stopped by the interrupt")
        sys.exit("error: training stopped")
"""


def test_run_mirrored_goes_on_after_a_failed_copy_and_always_copies_at_the_end(tmp_path, monkeypatch, capsys):
    src, dst = tmp_path / "run", tmp_path / "drive"
    src.mkdir()
    child = write_script(tmp_path / "child.py", CHILD)
    real_mirror, calls = run_folder.mirror_folder, []

    def flaky(a, b):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("Drive went away")
        return real_mirror(a, b)
    monkeypatch.setattr(run_folder, "mirror_folder", flaky)
    assert run_folder.run_mirrored([sys.executable, child, str(src), "12"], str(src), str(dst), every=0.02) == 0
    assert "warning: copying" in capsys.readouterr().out and len(calls) > 2
    assert sorted(os.listdir(dst)) == sorted(os.listdir(src)) == ["child.pid", "epoch_010.pth", "epoch_011.pth"]


def test_sigint_to_run_mirrored_stops_the_training_copies_its_last_files_and_shows_one_line(tmp_path):
    src, dst, output = tmp_path / "run", tmp_path / "drive", tmp_path / "output.txt"
    src.mkdir()
    child = write_script(tmp_path / "child.py", CHILD)
    # the notebook cell, run by IPython as a kernel runs it (an exception shown as IPython shows it); the output
    # goes to a file, which a training process left running would hold open as it would a pipe
    cell = (f"import sys; sys.path.insert(0, {ROOT!r}); from run_folder import run_mirrored; "
            f"run_mirrored([sys.executable, {child!r}, {str(src)!r}, '100000'], {str(src)!r}, {str(dst)!r}, "
            f"every=0.1)")
    pid = alive = None
    with open(output, "w") as out:
        notebook = subprocess.Popen([sys.executable, "-m", "IPython", "--quick", "--no-banner", "--colors=nocolor",
                                     "-c", cell], cwd=str(tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, IPYTHONDIR=str(tmp_path / "ipython")))
    try:
        deadline = time.monotonic() + 120
        while not (os.path.exists(dst / "child.pid") and any(n.startswith("epoch_") for n in os.listdir(dst))):
            assert notebook.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.02)
        pid = int((src / "child.pid").read_text())
        notebook.send_signal(signal.SIGINT)  # the stop button: the kernel process only
        notebook.wait(timeout=60)
        time.sleep(0.2)  # a training process left running would write its next epoch file meanwhile
        alive = True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
    finally:  # nothing of this test left running
        if notebook.poll() is None:
            notebook.kill()
            notebook.wait()
        if pid is not None and alive is not False:  # still ours: not yet seen ended
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = output.read_text()
    assert not alive, "the training process still runs"
    assert (dst / "stopped.txt").read_text() == "stopped by the interrupt"  # written as it stopped, then copied
    assert sorted(os.listdir(dst)) == sorted(os.listdir(src))
    lines = text.strip().splitlines()
    assert notebook.returncode != 0 and "Traceback" not in text, text
    assert lines[-1].startswith("error: training interrupted, exit code 1; "), text
    assert lines[-2] == "error: training stopped", text  # the child's own line, then the cell's one line
