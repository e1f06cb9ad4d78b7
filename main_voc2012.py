"""Train or evaluate DSDL on PASCAL VOC 2012 (train -> val) with the release's defaults.

The best model by val mAP scores the test split, whose labels only the evaluation server has:
its files are written to <checkpoint-dir>/results/VOC2012/Main/ and <checkpoint-dir>/results.tar.gz.
"""
import engine
from util import eval_transform, train_transform
from voc import VOC2012, write_submission


def main():
    parser = engine.get_args_parser(
        "DSDL on PASCAL VOC 2012: train on train, evaluate on val after every epoch, write the "
        "evaluation server's files for test from the best model.",
        lambd=10.0, beta=1.9e-4, checkpoint_dir="checkpoints/voc2012")
    args = parser.parse_args()
    engine.main(args,
                train_set_fn=lambda a: VOC2012(a.data, "train", train_transform(a.image_size, a.fast_pipeline)),
                test_set_fn=lambda a: VOC2012(a.data, "val", eval_transform(a.image_size, a.fast_pipeline)),
                default_embeddings="voc_glove_word2vec.pkl",
                submission_set_fn=lambda a: VOC2012(a.data, "test", eval_transform(a.image_size, a.fast_pipeline)),
                write_submission=write_submission)


if __name__ == "__main__":
    main()
