"""Train or evaluate DSDL on PASCAL VOC 2007 (trainval -> test) with the release's defaults."""
import options


def get_args_parser():
    return options.get_args_parser(
        "DSDL on PASCAL VOC 2007: train on trainval, evaluate on test after every epoch.",
        run_folder="checkpoints/voc2007", lambd=10.0, beta=1e-4)


def datasets(args):
    """trainval (None with -e) and test, downloaded into args.data when absent."""
    from util import eval_transform, train_transform_of
    from voc import VOC2007
    train = None if args.evaluate else VOC2007(
        args.data, "trainval", train_transform_of(args))
    return train, VOC2007(args.data, "test", eval_transform(args.image_size, args.fast_pipeline))


def main(argv=None):
    args = options.parse_args(get_args_parser(), argv)
    import engine  # torch loads only now: --help and typos are answered at once
    engine.main(args, datasets, default_embeddings="voc_glove_word2vec.pkl")


if __name__ == "__main__":
    main()
