"""Train or evaluate DSDL on NUS-WIDE's 81 concepts (TrainImagelist -> TestImagelist).

    ROOT/Concepts81.txt, ROOT/ImageList/, ROOT/Groundtruth/TrainTestLabels/, ROOT/Flickr/

Nothing is downloaded (nuswide.py says from where). NUS-WIDE has no standard class vectors:

    python make_embeddings.py --classes ROOT/Concepts81.txt -o nuswide_classes.npy
    python main_nuswide.py ROOT --embeddings nuswide_classes.npy
"""
import options


def get_args_parser():
    # COCO's hyper-parameters (main_coco.py): the release's setting for a large dataset.
    return options.get_args_parser(
        "DSDL on NUS-WIDE (81 concepts): train on TrainImagelist, evaluate on TestImagelist after "
        "every epoch.", run_folder="checkpoints/nuswide", lambd=0.1, beta=1e-6)


def datasets(args):
    """train (None with -e) and test, the images of their lists that are on disk."""
    from nuswide import NUSWIDE
    from util import eval_transform, train_transform_of
    train = None if args.evaluate else NUSWIDE(args.data, "train", train_transform_of(args))
    return train, NUSWIDE(args.data, "test", eval_transform(args.image_size, args.fast_pipeline))


def main(argv=None):
    args = options.parse_args(get_args_parser(), argv)
    import engine  # torch loads only now: --help and typos are answered at once
    engine.main(args, datasets, default_embeddings=None)


if __name__ == "__main__":
    main()
