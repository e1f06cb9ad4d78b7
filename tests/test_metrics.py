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


def test_top_k_metrics_treat_difficult_labels_as_the_top_3_metrics_do():
    """P@3 and R@3 are compute_metrics' OP_top3 and OR_top3 when every score is >= 0 (so that
    the top 3 are what is predicted): difficult labels count as negatives in both."""
    from util import top_k_metrics
    rng = np.random.default_rng(5)
    scores = rng.random((40, 7)) + 0.01                              # all >= 0
    labels = rng.choice([1, 0, -1, -2], size=(40, 7), p=[0.3, 0.2, 0.4, 0.1])
    ours, top3 = top_k_metrics(scores, labels, ks=(3,)), compute_metrics(scores, labels)
    assert ours["P@3"] == pytest.approx(top3["OP_top3"], rel=1e-12)
    assert ours["R@3"] == pytest.approx(top3["OR_top3"], rel=1e-12)
    # by hand: a difficult label among an image's top 3 is a wrong prediction
    one = top_k_metrics(np.array([[0.9, 0.8, 0.7, 0.1]]), np.array([[1, 0, -1, -1]]), ks=(3,))
    assert one["P@3"] == pytest.approx(100 / 3) and one["R@3"] == pytest.approx(100.0)


# ---- the same numbers in bounded memory, on the CPU and ranked with torch (issue 26) ------------

def release_average_precision(scores, labels):
    """util.average_precision before issue 26 (whole N x C arrays), word for word."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    ap = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        kept = (labels[:, c] == 1) | (labels[:, c] == -1)
        order = np.argsort(-scores[kept, c], kind="stable")
        positives = labels[kept, c][order] == 1
        if positives.any():
            precision_at_rank = np.cumsum(positives) / np.arange(1, positives.size + 1)
            ap[c] = precision_at_rank[positives].mean()
    return ap


def release_thresholded(predicted, truth, known=None):
    if known is not None:
        predicted, truth = predicted & known, truth & known
    correct = (predicted & truth).sum(0).astype(np.float64)
    num_predicted = np.maximum(predicted.sum(0).astype(np.float64), 1)
    num_truth = truth.sum(0).astype(np.float64)
    cp = np.mean(correct / num_predicted)
    has_truth = num_truth > 0
    cr = np.mean(correct[has_truth] / num_truth[has_truth]) if has_truth.any() else 0.0
    op = correct.sum() / num_predicted.sum()
    orr = correct.sum() / max(num_truth.sum(), 1)

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    return {"CP": cp, "CR": cr, "CF1": f1(cp, cr), "OP": op, "OR": orr, "OF1": f1(op, orr)}


def release_top_k(scores, k):
    k = min(k, scores.shape[1])
    top = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(top, np.argsort(-scores, axis=1, kind="stable")[:, :k], True, axis=1)
    return top


def release_probabilities(scores):
    return 1 / (1 + np.exp(-np.asarray(scores, dtype=np.float64)))


def release_compute_metrics(scores, labels, thresholds=None):
    """util.compute_metrics before issue 26, word for word."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    ap = release_average_precision(scores, labels)
    defined = ~np.isnan(ap)
    metrics = {"mAP": 100 * float(ap[defined].mean()) if defined.any() else float("nan"),
               "AP": [100 * float(v) for v in ap], "num_classes_ap": int(defined.sum())}
    truth = labels == 1
    known = (labels != -2) if (labels == -2).any() else None
    predicted = scores >= 0
    for name, value in release_thresholded(predicted, truth, known).items():
        metrics[name] = 100 * float(value)
    for name, value in release_thresholded(predicted & release_top_k(scores, 3), truth, known).items():
        metrics[name + "_top3"] = 100 * float(value)
    if thresholds is not None:
        tuned = release_probabilities(scores) >= np.asarray(thresholds)[None, :]
        for name, value in release_thresholded(tuned, truth, known).items():
            metrics[name + "_tuned"] = 100 * float(value)
    return metrics


