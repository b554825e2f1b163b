"""The loops: one training step, an epoch, the test-split losses, inference over a split for mask mAP (and its
files), and the overlays of a split's first images."""
import math
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

from coco_eval import evaluate_masks, map_summary, plot_pr_curves, pr_curves, save_map_json, save_results_json
from cocofiles import det_annotations
from dataset import BuildDataLoader, preprocess_batch, preprocess_item, to_device
from errors import NonFiniteLossError
from plots import class_colors
from solo_head import POSTPROCESS_HANDOUT, POSTPROCESS_MAP
from compute_path import autocast
from utils import is_distributed, is_main_process


def batch_to_device(batch, device, input_height):
    """A loader batch (img, label_list, mask_list, bbox_list) on `device`; a raw batch (BuildDataset(raw=True),
    five parts) is preprocessed there for input_height (dataset.preprocess_batch), a raw multi-scale batch (six
    parts, dataset.MultiScaleBatchSampler's) for its own height, its sixth part. The loader pins its batches
    when CUDA is present (dataset.to_device pins any other host tensor), so the copies are asynchronous: the host
    goes on to launch the forward while they run."""
    if len(batch) == 6:
        batch, input_height = batch[:5], batch[5]
    if len(batch) == 5:
        return preprocess_batch(batch, input_height, device)
    img, label_list, mask_list, bbox_list = batch
    return (to_device(img, device), [to_device(label, device) for label in label_list],
            [to_device(mask, device) for mask in mask_list], [to_device(bbox, device) for bbox in bbox_list])


def forward_losses(model, batch, device, args):
    """(cate_loss, mask_loss, total_loss) of one batch (handout 6.9); `model` may be DDP-wrapped.
    No host-device synchronisation: the targets come in SOLOHead.target's compact form."""
    head = getattr(model, "module", model).head
    img, label_list, mask_list, bbox_list = batch_to_device(batch, device, args.input_height)
    with autocast(device, args.amp):
        cate_pred_list, ins_pred_list = model(img)  # [(bz, C-1, S, S)], SOLO: [(bz, S^2, 2H_f, 2W_f)]
    targets = head.target(ins_pred_list, bbox_list, label_list, mask_list, compact=True)
    losses = head.loss(cate_pred_list, ins_pred_list, *targets)
    return losses


def optimizer_step(total_loss, optimizer, scaler, clip_grad):
    """Backward, gradient-norm clipping at clip_grad (0: off), the optimizer's step (through the scaler)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total_loss).backward()
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip_grad)
    scaler.step(optimizer)
    scaler.update()


def train_step(model, batch, optimizer, scaler, device, args):
    """One SGD step: forward_losses, then optimizer_step. Returns the detached [total, focal, dice] losses on the
    device (read them after the step is queued)."""
    cate_loss, mask_loss, total_loss = forward_losses(model, batch, device, args)
    optimizer_step(total_loss, optimizer, scaler, args.clip_grad)
    return torch.stack([total_loss, cate_loss, mask_loss]).detach().float()  # (3,)


def read_losses(losses):
    """The mean of `losses` (a device tensor) over the processes, as a list of floats: the training step's one
    host-device synchronisation (and, with several processes, its one extra collective)."""
    if is_distributed():
        dist.all_reduce(losses)
        losses /= dist.get_world_size()
    return losses.tolist()


def train_one_epoch(model, optimizer, scheduler, scaler, loader, device, epoch, args, log):
    """One epoch; the mean losses of every args.log_every iterations (and of the epoch's rest) go to log.train.
    Raises NonFiniteLossError on a NaN or infinite loss."""
    model.train()
    window, running = [], torch.zeros(3, dtype=torch.float64)
    progress = tqdm(loader, desc=f"epoch {epoch}/{args.epochs - 1}", disable=not is_main_process(),
                    dynamic_ncols=True)
    for step, batch in enumerate(progress):
        losses = train_step(model, batch, optimizer, scaler, device, args)
        scheduler.step()
        iteration = scheduler.last_epoch  # LambdaLR counts the steps: the iterations done in the whole run
        # The host reads the losses only now, with backward and the SGD step already queued, so the device is
        # never left idle waiting for it (this is the step's one CPU-GPU sync). A non-finite loss has then been
        # stepped into the model in memory, but no checkpoint of this epoch has been written yet, so the last
        # one on disk stays the last good one. Every process sees the same (mean) values and stops together.
        values = read_losses(losses)
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, iteration {iteration} (step {step + 1} of the epoch): total "
                f"{values[0]}, focal {values[1]}, dice {values[2]}. Stopped; the newest checkpoint in "
                f"{args.output_dir} is the last good one.")
        window.append(values)
        running += torch.tensor(values, dtype=torch.float64)
        if iteration % args.log_every == 0 or step + 1 == len(loader):  # the window's mean; the epoch's rest at its end
            log.train(iteration, torch.tensor(window, dtype=torch.float64).mean(0).tolist(),
                      lr=optimizer.param_groups[0]["lr"])
            window = []
        mean = (running / (step + 1)).tolist()
        progress.set_postfix(total=f"{mean[0]:.3f}", focal=f"{mean[1]:.3f}", dice=f"{mean[2]:.3f}",
                             lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    progress.close()


@torch.no_grad()
def evaluate(model, loader, device, args):
    """Mean [total, focal, dice] losses over the loader's batches (every process's share), model in eval mode
    (frozen BatchNorm statistics), predictions in the training layout."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # total, focal, dice, batches
    for batch in loader:
        cate_loss, mask_loss, total_loss = forward_losses(model, batch, device, args)
        sums += torch.stack([total_loss, cate_loss, mask_loss, torch.ones_like(total_loss)]).double()
    if is_distributed():
        dist.all_reduce(sums)
    sums = sums.cpu()  # the one host-device sync of the evaluation
    return (sums[:3] / sums[3].clamp(min=1)).tolist()


