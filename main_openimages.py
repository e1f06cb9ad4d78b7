"""Train or evaluate DSDL on Open Images V6 / V7's human-verified image labels (partial labels).

    ROOT/oidv7-class-descriptions.csv (or V6's), ROOT/*-annotations-human-imagelabels.csv,
    ROOT/train/, ROOT/validation/, ROOT/test/   the images, <ImageID>.jpg

Nothing is downloaded (openimages.py says from where). Choose the classes, in the order of the
class vectors; e.g. the 600 boxable ones:

    python main_openimages.py ROOT --classes ROOT/oidv7-class-descriptions-boxable.csv \\
        --embeddings boxable.npy
"""
import options


def get_args_parser():
    # COCO's hyper-parameters (main_coco.py): the release's setting for a large dataset.
    parser = options.get_args_parser(
        "DSDL on Open Images (human-verified image labels): train on train, evaluate on "
        "validation after every epoch.", run_folder="checkpoints/openimages", lambd=0.1, beta=1e-6)
    data = parser.add_argument_group("Open Images")
    options.add_option(data, "--classes", nargs="+", metavar="NAME", role="files",
                       help="the classes, in the order of the --embeddings rows: MIDs or display "
                            "names, or one file with one per line (a class-descriptions CSV such "
                            "as class-descriptions-boxable.csv gives its classes); default with -e "
                            "or --resume: the checkpoint's")
    options.add_option(data, "--eval-split", choices=("validation", "test"), default="validation",
                       role="files", help="the split evaluated after every epoch, which selects "
                                          "the best model (default: validation)")
    return parser


def datasets(args):
    """train (None with -e) and the evaluated split, with the verified labels of the classes."""
    from openimages import OpenImages
    from util import DSDLError, eval_transform, train_transform_of
    classes = args.classes or args.checkpoint_classes
    if not classes:
        raise DSDLError("Open Images has about 20,000 classes: choose them with --classes (MIDs, "
                        "display names, or a file of them; e.g. --classes "
                        f"{args.data}/oidv7-class-descriptions-boxable.csv, from the download "
                        "page, for the 600 boxable ones)")
    train = None if args.evaluate else OpenImages(args.data, "train", classes, train_transform_of(args))
    return train, OpenImages(args.data, args.eval_split, classes,
                             eval_transform(args.image_size, args.fast_pipeline))


def main(argv=None):
    args = options.parse_args(get_args_parser(), argv)
    import engine  # torch loads only now: --help and typos are answered at once
    engine.main(args, datasets, default_embeddings=None)


if __name__ == "__main__":
    main()
