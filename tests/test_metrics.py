"""Metrics of spec section 6 against scikit-learn and hand-worked examples."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from util import compute_metrics


def random_case(n=200, c=7, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((n, c))  # continuous: no ties
    labels = rng.choice([1, 0, -1], size=(n, c), p=[0.3, 0.1, 0.6])
    return scores, labels


def test_ap_matches_sklearn_with_difficult_images_masked():
    scores, labels = random_case()
    metrics = compute_metrics(scores, labels)
    for c in range(scores.shape[1]):
        kept = labels[:, c] != 0
        expected = 100 * average_precision_score(labels[kept, c] == 1, scores[kept, c])
        assert metrics["AP"][c] == pytest.approx(expected, rel=1e-9)
    assert metrics["mAP"] == pytest.approx(np.mean(metrics["AP"]), rel=1e-12)
    assert metrics["num_classes_ap"] == scores.shape[1]


def test_ap_by_hand():
    # ranking: pos, neg, pos, difficult (left out), pos  ->  precisions 1/1, 2/3, 3/4
    scores = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]])
    labels = np.array([[1], [-1], [1], [0], [1]])
    assert compute_metrics(scores, labels)["AP"][0] == pytest.approx(100 * (1 + 2 / 3 + 3 / 4) / 3)


def test_difficult_images_are_ignored_in_ap():
    scores, labels = random_case(seed=1)
    base = compute_metrics(scores, labels)["AP"]
    # Put a difficult flag on the top-scoring image of class 0: AP must not move,
    # while marking that same image as a negative must lower it.
    top = np.argmax(scores[:, 0])
    labels[top, 0] = 0
    with_difficult = compute_metrics(scores, labels)["AP"][0]
    kept = labels[:, 0] != 0
    assert with_difficult == pytest.approx(100 * average_precision_score(labels[kept, 0] == 1, scores[kept, 0]))
    labels[top, 0] = -1
    assert compute_metrics(scores, labels)["AP"][0] < with_difficult
    assert base[1:] == compute_metrics(scores, labels)["AP"][1:]


def test_thresholded_metrics_by_hand():
    scores = np.array([[2.0, -1.0, 0.5],
                       [-0.5, 1.5, 0.0],     # 0.0 counts as predicted (score >= 0)
                       [1.0, 0.2, -2.0],
                       [-1.5, -0.3, 3.0]])
    labels = np.array([[1, -1, 1],
                       [1, 1, -1],
                       [-1, 0, 1],           # a difficult label counts as a negative here
                       [-1, -1, 1]])
    # per class: Nc = (1, 1, 2), Np = (2, 2, 3), Ng = (2, 1, 3)
    m = compute_metrics(scores, labels)
    cp, cr = (1 / 2 + 1 / 2 + 2 / 3) / 3, (1 / 2 + 1 + 2 / 3) / 3
    op, orr = 4 / 7, 4 / 6
    assert m["CP"] == pytest.approx(100 * cp)
    assert m["CR"] == pytest.approx(100 * cr)
    assert m["CF1"] == pytest.approx(100 * 2 * cp * cr / (cp + cr))
    assert m["OP"] == pytest.approx(100 * op)
    assert m["OR"] == pytest.approx(100 * orr)
    assert m["OF1"] == pytest.approx(100 * 8 / 13)


def test_top3_metrics_by_hand():
    scores = np.array([[3.0, 2.0, 1.0, 0.5, -1.0],     # top 3: classes 0, 1, 2 (3 is cut)
                       [-2.0, 0.1, -0.3, 0.2, 0.4]])   # top 3: classes 4, 3, 1
    labels = np.array([[1, -1, 1, 1, -1],
                       [-1, 1, -1, -1, 1]])
    m = compute_metrics(scores, labels)
    # top-3 per class: Nc = (1, 1, 1, 0, 1), Np = (1, 2, 1, 1, 1), Ng = (1, 1, 1, 1, 1)
    cp, cr = (1 + 0.5 + 1 + 0 + 1) / 5, 4 / 5
    assert m["CP_top3"] == pytest.approx(100 * cp)
    assert m["CR_top3"] == pytest.approx(100 * cr)
    assert m["CF1_top3"] == pytest.approx(100 * 2 * cp * cr / (cp + cr))
    assert m["OP_top3"] == pytest.approx(100 * 4 / 6)
    assert m["OR_top3"] == pytest.approx(100 * 4 / 5)
    assert m["OF1_top3"] == pytest.approx(100 * 16 / 22)
    # without the top-3 limit class 3 of image 0 is predicted too: Nc = 5, Np = 7
    assert m["OP"] == pytest.approx(100 * 5 / 7)


def test_a_never_predicted_class_counts_as_one_prediction_in_cp_and_in_op():
    # Spec 6: "a class with Np = 0 counts Np as 1", in the mean of CP and in OP's sum of Np.
    scores = np.array([[1.0, -1.0, 0.5],
                       [1.0, -2.0, -0.5],
                       [-1.0, -3.0, 2.0]])
    labels = np.array([[1, 1, -1],
                       [-1, 1, -1],
                       [1, -1, 1]])
    # class 0: predicted for images 0, 1 -> Nc 1, Np 2, Ng 2; class 1: never predicted -> Nc 0,
    # Np 0 (counted 1), Ng 2; class 2: predicted for images 0, 2 -> Nc 1, Np 2, Ng 1
    m = compute_metrics(scores, labels)
    cp, cr = (1 / 2 + 0 / 1 + 1 / 2) / 3, (1 / 2 + 0 / 2 + 1 / 1) / 3
    op, orr = (1 + 0 + 1) / (2 + 1 + 2), (1 + 0 + 1) / (2 + 2 + 1)
    assert m["CP"] == pytest.approx(100 * cp)
    assert m["CR"] == pytest.approx(100 * cr)
    assert m["OP"] == pytest.approx(100 * op)  # 2 / 5, not 2 / 4
    assert m["OF1"] == pytest.approx(100 * 2 * op * orr / (op + orr))
    # top-3 of 3 classes is every label: the same numbers
    assert m["OP_top3"] == pytest.approx(100 * op)


def test_a_class_without_positives_has_undefined_ap_and_is_left_out_of_map():
    scores, labels = random_case(n=50, c=4, seed=2)
    labels[:, 2] = np.where(labels[:, 2] == 1, -1, labels[:, 2])
    m = compute_metrics(scores, labels)
    assert np.isnan(m["AP"][2])
    assert m["num_classes_ap"] == 3
    assert m["mAP"] == pytest.approx(np.mean([m["AP"][c] for c in (0, 1, 3)]))
    assert all(np.isfinite(m[k]) for k in ("CP", "CR", "CF1", "OP", "OR", "OF1"))


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="N x C"):
        compute_metrics(np.zeros((3, 2)), np.zeros((3, 3)))


# ---- partial labels, tuned thresholds, top-k (own data, zero-shot) ------------------------------

def test_unknown_labels_count_in_no_ap_and_in_no_thresholded_metric():
    """An unknown pair (-2) is as if the image were not there for that class."""
    scores, labels = random_case(seed=3)
    unknown = np.random.default_rng(4).random(labels.shape) < 0.2
    partial = np.where(unknown, -2, labels)
    ours = compute_metrics(scores, partial)
    for c in range(scores.shape[1]):
        kept = (partial[:, c] == 1) | (partial[:, c] == -1)
        expected = 100 * average_precision_score(partial[kept, c] == 1, scores[kept, c])
        assert ours["AP"][c] == pytest.approx(expected, rel=1e-9)
    # thresholded: count the known pairs only, by hand
    predicted, truth, known = scores >= 0, partial == 1, partial != -2
    correct = (predicted & truth & known).sum()
    assert ours["OP"] == pytest.approx(100 * correct / (predicted & known).sum())
    assert ours["OR"] == pytest.approx(100 * correct / (truth & known).sum())
    assert ours["OP"] != pytest.approx(compute_metrics(scores, np.where(unknown, -1, labels))["OP"])


def test_tuned_thresholds_maximise_each_class_f1_on_the_scores_they_are_tuned_on():
    from util import probabilities, tune_thresholds
    scores, labels = random_case(n=60, c=4, seed=5)
    labels[:, 3] = -1  # a class without positives keeps 0.5
    thresholds = tune_thresholds(scores, labels)
    chances = probabilities(scores)
    assert thresholds[3] == 0.5
    for c in range(3):  # brute force over every distinct probability
        kept = labels[:, c] != 0
        truth = labels[kept, c] == 1

        def f1(cut):
            predicted = chances[kept, c] >= cut
            tp = (predicted & truth).sum()
            return 2 * tp / (predicted.sum() + truth.sum())

        best = max(f1(cut) for cut in np.unique(chances[kept, c]))
        assert f1(thresholds[c]) == pytest.approx(best, rel=1e-12)
    tuned = compute_metrics(scores, labels, thresholds)
    assert tuned["CF1_tuned"] >= tuned["CF1"] - 1e-9  # tuned on these very scores


def test_top_k_precision_recall_and_f1_by_hand():
    from util import top_k_metrics
    # image 0: top-3 = classes 0, 1, 2 (truth 0, 3); image 1: top-3 = 3, 2, 1 (truth 1, unknown 2)
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.5, 0.6, 0.7]])
    labels = np.array([[1, -1, -1, 1], [-1, 1, -2, -1]])
    metrics = top_k_metrics(scores, labels, ks=(3,))
    # predicted known pairs: image 0: 3 (1 right), image 1: classes 3, 1 (1 right) -> 2 / 5
    assert metrics["P@3"] == pytest.approx(100 * 2 / 5)
    assert metrics["R@3"] == pytest.approx(100 * 2 / 3)
    assert metrics["F1@3"] == pytest.approx(100 * 2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3))
