"""Train or evaluate DSDL on PASCAL VOC 2012 (train -> val) with the release's defaults.

The best model by val mAP scores the test split, whose labels only the evaluation server has:
its files are written to <checkpoint-dir>/results/VOC2012/Main/ and <checkpoint-dir>/results.tar.gz
(with -e, to <checkpoint-dir>/eval_submission/). Without the test images (VOC2012test.tar) the
run trains and selects on val all the same.
"""
import warnings

import options


def get_args_parser():
    return options.get_args_parser(
        "DSDL on PASCAL VOC 2012: train on train, evaluate on val after every epoch, write the "
        "evaluation server's files for test from the best model.",
        run_folder="checkpoints/voc2012", lambd=10.0, beta=1.9e-4)


def datasets(args):
    """train (None with -e), val, and test when its images are there or can be downloaded."""
    from distributed import is_main_process
    from util import DSDLError, eval_transform, train_transform_of
    from voc import VOC2012
    train = None if args.evaluate else VOC2012(
        args.data, "train", train_transform_of(args))
    val = VOC2012(args.data, "val", eval_transform(args.image_size, args.fast_pipeline))
    try:
        test = VOC2012(args.data, "test", eval_transform(args.image_size, args.fast_pipeline))
    except DSDLError as error:
        if is_main_process():
            warnings.warn(f"no evaluation-server submission will be written: {error}\nTraining "
                          f"and model selection on val go on. Once the test images are in "
                          f"place, write the submission with -e --resume "
                          f"<checkpoint-dir>/model_best.pth.tar")
        test = None
    return train, val, test


def main(argv=None):
    args = options.parse_args(get_args_parser(), argv)
    import engine  # torch loads only now: --help and typos are answered at once
    from voc import write_submission
    engine.main(args, datasets, default_embeddings="voc_glove_word2vec.pkl",
                write_submission=write_submission)


if __name__ == "__main__":
    main()