def release_top_k_metrics(scores, labels, ks=(3, 5)):
    # difficult (0) counts as a negative, unknown (-2) neither way (issue 25: as the top-3 metrics)
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    truth, known = labels == 1, labels != -2
    metrics = {}
    for k in ks:
        predicted = release_top_k(scores, k) & known
        correct = (predicted & truth).sum()
        precision = correct / max(predicted.sum(), 1)
        recall = correct / max((truth & known).sum(), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        metrics.update({f"P@{k}": 100 * float(precision), f"R@{k}": 100 * float(recall),
                        f"F1@{k}": 100 * float(f1)})
    return metrics


def release_tune_thresholds(scores, labels):
    from sklearn.metrics import precision_recall_curve
    chances = release_probabilities(scores)
    labels = np.asarray(labels)
    thresholds = np.full(labels.shape[1], 0.5)
    for c in range(labels.shape[1]):
        kept = (labels[:, c] == 1) | (labels[:, c] == -1)
        truth = labels[kept, c] == 1
        if not truth.any():
            continue
        precision, recall, cuts = precision_recall_curve(truth, chances[kept, c])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        thresholds[c] = float(cuts[int(np.argmax(f1))])
    return thresholds.tolist()


def evaluation_case(kind, n=150, c=12, seed=0):
    """Scores and labels of a kind an evaluation meets: `random` (VOC-like, difficult labels),
    `tied` (scores on a coarse grid, zeros of both signs), `partial` (float32 and int8 as the
    engine gathers them, 40% unknown), `without positives` (classes with none, one all unknown)."""
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((n, c))
    labels = rng.choice([1, 0, -1], size=(n, c), p=[0.3, 0.1, 0.6])
    if kind == "tied":
        scores = np.round(scores * 2) / 2
        scores[rng.random((n, c)) < 0.1] = -0.0
    if kind == "partial":
        scores, labels = scores.astype(np.float32), np.where(rng.random((n, c)) < 0.4, -2, labels).astype(np.int8)
    if kind == "without positives":
        labels[:, 1] = np.where(labels[:, 1] == 1, -1, labels[:, 1])
        labels[:, 4] = np.where(labels[:, 4] == 1, 0, labels[:, 4])  # difficult positives only
        labels[:, 7] = -2
        labels[:, 9] = np.where(rng.random(n) < 0.5, -2, labels[:, 9])
    return scores, labels


def assert_same(ours, expected):
    """Equal to the last bit (NaN equal to NaN), key by key."""
    if isinstance(expected, dict):
        assert ours.keys() == expected.keys()
        for key in expected:
            assert np.array_equal(np.asarray(ours[key], dtype=float), np.asarray(expected[key], dtype=float),
                                  equal_nan=True), key
    else:
        assert np.array_equal(np.asarray(ours, dtype=float), np.asarray(expected, dtype=float), equal_nan=True)


KINDS = ["random", "tied", "partial", "without positives"]


@pytest.mark.parametrize("block_size", [None, 7], ids=["one block", "blocks of 7 pairs"])
@pytest.mark.parametrize("kind", KINDS)
def test_metrics_are_the_previous_implementations_to_the_last_bit(kind, block_size, monkeypatch):
    import util
    from util import top_k_metrics, tune_thresholds
    if block_size:  # every image and every class its own block: the blocks change no number
        monkeypatch.setattr(util, "BLOCK_SIZE", block_size)
    scores, labels = evaluation_case(kind)
    thresholds = release_tune_thresholds(scores, labels)
    assert_same(tune_thresholds(scores, labels), thresholds)
    assert_same(compute_metrics(scores, labels, thresholds), release_compute_metrics(scores, labels, thresholds))
    assert_same(top_k_metrics(scores, labels), release_top_k_metrics(scores, labels))


def test_nan_scores_are_ranked_last_as_before():
    from util import top_k_metrics
    scores, labels = evaluation_case("tied", seed=1)
    scores[np.random.default_rng(2).random(scores.shape) < 0.3] = np.nan
    scores[0] = np.nan  # fewer numbers than the top 3 and 5
    assert_same(compute_metrics(scores, labels), release_compute_metrics(scores, labels))
    assert_same(top_k_metrics(scores, labels), release_top_k_metrics(scores, labels))


@pytest.mark.parametrize("kind", KINDS)
def test_the_ap_ranked_with_torch_is_numpys_to_the_last_bit(kind, monkeypatch):
    """The GPU's ranking, run here on the CPU: the same precisions, the same means."""
    import torch
    import util
    scores, labels = evaluation_case(kind, seed=3)
    expected = release_average_precision(scores, labels)
    assert_same(util.average_precision(scores, labels, device=torch.device("cpu")), expected)
    monkeypatch.setattr(util, "BLOCK_SIZE", 3 * scores.shape[0])  # blocks of 3 classes
    assert_same(util.average_precision(scores, labels, device=torch.device("cpu")), expected)
    assert_same(util.average_precision(scores, labels), expected)
    if kind == "random":  # and sklearn's AP where no score is tied
        for c in range(scores.shape[1]):
            kept = labels[:, c] != 0
            assert expected[c] == pytest.approx(average_precision_score(labels[kept, c] == 1, scores[kept, c]),
                                                rel=1e-12)


def test_scores_on_a_device_are_ranked_there_and_tensors_are_taken_as_arrays(monkeypatch):
    import torch
    import util
    scores, labels = evaluation_case("partial", seed=4)
    ranked_on = []
    precisions = util._precisions_torch
    monkeypatch.setattr(util, "_precisions_torch", lambda s, l, device: ranked_on.append(device) or precisions(s, l, device))
    expected = release_compute_metrics(scores, labels)
    assert_same(compute_metrics(torch.from_numpy(scores), torch.from_numpy(labels)), expected)
    assert ranked_on == []  # a CPU tensor: numpy ranks
    assert_same(compute_metrics(scores, labels, device=torch.device("cpu")), expected)
    assert ranked_on == [torch.device("cpu")]


def test_top_k_takes_the_first_of_equal_scores_as_a_stable_sort_does():
    from util import top_k
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 3, (300, 9)).astype(np.float32)  # ties everywhere
    scores[:5, :7] = np.nan
    for k in (1, 2, 3, 9, 12):
        assert np.array_equal(top_k(scores, k), release_top_k(scores.astype(np.float64), k)), k


