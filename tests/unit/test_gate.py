import pytest

from components.register.core import gate


def test_first_version_becomes_champion():
    d = gate(0.3, {"1": 0.3}, None, {}, margin=0.1, tolerance=0.0)
    assert d.promote and "first version" in d.reason


def test_margin_is_strict_and_a_tie_never_promotes():
    assert not gate(0.50, {"1": 0.5}, 0.50, {"1": 0.5}, margin=0.0, tolerance=1.0).promote
    assert gate(0.5001, {"1": 0.5001}, 0.50, {"1": 0.5}, margin=0.0, tolerance=1.0).promote
    d = gate(0.52, {"1": 0.52}, 0.50, {"1": 0.5}, margin=0.03, tolerance=1.0)
    assert not d.promote and "margin 0.0300" in d.reason
    assert gate(0.54, {"1": 0.54}, 0.50, {"1": 0.5}, margin=0.03, tolerance=1.0).promote


def test_a_category_dropping_more_than_the_tolerance_blocks_promotion():
    champ = {"1": 0.6, "92": 0.7, "118": 0.4}
    new = {"1": 0.9, "92": 0.64, "118": 0.45}
    d = gate(0.66, new, 0.5667, champ, margin=0.01, tolerance=0.05, champion_version="3")
    assert not d.promote and "category 92 drops by 0.0600" in d.reason
    assert round(d.deltas["92"], 6) == -0.06 and round(d.deltas["1"], 6) == 0.3
    assert gate(0.66, new, 0.5667, champ, margin=0.01, tolerance=0.07).promote
    # a category the champion never saw counts as a gain, one the new model lost counts as a drop to 0
    d = gate(0.7, {"1": 0.7}, 0.6, {"1": 0.6, "200": 0.2}, margin=0.0, tolerance=0.1)
    assert not d.promote and d.deltas["200"] == -0.2


def test_a_metrics_file_whose_pq_disagrees_with_its_own_counts_is_refused():
    """evaluate writes each category's tp, fp, fn and IoU sum beside the figures: an edited PQ (in
    range, so the range checks pass) or edited counts do not add up, and nothing is believed."""
    import copy

    from components.common.metrics import InvalidMetrics, check_metrics

    m = {"PQ": 0.625, "SQ": 0.85, "RQ": 0.7, "images": 3,
         "counts": {"1": {"tp": 2, "fp": 0, "fn": 0, "iou": 1.6}, "2": {"tp": 1, "fp": 1, "fn": 1, "iou": 0.9},
                    "3": {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0}},
         "results": {"per_class": {"1": {"pq": 0.8}, "2": {"pq": 0.45}, "3": {"pq": 0.0}}}}
    assert check_metrics(m, "metrics.json") is m
    for edit, message in ((lambda d: d.update(PQ=0.7), r"PQ=0.7 but its per-category counts give 0.625000"),
                          (lambda d: d["results"]["per_class"]["2"].update(pq=0.9),
                           r"per-class PQ of 2=0.9 but its counts give 0.450000"),
                          (lambda d: d["counts"]["1"].update(iou=5.0), r"IoU sum of 1=5.0 outside 0..tp"),
                          (lambda d: d["counts"]["2"].update(fp=-1), r"counts of 2 are not whole numbers")):
        bad = copy.deepcopy(m)
        edit(bad)
        with pytest.raises(InvalidMetrics, match=message):
            check_metrics(bad, "metrics.json")
