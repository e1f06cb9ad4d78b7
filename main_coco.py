"""Train or evaluate DSDL on MS-COCO 2014 (train2014 -> val2014) with the release's defaults."""
import options


def get_args_parser():
    return options.get_args_parser(
        "DSDL on MS-COCO 2014: train on train2014, evaluate on val2014 after every epoch.",
        run_folder="checkpoints/coco2014", lambd=0.1, beta=1e-6)


def datasets(args):
    """train2014 (None with -e) and val2014, downloaded into args.data when absent."""
    from coco import COCO2014
    from util import eval_transform, train_transform_of
    train = None if args.evaluate else COCO2014(
        args.data, "train", train_transform_of(args))
    return train, COCO2014(args.data, "val", eval_transform(args.image_size, args.fast_pipeline))


def main(argv=None):
    args = options.parse_args(get_args_parser(), argv)
    import engine  # torch loads only now: --help and typos are answered at once
    engine.main(args, datasets, default_embeddings="coco_glove_word2vec.pkl")


if __name__ == "__main__":
    main()