@pytest.mark.parametrize("labels, problem", [
    (np.array([[1, 2], [-1, 0]]), "from -1 to 2"),
    (np.array([[1.0, 0.5], [-1.0, 0.0]]), "float64 labels from -1.0 to 1.0"),
    (np.array([[True, False], [False, True]]), "bool labels"),
])
def test_labels_other_than_the_four_flags_are_one_error(labels, problem):
    with pytest.raises(ValueError, match=r"labels must be 1 \(present\), 0 \(difficult\), -1 \(absent\) or -2") as error:
        compute_metrics(np.zeros(labels.shape), labels)
    assert problem in str(error.value)


def test_the_metrics_make_no_array_of_the_size_of_the_inputs(monkeypatch):
    """Memory: numpy's allocations (tracemalloc sees them) stay a few blocks, well under the
    labels' own size; the whole-array implementation made N x C float64 and int64 copies."""
    import tracemalloc
    import util
    from util import top_k_metrics, tune_thresholds
    monkeypatch.setattr(util, "BLOCK_SIZE", 2 ** 12)
    rng = np.random.default_rng(6)
    scores = rng.standard_normal((8000, 500)).astype(np.float32)  # 16 MB
    labels = np.where(rng.random((8000, 500)) < 0.05, 1, -1).astype(np.int8)  # 4 MB
    for compute in (lambda: compute_metrics(scores, labels, [0.5] * 500), lambda: tune_thresholds(scores, labels),
                    lambda: top_k_metrics(scores, labels)):
        tracemalloc.start()
        try:
            compute()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < labels.nbytes / 2, peak
