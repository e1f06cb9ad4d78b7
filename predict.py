"""Label your own images with a trained DSDL checkpoint.

    python predict.py --resume checkpoints/voc2007/model_best.pth.tar photo.jpg more/*.jpg folder/
    python predict.py --resume model.pth.tar --json out.json --top-k 3 folder/
    python predict.py --resume model.pth.tar --cam maps/ photo.jpg
    python predict.py --resume model.pth.tar --classes zebra kite --embeddings new.npy folder/

Class names and semantics come from the checkpoint; for the authors' released checkpoints,
which store neither, `--dataset voc|coco` supplies them. A label's probability is the sigmoid of
its score (the score is a logit, spec section 6). `--classes` scores other labels from their word
vectors (zero-shot for labels the model was not trained on). Unreadable images are reported by
path and skipped; the exit status is 1 when there was any.
"""
import sys

import options

if __name__ == "__main__":  # parse before importing torch: --help and bad options answer at once
    options.predict_parser().parse_args()

import collections
import csv
import errno
import json
import os

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from distributed import resolve_device
from inference import load_model
from report import save_figure
from runs import stops_on_interrupt
from outputs import (PREDICTIONS_CSV_HEADER, check_output, check_writable, is_predictions_csv,
                     is_predictions_json)
from util import (IMAGE_EXTENSIONS, DSDLError, atomic_write, eval_transform, load_image,
                  out_of_memory, out_of_memory_advice, user_message)


def find_images(inputs):
    """(path, None) for each image of the command line, folders searched recursively in sorted
    order (linked folders followed, each folder once), and (input, problem) for an input that is
    neither a file nor a folder, or a folder that cannot be read."""
    found = []

    def unreadable(error):
        found.append((error.filename, f"cannot read this folder: {error.strerror.lower()}"))

    for entry in inputs:
        if os.path.isdir(entry):
            seen = set()  # real paths: a link back up the tree is not a loop
            for folder, subfolders, files in os.walk(entry, onerror=unreadable, followlinks=True):
                if os.path.realpath(folder) in seen:
                    subfolders.clear()
                    continue
                seen.add(os.path.realpath(folder))
                subfolders.sort()
                found += [(os.path.join(folder, name), None) for name in sorted(files)
                          if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                          and not name.startswith(".")]  # e.g. macOS ._photo.jpg
        elif os.path.isfile(entry):
            found.append((entry, None))
        else:
            found.append((entry, "no such file or folder"))
    return found


class ImageFiles(Dataset):
    """`dataset[i]` is (i, image tensor or None, problem or None): a bad file is not fatal."""

    def __init__(self, paths, transform):
        self.paths = paths
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return index, self.transform(load_image(self.paths[index], upright=True)), None
        except DSDLError as error:
            return index, None, str(error)


def collate(items):
    """(indices of the readable images, their batch, [(index, problem)] of the others)."""
    good = [(index, image) for index, image, _ in items if image is not None]
    failed = [(index, problem) for index, image, problem in items if image is None]
    batch = torch.stack([image for _, image in good]) if good else None
    return [index for index, _ in good], batch, failed


def select(scores, classes, top_k=None, threshold=None, thresholds=None):
    """The predictions of one image: [{label, probability, score}], most probable first.

    At most `top_k`, and only those with probability >= `threshold`; with neither given, the
    model's own decision rule: class c when its probability >= `thresholds[c]` (tuned per class
    on a validation split), else >= 0.5 (score >= 0).
    """
    if top_k is None and threshold is None:
        cuts = thresholds if thresholds is not None else [0.5] * len(classes)
    else:
        cuts = None if threshold is None else [threshold] * len(classes)
    probabilities = torch.sigmoid(torch.as_tensor(scores, dtype=torch.float64)).tolist()
    order = sorted(range(len(classes)), key=lambda c: -scores[c])
    chosen = [c for c in order if cuts is None or probabilities[c] >= cuts[c]][:top_k]
    return [{"label": classes[c], "probability": probabilities[c], "score": float(scores[c])}
            for c in chosen]


def class_map_figure(image, class_map, label, probability):
    """The image under one class's map (red adds to the score, blue takes from it)."""
    width, height = image.size
    figure = Figure(figsize=(6, 5 * height / width + 0.5), dpi=100, layout="constrained")
    axes = figure.subplots()
    axes.imshow(image)
    limit = float(np.abs(class_map).max()) or 1.0
    # The map lies on the layer-4 grid of the warped input: stretched back over the image
    # (whose pixels imshow centres on integers, hence the half-pixel edges).
    shown = axes.imshow(class_map, extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                        cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=0.5,
                        interpolation="bilinear")
    axes.set_axis_off()
    axes.set_title(f"{label}: probability {probability:.2f}")
    figure.colorbar(shown, ax=axes, fraction=0.04, label="share of the class score")
    return figure


