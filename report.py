"""The write-up of a training run in one command (handout section 9 and the Part-A report).

  python report.py --checkpoint-dir checkpoints/demo                    # the newest checkpoint of the run folder
  python report.py --checkpoint checkpoints/epoch_035.pth --device cuda --amp --out report_final

It runs what is missing, into <out>/figures: the dataset figures (handout figures 5-6), the FPN target plots
(figures 8-9), the inference overlays (figures 11-14) and the mask mAP evaluation (map.json, segm_results.json,
pr_curve.png, as main_infer.py writes them), then writes
  <out>/report.html  one self-contained page, figures embedded: the title (data, head, input size), the summary,
                     the settings table (every stored argument of the run and the model), dataset statistics (images,
                     objects per class, object sizes against the FPN scale ranges), the three figure sets with
                     captions, the loss curves (and the per-epoch test mAP of a --tensorboard run), the mAP table
                     and PR curves, the training time and device;
  <out>/report.pdf   the same content, one section or figure per page (matplotlib's PdfPages): 3 * --num-figures
                     + 5 pages (title, settings, statistics, each figure, the losses, the mAP).
A figure set is reused when <out>/figures/stages.json says it was made from the same checkpoint, data and options
(--redo makes everything again) and each of its figures still loads: a missing, empty or cut-short one makes the
set again. The data is the run's, rebuilt from the checkpoint (--data-dir if it moved).
Default --out: a folder "report" beside the checkpoint.

A stopped report.py (an error, Ctrl-C, SIGTERM, kill -9) leaves the previous report.html and report.pdf whole:
they, stages.json and the figures drawn through plots.save_figure are written to a temporary '.NAME.<id>.tmp'
beside the file and renamed over the old one (atomic_files.atomic_write; dataset.py's and coco_eval.py's files too),
the temporary file removed on the way out (after kill -9, by the next run); a figure that does not load anyway (an
emptied or cut-short file) makes its set again. The report folder and <out>/figures are made when the report
starts and are left as they are, empty if it stopped before its first figure: they are the cache the next run fills.
"""
import argparse
import base64
import html
import json
import math
import os
import sys
import textwrap

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.backends.backend_pdf import PdfPages

from atomic_files import atomic_write, remove_temporaries
from checkpoint import check_classes, load_checkpoint, load_model, model_config, resolve_checkpoint, stored_settings
from compute_path import add_path_arguments, choose_path
from dataset import DATA_SETTINGS, build_datasets, object_sizes, plot_dataset_figures, synthetic_options
from engine import evaluate_and_save, plot_test_overlays
from errors import DataError, run_script
from loss_log import plot_loss_curve
from plots import save_figure
from solo_head import REFERENCE_HEIGHT, plot_target_figures
from utils import prepare_device, stop_on_sigterm

HEADS = dict(solo="SOLO", decoupled="Decoupled SOLO", solov2="SOLOv2")
RUN_DATA = dict(DATA_SETTINGS, hflip=False, multiscale=False, empty_images="skip")  # what rebuilds the run's two splits
SECTIONS = (("summary", "Summary"), ("settings", "Settings"), ("dataset", "Dataset statistics"),
            ("dataset-figures", "Dataset visual check (dataset.py)"), ("targets", "FPN targets (solo_head.py)"),
            ("losses", "Loss curves"), ("map", "Mask mAP"), ("inference", "Inference (main_infer.py)"),
            ("training", "Training time and device"))
PAGE = (11.69, 8.27)  # A4 landscape, inches


