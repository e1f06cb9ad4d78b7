"""Train or evaluate DSDL on PASCAL VOC 2007 (trainval -> test) with the release's defaults."""
import engine
from util import eval_transform, train_transform
from voc import VOC2007


def main():
    parser = engine.get_args_parser(
        "DSDL on PASCAL VOC 2007: train on trainval, evaluate on test after every epoch.",
        lambd=10.0, beta=1e-4, checkpoint_dir="checkpoints/voc2007")
    args = parser.parse_args()
    engine.main(args,
                train_set_fn=lambda a: VOC2007(a.data, "trainval", train_transform(a.image_size, a.fast_pipeline)),
                test_set_fn=lambda a: VOC2007(a.data, "test", eval_transform(a.image_size, a.fast_pipeline)),
                default_embeddings="voc_glove_word2vec.pkl")


if __name__ == "__main__":
    main()
