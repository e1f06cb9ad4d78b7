"""Train or evaluate DSDL on your own multi-label dataset, given as label CSVs (see custom.py).

    my_data/train.csv, my_data/test.csv   image,labels   (labels separated by ';')
    my_data/images/...                    the image paths of the CSVs are relative to this

    python make_embeddings.py --csv my_data/train.csv my_data/test.csv -o my_data/classes.npy
    python main_custom.py my_data --embeddings my_data/classes.npy
"""
import custom
import engine
from util import eval_transform, train_transform


def get_args_parser():
    # The VOC 2007 hyper-parameters: the release's setting for a dataset of a few thousand images.
    parser = engine.get_args_parser(
        "DSDL on your own dataset: train on a label CSV, evaluate on another after every epoch.",
        lambd=10.0, beta=1e-4, checkpoint_dir="checkpoints/custom")
    parser.add_argument("--train-csv", metavar="CSV", help="training labels (default: DATA/train.csv)")
    parser.add_argument("--test-csv", metavar="CSV", help="test labels (default: DATA/test.csv)")
    parser.add_argument("--images", metavar="DIR",
                        help="folder the CSVs' image paths are relative to (default: DATA/images)")
    parser.add_argument("--classes", nargs="+", metavar="NAME",
                        help="the class list, in the order of the --embeddings rows: names, or "
                             "one file with a name per line (default: every label of the CSVs, "
                             "sorted)")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    engine.main(args,
                train_set_fn=lambda a: custom.load_split(a, "train", train_transform(a.image_size, a.fast_pipeline)),
                test_set_fn=lambda a: custom.load_split(a, "test", eval_transform(a.image_size, a.fast_pipeline)),
                default_embeddings=None)


if __name__ == "__main__":
    main()