def map_names(paths):
    """A file-name stem per image, unique even when two folders hold the same name."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    repeated = {stem for stem, count in collections.Counter(stems).items() if count > 1}
    return [f"{stem}-{index}" if stem in repeated else stem for index, stem in enumerate(stems)]


def save_class_maps(path, maps, predictions, classes, folder, stem):
    """One PNG per predicted class of one image: `<folder>/<stem>_<label>.png`."""
    image = load_image(path, upright=True)
    written = []
    for prediction in predictions:
        c = classes.index(prediction["label"])
        figure = class_map_figure(image, maps[c], prediction["label"], prediction["probability"])
        written.append(os.path.join(folder, f"{stem}_{prediction['label'].replace(os.sep, '_')}.png"))
        save_figure(figure, written[-1])
    return written


@torch.no_grad()
def predict(model, classes, paths, args, image_size, thresholds=None):
    """Results in input order: {image, predictions} or {image, error, predictions: []}."""
    device = torch.device(args.device)
    model.to(device).eval()
    loader = DataLoader(ImageFiles(paths, eval_transform(image_size)), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda")
    names = map_names(paths) if args.cam else None
    if args.cam:
        os.makedirs(args.cam, exist_ok=True)
    results = [None] * len(paths)
    for indices, images, failed in tqdm(loader, desc="predict", unit="batch",
                                        disable=len(loader) <= 1, dynamic_ncols=True):
        for index, problem in failed:
            results[index] = {"image": paths[index], "error": problem, "predictions": []}
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        if args.cam:
            scores, maps = (tensor.cpu() for tensor in model.class_maps(images))
        else:
            scores = model(images).scores.cpu()
        for row, index in enumerate(indices):
            chosen = select(scores[row].tolist(), classes, args.top_k, args.threshold, thresholds)
            results[index] = {"image": paths[index], "predictions": chosen}
            if args.cam:
                save_class_maps(paths[index], maps[row].numpy(), chosen, classes, args.cam,
                                names[index])
    return results


def format_results(results):
    """The human-readable listing: each image, then its labels and probabilities."""
    lines = []
    for result in results:
        lines.append(result["image"])
        if "error" in result:
            lines.append("  (skipped: not read, see the warning)")
        elif not result["predictions"]:
            lines.append("  (no label)")
        width = max((len(p["label"]) for p in result["predictions"]), default=0)
        lines += [f"  {p['label']:<{width}}  {p['probability']:.3f}" for p in result["predictions"]]
    return "\n".join(lines)


def write_json(results, path):
    with atomic_write(path, "w") as f:
        json.dump(results, f, indent=2)


def write_csv(results, path):
    """One row per predicted label: image,label,probability,score."""
    with atomic_write(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(PREDICTIONS_CSV_HEADER.split(","))
        for result in results:
            for p in result["predictions"]:
                writer.writerow([result["image"], p["label"], p["probability"], p["score"]])


@stops_on_interrupt("the files of --json and --csv are as they were (class maps are written "
                    "whole or not at all)")
def main(argv=None):
    """Returns the exit status: 0, or 1 when something (an image, the checkpoint) failed."""
    args = options.predict_parser().parse_args(argv)
    image_size = args.image_size  # the checkpoint's, once it is read
    try:
        args.device = resolve_device(args.device)
        inputs = [args.resume, args.embeddings, args.classes_from_glove, *args.images,
                  *(args.classes or [])[:1]]  # a --classes file
        if args.json:
            check_output("--json", args.json, inputs, is_predictions_json)
        if args.csv:
            check_output("--csv", args.csv, inputs + [args.json], is_predictions_csv)
        if args.cam:
            check_writable("--cam", args.cam, folder=True)
        model = load_model(args)
        classes, image_size, thresholds = model.classes, model.image_size, model.thresholds
        if thresholds is not None and args.top_k is None and args.threshold is None:
            print(f"labels: each class's own threshold, tuned on the validation split of "
                  f"{args.resume} (--threshold P sets one for all)", file=sys.stderr)
        found = find_images(args.images)
        if not found:
            raise DSDLError(f"no images found in {', '.join(args.images)} (looked for "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        readable = [path for path, problem in found if problem is None]
        predicted = iter(predict(model, classes, readable, args, image_size, thresholds)
                         if readable else [])
    except DSDLError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as error:
        if not out_of_memory(error):
            raise
        print(f"error: {out_of_memory_advice(error, args.batch_size, image_size)}", file=sys.stderr)
        return 1
    except OSError as error:  # a class map that did not fit on the disk
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        print(f"error: could not write a class map in {args.cam} ({error.strerror}); the maps "
              f"already there are whole. Free disk space, then run the same command again",
              file=sys.stderr)
        return 1
    results = [next(predicted) if problem is None else
               {"image": path, "error": problem, "predictions": []} for path, problem in found]
    for result in results:
        if "error" in result:
            print(f"warning: skipped {result['image']}: {result['error']}", file=sys.stderr)
    print(format_results(results))
    if args.cam:
        maps = sum(len(result["predictions"]) for result in results)
        print(f"{maps} class map(s) written to {args.cam}" if maps else
              f"note: --cam {args.cam}: no map written, since no image has a predicted label (a "
              f"map is drawn for each); pass --top-k K or a lower --threshold", file=sys.stderr)
    for path, write in ((args.json, write_json), (args.csv, write_csv)):
        try:
            if path:
                write(results, path)
        except OSError as error:
            print(f"error: could not write {path} ({error.strerror}); the file there is as it "
                  f"was, and the results are printed above. Free disk space, then run the same "
                  f"command again", file=sys.stderr)
            return 1
    return int(any("error" in result for result in results) or not results)


if __name__ == "__main__":
    sys.exit(main())
