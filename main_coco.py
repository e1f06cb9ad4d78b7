"""Train or evaluate DSDL on MS-COCO 2014 (train2014 -> val2014) with the release's defaults."""
import engine
from coco import COCO2014
from util import eval_transform, train_transform


def main():
    parser = engine.get_args_parser(
        "DSDL on MS-COCO 2014: train on train2014, evaluate on val2014 after every epoch.",
        lambd=0.1, beta=1e-6, checkpoint_dir="checkpoints/coco2014")
    args = parser.parse_args()
    engine.main(args,
                train_set_fn=lambda a: COCO2014(a.data, "train", train_transform(a.image_size, a.fast_pipeline)),
                test_set_fn=lambda a: COCO2014(a.data, "val", eval_transform(a.image_size, a.fast_pipeline)),
                default_embeddings="coco_glove_word2vec.pkl")


if __name__ == "__main__":
    main()