@torch.inference_mode()
def evaluate_map(model, test_set, device, batch_size=4, workers=2, amp=False, cfg=POSTPROCESS_MAP, infer=None):
    """Run model.infer (post-processing cfg) over the test split (a Subset of a BuildDataset or COCODataset) and
    compare with its ground truth in each image's original frame (the dataset's coco_gt: the json's own image and
    category ids for COCO-format data) by COCOeval. infer: another function of (img, ori_sizes, cfg, scaled_sizes)
    giving what model.infer gives, per image scores, labels and masks (tensors or numpy: deploy.py's exported
    model); model is then None. Returns the accumulated COCOeval; its cocoDt holds the detections."""
    if infer is None:
        model.eval()
        infer = model.infer
    dataset, indices = test_set.dataset, list(test_set.indices)
    category_ids = torch.tensor(dataset.category_ids)  # label k -> category_ids[k - 1]
    loader = BuildDataLoader(test_set, batch_size=batch_size, shuffle=False, num_workers=workers).loader()
    det_anns, position = [], 0  # position: index of the batch's first image in the test split
    for loaded in tqdm(loader, desc="inference", unit="batch", disable=not is_main_process()):
        # a raw batch (a GPU run's test split) is preprocessed on the device
        img = (preprocess_batch(loaded, dataset.input_height, device)[0] if len(loaded) == 5
               else to_device(loaded[0], device))
        batch = indices[position:position + img.shape[0]]
        with autocast(device, amp):
            results = infer(img, [dataset.image_size(i) for i in batch], cfg,
                            [dataset.scaled_size_of(i) for i in batch])
        for b, i in enumerate(batch):
            scores, labels, masks = (torch.as_tensor(r[b]).cpu() for r in results)  # one copy each
            det_anns += det_annotations(dataset.image_id(i), scores, category_ids[labels - 1], masks,
                                        first_id=len(det_anns) + 1)
        position += img.shape[0]
    return evaluate_masks(dataset.coco_gt(indices), det_anns, [dataset.image_id(i) for i in indices])


def evaluate_and_save(model, test_set, device, figures_dir, batch_size=4, workers=2, amp=False, **fields):
    """evaluate_map over the test split, and its files in figures_dir: map.json (map_summary's metrics and
    `fields`, e.g. the checkpoint and the overlays' paths), segm_results.json (the detections as a COCO results
    json) and pr_curve.png (per class at IoU 0.5). Returns what map.json holds, the three paths included
    (map_json, results_json, pr_curve)."""
    coco_eval = evaluate_map(model, test_set, device, batch_size, workers, amp)
    metrics = map_summary(coco_eval)
    metrics.update(fields, map_json=os.path.join(figures_dir, "map.json"),
                   results_json=save_results_json(coco_eval.cocoDt.dataset["annotations"],
                                                  os.path.join(figures_dir, "segm_results.json")),
                   pr_curve=plot_pr_curves(pr_curves(coco_eval), os.path.join(figures_dir, "pr_curve.png"),
                                           class_names=model.head.class_names))
    save_map_json(metrics, metrics["map_json"])
    return metrics


@torch.inference_mode()
def plot_test_overlays(model, test_set, device, figures_dir, num_figures, score_thresh, amp=False):
    """infer_<i>.png of the first num_figures test images: the handout's post-processing, on the original image
    (handout figures 11-14). Returns the paths."""
    model.eval()
    dataset, paths = test_set.dataset, []
    colours = class_colors(len(model.head.class_names))
    for i in range(min(num_figures, len(test_set))):
        index = test_set.indices[i]
        raw = dataset.get_raw(index)  # (img uint8 (3, ori_H, ori_W), label, mask, bbox)
        img = preprocess_item(*raw, False, dataset.input_height, dataset.max_long_side)[0][None]  # (1, 3, Hp, Wp)
        with autocast(device, amp):
            results = model.infer(to_device(img, device), dataset.image_size(index), POSTPROCESS_HANDOUT,
                                  dataset.scaled_size_of(index))
        paths += model.head.PlotInfer(*results, colours, raw[0][None], score_thresh=score_thresh,
                                      save_prefix=os.path.join(figures_dir, "infer"), start_index=i)
    return paths