def get_args_parser():
    parser = argparse.ArgumentParser(description="The write-up of a SOLO run: report.html and report.pdf")
    parser.add_argument("--checkpoint", default=None, type=str, help="checkpoint file (default: the newest in "
                                                                     "--checkpoint-dir)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", type=str, help="the run folder")
    parser.add_argument("--out", default=None, type=str, help="report folder (default: <run folder>/report)")
    parser.add_argument("--data-dir", default=None, type=str,
                        help="where the run's course files (or its synthetic sets) are now (default: the run's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=str)
    add_path_arguments(parser)  # --amp, --channels-last, as main_infer.py's
    parser.add_argument("--batch-size", default=4, type=int, help="test images per batch of the evaluation")
    parser.add_argument("--workers", default=2, type=int, help="data loading worker processes")
    parser.add_argument("--num-figures", default=5, type=int, help="images in each figure set (the handout: 5)")
    parser.add_argument("--plot-score-thresh", default=0.3, type=float, help="overlays draw detections from this "
                                                                             "score")
    parser.add_argument("--seed", default=0, type=int, help="seed for choosing the dataset and target images")
    parser.add_argument("--redo", action="store_true", help="make every figure set again")
    return parser


# ----------------------------------------------------------------------------------------------------
# What the checkpoint says
# ----------------------------------------------------------------------------------------------------
def data_description(args):
    if args.get("train_data"):
        val = f", validation {args['val_data'][0]}" if args.get("val_data") else " (20 % of its images to test)"
        return f"COCO-format data {args['train_data'][0]}{val}"
    if args.get("synthetic"):
        return f"synthetic data ({args['synthetic']} images)"
    return f"the CIS680 course data ({args.get('data_dir')})"


def input_description(train_set, input_height):
    sizes = {tuple(train_set.dataset.image_size(i)) for i in train_set.indices[:200]}
    if len(sizes) == 1:
        (height, width), = sizes
        return f"{input_height}x{int(input_height * width / height)}"
    return f"height {input_height}, width by each image's aspect"


def settings_rows(checkpoint):
    """(setting, value) of every stored argument, then the model's settings the arguments do not hold."""
    args, cfg = checkpoint["args"], checkpoint["model_cfg"]
    rows = [(key, value) for key, value in args.items()]
    rows += [(f"model: {key}", value) for key, value in cfg.items() if key not in args]
    rows += [(key, checkpoint[key]) for key in ("world_size", "iters_per_epoch") if key in checkpoint]
    return [(key, value if isinstance(value, str) else json.dumps(value)) for key, value in rows]


def training_rows(checkpoint, num_train):
    times = checkpoint["history"].get("epoch_times", [])
    if not times:
        return [("training time", "not recorded (a checkpoint from before report.py)")]
    total = sum(seconds for _, seconds, _ in times)
    rows = [("training time", f"{total / 3600:.2f} h ({total:.0f} s) for {len(times)} epochs, "
                              f"{total / len(times):.1f} s per epoch, {num_train * len(times) / total:.1f} images/s")]
    for device in dict.fromkeys(device for _, _, device in times):
        epochs = [epoch for epoch, _, d in times if d == device]
        rows.append(("device", f"{device} (epochs {min(epochs)}..{max(epochs)})"))
    return rows


# ----------------------------------------------------------------------------------------------------
# The figure sets, made once per checkpoint, data and options
# ----------------------------------------------------------------------------------------------------
class Stages:
    """<figures>/stages.json: per figure set the stamp it was made with and its result (paths and captions)."""

    def __init__(self, folder, redo):
        self.path = os.path.join(folder, "stages.json")
        self.done = {}
        if not redo and os.path.exists(self.path):
            with open(self.path) as f:
                self.done = json.load(f)

    def run(self, name, stamp, make, paths_of):
        """The result of make(), or the stored one when it was made with the same stamp and every file of
        paths_of(result) still loads (cached_file_loads)."""
        entry = self.done.get(name)
        if entry and entry["stamp"] == stamp:
            broken = [p for p in paths_of(entry["result"]) if not cached_file_loads(p)]
            if not broken:
                print(f"{name}: reused ({self.path})")
                return entry["result"]
            print(f"{name}: {broken[0]} is missing or does not load: making it again ...")
        else:
            print(f"{name}: making ...")
        result = make()
        self.done[name] = dict(stamp=stamp, result=result)
        atomic_write(self.path, lambda f: f.write(json.dumps(self.done, indent=1).encode()))
        return result


def cached_file_loads(path):
    """Whether a file of the cache is whole: a PNG that matplotlib reads (a missing, empty or cut-short one does
    not), a JSON file that parses, any other file not empty."""
    try:
        if path.endswith(".png"):
            plt.imread(path)
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                json.load(f)
        else:
            return os.path.getsize(path) > 0
    except Exception:  # OSError (missing, truncated), SyntaxError (PIL: not a PNG), ValueError (JSON) ...
        return False
    return True


def dataset_statistics(train_set, test_set, scale_ranges):
    """Images, objects per class, object sizes (sqrt(w * h) of the box, 800-pixel units) and the objects each FPN
    level trains, per split."""
    names = train_set.dataset.class_names
    stats = dict(class_names=list(names), scale_ranges=[list(r) for r in scale_ranges], splits={})
    for split, subset in (("train", train_set), ("test", test_set)):
        labels, sizes = object_sizes(subset)
        sizes = sizes * REFERENCE_HEIGHT / subset.dataset.input_height
        stats["splits"][split] = dict(
            images=len(subset), objects=len(labels),
            per_class=[int((labels == k + 1).sum()) for k in range(len(names))],
            per_level=[int(((sizes >= lower) & (sizes <= upper)).sum()) for lower, upper in scale_ranges],
            sizes=[round(float(s), 2) for s in sizes])
    return stats


def statistics_figure(stats, path):
    """Objects per class (both splits) and the object sizes against the FPN levels' scale ranges."""
    fig, (ax_class, ax_size) = plt.subplots(1, 2, figsize=(13, 4.2))
    names, x = stats["class_names"], np.arange(len(stats["class_names"]))
    for k, (split, s) in enumerate(stats["splits"].items()):
        ax_class.bar(x + 0.4 * k - 0.2, s["per_class"], width=0.4, label=f"{split} ({s['objects']} objects)")
    ax_class.set(xticks=x, title="objects per class", ylabel="objects")
    ax_class.set_xticklabels(names, rotation=30 if len(names) > 4 else 0)
    ax_class.legend()
    sizes = np.concatenate([s["sizes"] for s in stats["splits"].values()] + [np.zeros(0)])
    top = max(float(sizes.max()) if len(sizes) else 1.0, 2.0)
    ax_size.hist(sizes, bins=np.geomspace(1, top * 1.05, 40), color="0.4")
    ax_size.set_xscale("log")
    for level, (lower, upper) in enumerate(stats["scale_ranges"]):
        ax_size.axvspan(lower, min(upper, top * 1.05), ymin=level / 5, ymax=(level + 1) / 5, alpha=0.25,
                        color=plt.cm.tab10(level), label=f"level {level}: {lower}-{upper}")
    ax_size.set(title="object sizes sqrt(w h), 800-pixel units, and the FPN scale ranges", xlabel="size",
                ylabel="objects")
    ax_size.legend(fontsize="small")
    return save_figure(fig, path)


def map_epochs_figure(rows, path):
    rows = np.asarray(rows, dtype=float).reshape(-1, 4)  # (epochs, [epoch, AP, AP50, AP75])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k, name in enumerate(("AP", "AP50", "AP75")):
        ax.plot(rows[:, 0], rows[:, k + 1], "o-", label=name)
    ax.set(xlabel="epoch", ylabel="mask mAP", title="test-split mask mAP after each epoch", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------
# The report: one list of sections, written as HTML and as PDF pages
# ----------------------------------------------------------------------------------------------------
def build_report(args):
    """Everything the report shows, as {"title", "sections": {id: {"text", "tables", "figures"}}}."""
    path = resolve_checkpoint(args.checkpoint, args.checkpoint_dir)
    checkpoint = load_checkpoint(path)
    cfg = model_config(checkpoint, path)
    run = stored_settings(checkpoint, path, RUN_DATA, required=("input_height",))
    if args.data_dir:
        run["data_dir"] = args.data_dir
    figures = os.path.join(args.out or os.path.join(os.path.dirname(path) or ".", "report"), "figures")
    os.makedirs(figures, exist_ok=True)  # kept whatever happens next (the module's docstring)
    # what a killed report.py left (kill -9; any other stop removes its own): its figures', and report.html's
    # and report.pdf's beside them (the folder may be the run's, whose files are training's business)
    remove_temporaries(figures)
    remove_temporaries(os.path.dirname(figures), of=("report.html", "report.pdf"))
    train_set, test_set = build_datasets(run["data_dir"], run["synthetic"], run["input_height"], False,
                                         synthetic_options(run), train_data=run["train_data"],
                                         val_data=run["val_data"], empty_images=run["empty_images"])
    check_classes(train_set.dataset.class_names, cfg.class_names, path, DataError)
    device = prepare_device(args.device, fixed_input_size=False)
    compute = choose_path(device, args.amp, args.channels_last)
    model = compute.apply(load_model(checkpoint, device, source=path))
    stages = Stages(figures, args.redo)
    data_stamp = dict(run, num=args.num_figures, seed=args.seed)
    model_stamp = dict(data_stamp, checkpoint=os.path.abspath(path), epoch=checkpoint["epoch"],
                       iteration=checkpoint["iteration"], thresh=args.plot_score_thresh, amp=compute.amp,
                       channels_last=compute.channels_last)
    all_paths = lambda result: [p for p, _ in result]  # noqa: E731

    stats = stages.run("statistics", data_stamp, lambda: dataset_statistics(train_set, test_set,
                                                                            model.head.scale_ranges), lambda r: [])
    stats_png = statistics_figure(stats, os.path.join(figures, "statistics.png"))
    dataset_figs = stages.run("dataset figures", data_stamp, lambda: plot_dataset_figures(
        train_set.dataset, figures, args.num_figures, args.seed), all_paths)
    target_figs = stages.run("target plots", dict(data_stamp, arch=cfg.arch, grids=list(cfg.num_grids)), lambda: [
        (p, t) for p, (_, t) in zip(plot_target_figures(model.backbone, model.head, train_set.dataset, figures,
                                                        args.num_figures, args.seed), dataset_figs)], all_paths)
    overlays = stages.run("inference overlays", model_stamp, lambda: [
        (p, f"test image {test_set.indices[k]} (image id {test_set.dataset.image_id(test_set.indices[k])})")
        for k, p in enumerate(plot_test_overlays(model, test_set, device, figures, args.num_figures,
                                                 args.plot_score_thresh, compute.amp))], all_paths)
    metrics = stages.run("evaluation", model_stamp, lambda: evaluate_and_save(
        model, test_set, device, figures, args.batch_size, args.workers, compute.amp, checkpoint=path),
        lambda r: [r["map_json"], r["pr_curve"]])
    history = checkpoint["history"]
    loss_png = plot_loss_curve(history, os.path.join(figures, "loss_curve.png"))
    loss_figs = [(loss_png, "Total, focal (category) and dice (mask) losses against the iteration: train means over "
                            f"each logging window of {checkpoint['args'].get('log_every')} iterations, test-split "
                            f"losses after each epoch (handout 9.2)")]
    if history.get("test_map"):
        loss_figs.append((map_epochs_figure(history["test_map"], os.path.join(figures, "map_epochs.png")),
                          "Test-split mask mAP after each epoch (main_train.py --tensorboard)"))

    head = HEADS[cfg.arch]
    title = (f"{head} on {data_description(run)}, input {input_description(train_set, run['input_height'])}")
    split = stats["splits"]
    ranges = ", ".join(f"level {k} {lo}-{hi}" for k, (lo, hi) in enumerate(model.head.scale_ranges))
    return dict(title=title, out=os.path.dirname(figures), sections=dict(
        summary=dict(tables=[("", [
            ("head", f"{head} ({cfg.backbone} FPN backbone, {cfg.backbone_weights} weights"
                     f"{', frozen' if cfg.backbone_weights != 'none' and not cfg.trainable_backbone else ''})"),
            ("data", data_description(run)), ("classes", ", ".join(cfg.class_names)),
            ("checkpoint", f"{path} (epoch {checkpoint['epoch']}, iteration {checkpoint['iteration']})"),
            ("augmentation", ", ".join(["horizontal flips (p = 0.5)"] * bool(run["hflip"]) + [
                "multi-scale (an input height per batch, the authors' 3x recipe)"] * bool(run["multiscale"]))
             or "none"),
            ("mask mAP (test split)", f"AP {metrics['AP']:.3f}, AP50 {metrics['AP50']:.3f}, "
                                      f"AP75 {metrics['AP75']:.3f}")])]),
        settings=dict(text="Every argument the run was trained with (main_train.py, as stored in the checkpoint), "
                           "then the model settings they do not hold.",
                      tables=[("", settings_rows(checkpoint))]),
        dataset=dict(text=f"Object sizes are sqrt(w h) of the box at the network input in 800-pixel units, as "
                          f"SOLOHead.target compares them with the scale ranges ({ranges}).",
                     tables=[("", [(f"{name}", f"train {split['train']['per_class'][k]}, test "
                                               f"{split['test']['per_class'][k]}")
                                   for k, name in enumerate(stats["class_names"])]
                              + [(f"{s}: images, objects", f"{v['images']}, {v['objects']}") for s, v in split.items()]
                              + [(f"objects on level {k}", ", ".join(f"{s} {v['per_level'][k]}" for s, v in
                                                                      split.items()))
                                 for k in range(len(model.head.scale_ranges))])],
                     figures=[(stats_png, "Objects per class, and the object sizes against each FPN level's scale "
                                          "range (bands)")]),
        **{"dataset-figures": dict(text="Input images (normalised, resized, padded; shown denormalised) with their "
                                        "masks in the class colour, boxes and class names (handout figures 5-6); "
                                        "the first two are the most crowded images.",
                                   figures=[(p, t) for p, t in dataset_figs])},
        targets=dict(text="The category and mask targets of the same images, one panel per FPN level: the target "
                          "masks of the level's positive cells in the class colour (handout figures 8-9). An object "
                          "is a target on every level whose scale range holds its size (" + ranges + "); the ranges "
                          "overlap by a factor 2, so one object can appear on two neighbouring levels. On a finer "
                          "level (more grid cells S, stride 8) its centre region covers more cells, so more cells "
                          "are positive with the same mask; coarse levels see only large objects, at a coarser "
                          "mask resolution (twice the level's feature map).",
                     figures=[(p, f"FPN targets, {t}") for p, t in target_figs]),
        losses=dict(figures=loss_figs),
        map=dict(text=f"Mask AP by pycocotools on the {metrics['num_images']} test-split images, "
                      f"{metrics['num_gt']} objects, {metrics['num_detections']} detections (the authors' "
                      f"post-processing, up to 100 per image).",
                 tables=[("", [(k, f"{metrics[k]:.3f}") for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]),
                         ("per class", [(name, f"AP {m['AP']:.3f}, AP50 {m['AP50']:.3f}, {m['num_gt']} objects")
                                        for name, m in metrics["per_class"].items()])],
                 figures=[(metrics["pr_curve"], "Precision-recall curve per class at IoU 0.5")]),
        inference=dict(text=f"The first test-split images with the handout's post-processing (category score > "
                            f"0.2, Matrix NMS, keep 5), detections scoring at least {args.plot_score_thresh} drawn "
                            f"with class and score (handout figures 11-14).", figures=overlays),
        training=dict(tables=[("", training_rows(checkpoint, len(train_set)))])))


def embedded(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def write_html(report, path):
    esc = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(report['title'])}"
             "</title><style>body{font-family:sans-serif;max-width:72em;margin:auto;padding:1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
             "text-align:left;vertical-align:top}img{max-width:100%}figure{margin:1em 0}</style></head><body>",
             f"<h1>{esc(report['title'])}</h1>"]
    for sid, heading in SECTIONS:
        section = report["sections"][sid]
        parts.append(f"<section id=\"{sid}\"><h2>{esc(heading)}</h2>")
        if section.get("text"):
            parts.append(f"<p>{esc(section['text'])}</p>")
        for caption, rows in section.get("tables", []):
            parts.append("<table>" + (f"<caption>{esc(caption)}</caption>" if caption else "")
                         + "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in rows)
                         + "</table>")
        for png, caption in section.get("figures", []):
            parts.append(f"<figure><img src=\"{embedded(png)}\" alt=\"{esc(caption)}\">"
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    page = "\n".join(parts).encode("utf-8")
    atomic_write(path, lambda f: f.write(page))  # whole or not at all: a stop leaves the previous page
    return path


def short(value, width=70):
    return value if len(value) <= width else value[:width // 2 - 1] + "..." + value[-(width // 2 - 2):]


def table_page(pdf, heading, text, rows, figure=None):
    """One PDF page: a heading, a paragraph, a two-column table (four columns when long) and an optional image."""
    fig = plt.figure(figsize=PAGE)
    fig.text(0.05, 0.95, heading, fontsize=16, weight="bold", va="top")
    if text:
        fig.text(0.05, 0.90, "\n".join(textwrap.wrap(text, 150)), fontsize=9, va="top")
    bottom = 0.45 if figure else 0.04
    if rows:
        cells = [[k, short(v)] for k, v in rows]
        if len(cells) > 26:  # two tables side by side
            half = math.ceil(len(cells) / 2)
            cells = [a + b for a, b in zip(cells[:half], cells[half:] + [["", ""]] * (2 * half - len(cells)))]
        ax = fig.add_axes([0.05, bottom, 0.9, 0.82 - bottom])
        ax.axis("off")
        table = ax.table(cellText=cells, loc="upper left", cellLoc="left")
        table.auto_set_font_size(False)
        table.set_fontsize(7 if len(cells) > 20 else 9)
        table.auto_set_column_width(list(range(len(cells[0]))))
    if figure:
        ax = fig.add_axes([0.05, 0.02, 0.9, 0.4])
        ax.imshow(plt.imread(figure))
        ax.axis("off")
    pdf.savefig(fig)
    plt.close(fig)


def figure_page(pdf, pngs, caption):
    """One PDF page of one or more images one above the other, with the caption below."""
    fig = plt.figure(figsize=PAGE)
    height = 0.85 / len(pngs)
    for k, png in enumerate(pngs):
        ax = fig.add_axes([0.03, 0.12 + (len(pngs) - 1 - k) * height, 0.94, height - 0.01])
        ax.imshow(plt.imread(png))
        ax.axis("off")
    fig.text(0.05, 0.08, "\n".join(textwrap.wrap(caption, 160)), fontsize=9, va="top")
    pdf.savefig(fig)
    plt.close(fig)


def write_pdf(report, path):
    """The report as PDF pages: title and summary, settings, dataset statistics, each figure of the three sets,
    the loss curves, the mAP table with the PR curves. Written whole or not at all (atomic_write): a failure or a
    stop half-way leaves the previous report.pdf and no temporary file. Returns the number of pages."""
    s = report["sections"]
    pages = []

    def write(f):
        with PdfPages(f, metadata=dict(Title=report["title"], Creator="report.py")) as pdf:
            table_page(pdf, report["title"], "", s["summary"]["tables"][0][1] + s["training"]["tables"][0][1])
            table_page(pdf, "Settings", s["settings"]["text"], s["settings"]["tables"][0][1])
            table_page(pdf, "Dataset statistics", s["dataset"]["text"], s["dataset"]["tables"][0][1],
                       s["dataset"]["figures"][0][0])
            for sid in ("dataset-figures", "targets"):
                for png, caption in s[sid]["figures"]:
                    figure_page(pdf, [png], f"{caption}. {s[sid]['text']}")
            figure_page(pdf, [png for png, _ in s["losses"]["figures"]],
                        " ".join(caption + "." for _, caption in s["losses"]["figures"]))
            table_page(pdf, "Mask mAP", s["map"]["text"], [row for _, rows in s["map"]["tables"] for row in rows],
                       s["map"]["figures"][0][0])
            for png, caption in s["inference"]["figures"]:
                figure_page(pdf, [png], f"{caption}. {s['inference']['text']}")
            pages.append(pdf.get_pagecount())

    atomic_write(path, write)
    return pages[0]


def main(args):
    """Returns {"html", "pdf", "pages"} (the PDF's number of pages) and the report's content."""
    report = build_report(args)
    html_path = write_html(report, os.path.join(report["out"], "report.html"))
    pdf_path = os.path.join(report["out"], "report.pdf")
    pages = write_pdf(report, pdf_path)
    print(f"wrote {html_path} and {pdf_path} ({pages} pages)")
    return dict(report, html=html_path, pdf=pdf_path, pages=pages)


if __name__ == "__main__":
    matplotlib.use("Agg")  # a script saves its figures and never shows them
    stop_on_sigterm()  # SIGTERM as Ctrl-C: the file being written is abandoned and its temporary file removed
    try:
        run_script(main, get_args_parser())
    except KeyboardInterrupt as e:
        sys.exit(f"error: report.py {e.args[0] if e.args else 'interrupted (Ctrl-C)'}; the files it had not "
                 f"finished are as they were: run it again to finish (the figure sets it finished are reused)")
