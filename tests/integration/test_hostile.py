"""The fault suite's second round (tests/hostile_suite.py): crafted pickles and model files,
reads that would leave their folder or never end, resource bombs, gate-breaking evaluations,
broken training state, a vanished server, full and read-only disks. Every case, each in a worker
process, ends in a named error, a quarantine line, a skipped line, or a recovery that says why:
0 tracebacks, 0 crashes, 0 hangs, 0 silent losses, 0 wrong promotions."""

from __future__ import annotations

import pytest

from tests.hostile_suite import FAILURES, build, render

pytestmark = pytest.mark.slow


@pytest.mark.timeout(3600)
def test_hostile_cases_end_named_quarantined_or_recovered(tmp_path_factory):
    suite = build(str(tmp_path_factory.mktemp("hostile")))
    suite.run()
    print("\n" + render(suite))
    assert suite.failures == []
    by_class = {}
    for name, counts in suite.counts.items():
        by_class.setdefault(name.split(" / ")[0], 0)
        by_class[name.split(" / ")[0]] += sum(counts.values())
        assert not any(counts.get(k) for k in FAILURES), name
    assert by_class["pickle"] >= 40 and by_class["model-pt"] >= 40 and by_class["path"] >= 30
    assert by_class["bomb"] >= 20 and by_class["gate"] >= 14 and by_class["ckpt"] >= 7 and by_class["io"] >= 20
    assert suite.counts["ckpt / train"]["warned"] >= 3   # resumed from an earlier checkpoint, and said so
    assert suite.counts["limits / train"]["warned"] == 1 and suite.counts["limits / predict"]["skipped line"] == 1
    assert by_class["flags"] == 14 and sum(suite.counts[f"flags / {c}"]["named error"] for c in (
        "subset", "train", "evaluate")) == 13 and suite.counts["flags / predict"]["ok"] == 1
    assert suite.counts["path / preprocess"]["quarantine line"] >= 8
