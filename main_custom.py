"""Train or evaluate DSDL on your own multi-label dataset, given as label CSVs (see custom.py).

    my_data/train.csv, my_data/test.csv   image,labels   (labels separated by ';')
    my_data/images/...                    the image paths of the CSVs are relative to this

    python make_embeddings.py --csv my_data/train.csv my_data/test.csv -o my_data/classes.npy
    python main_custom.py my_data --embeddings my_data/classes.npy
"""
import os

import options


def get_args_parser():
    # The VOC 2007 hyper-parameters: the release's setting for a dataset of a few thousand images.
    parser = options.get_args_parser(
        "DSDL on your own dataset: train on a label CSV, evaluate on another after every epoch.",
        run_folder="checkpoints/custom", lambd=10.0, beta=1e-4)
    data = parser.add_argument_group("own data")
    options.add_option(data, "--train-csv", metavar="CSV", role="files",
                       help="training labels (default: DATA/train.csv)")
    options.add_option(data, "--test-csv", metavar="CSV", role="files",
                       help="test labels (default: DATA/test.csv)")
    options.add_option(data, "--val", metavar="CSV", role="files",
                       help="validation labels: model_best and the per-class thresholds are "
                            "chosen on them, and the best model scores --test-csv once, at the "
                            "end (default: none; model_best is chosen on the test CSV, as on the "
                            "paper's benchmarks)")
    options.add_option(data, "--images", metavar="DIR", role="files",
                       help="folder the CSVs' image paths are relative to (default: DATA/images)")
    options.add_option(data, "--classes", nargs="+", metavar="NAME", role="files",
                       help="the class list, in the order of the --embeddings rows: names, or "
                            "one file with a name per line (default: every label of the CSVs, "
                            "sorted)")
    return parser


def datasets(args):
    """The train (None with -e), test and validation (--val, else None) CSVs of the command
    line, each read once, as dataset.Datasets (train, test, submission: none, val)."""
    import custom
    from util import eval_transform, train_transform_of
    test_csv = args.test_csv or os.path.join(args.data, "test.csv")
    if args.classes:
        classes = custom.parse_classes(args.classes)
    elif args.zero_shot:  # the test CSV's own classes, which the checkpoint was not trained on
        classes = custom.classes_from_csv(test_csv)
    else:  # the checkpoint's (-e / --resume), else every label of the CSVs
        classes = args.checkpoint_classes
    train, test, val = custom.load_splits(
        args.train_csv or os.path.join(args.data, "train.csv"), test_csv,
        args.images or os.path.join(args.data, "images"), classes=classes,
        classes_from=("--classes" if args.classes else test_csv if args.zero_shot
                      else f"the class list of {args.resume}" if args.checkpoint_classes
                      else "the labels of the train and test CSVs"),
        name=os.path.basename(os.path.abspath(args.data)),
        train_transform=train_transform_of(args),
        test_transform=eval_transform(args.image_size, args.fast_pipeline),
        evaluate=args.evaluate, val_csv=args.val)
    return train, test, None, val


def main(argv=None):
    args = options.parse_args(get_args_parser(), argv)
    import engine  # torch loads only now: --help and typos are answered at once
    engine.main(args, datasets, default_embeddings=None)


if __name__ == "__main__":
    main()
