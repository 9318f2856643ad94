"""Agreement between readers: Fleiss' kappa per class, checked against values worked out by hand."""

from __future__ import annotations

import pytest

from mammoflag.agreement import AgreementCounter

Y, N = frozenset({"biopsy_tool"}), frozenset({"neither"})


def test_two_readers_by_hand():
    counter = AgreementCounter(("biopsy_tool",))
    for task in ([Y, Y], [N, N], [Y, N], [N, N]):
        counter.add(task)
    r = counter.report()["per_class"]["biopsy_tool"]
    # pairs agree on 3 of 4 tasks; 3 of 8 answers are yes -> chance 0.375^2 + 0.625^2 = 0.53125
    assert r["observed"] == pytest.approx(0.75)
    assert r["positive_rate"] == pytest.approx(0.375)
    assert r["fleiss_kappa"] == pytest.approx((0.75 - 0.53125) / (1 - 0.53125))
    assert (r["tasks"], r["tasks_all_agree"]) == (4, 3)


def test_readers_per_task_may_differ_and_single_reads_do_not_count():
    counter = AgreementCounter(("biopsy_tool", "mag_view"))
    counter.add([Y])  # one reader: no agreement to measure
    counter.add([Y, Y, N])  # 3 readers: 1 of 3 pairs agree on biopsy_tool
    counter.add([Y | {"mag_view"}, Y])  # 2 readers: agree on biopsy_tool, not on mag_view
    report = counter.report()
    assert report["double_read_tasks"] == 2
    biopsy, mag = report["per_class"]["biopsy_tool"], report["per_class"]["mag_view"]
    assert biopsy["observed"] == pytest.approx((1 / 3 + 1) / 2)
    p = 4 / 5  # yes answers among the 5 answers of double-read tasks
    assert biopsy["fleiss_kappa"] == pytest.approx(((1 / 3 + 1) / 2 - (p * p + (1 - p) ** 2)) / (1 - (p * p + (1 - p) ** 2)))
    assert mag["observed"] == pytest.approx((1 + 0) / 2) and mag["tasks_all_agree"] == 1


def test_perfect_and_undefined_agreement():
    counter = AgreementCounter(("biopsy_tool", "mag_view"))
    counter.add([Y, Y])
    counter.add([N, N])
    report = counter.report()["per_class"]
    assert report["biopsy_tool"]["fleiss_kappa"] == pytest.approx(1.0)
    # nobody ever said mag_view: agreement is total but chance explains all of it -> undefined
    assert report["mag_view"]["observed"] == 1.0 and report["mag_view"]["fleiss_kappa"] is None
    empty = AgreementCounter(("biopsy_tool",)).report()
    assert empty["double_read_tasks"] == 0 and empty["per_class"]["biopsy_tool"]["fleiss_kappa"] is None
