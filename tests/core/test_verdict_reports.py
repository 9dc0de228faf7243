"""The one verdict in the reports: the JSON's ``verdict`` (faster | slower | same | undecided),
the HTML page's words and colours, the CSV's column, all from ``Ratio.verdict``."""

from __future__ import annotations

import pytest

from opstudio.core.measure.accuracy import AccuracyReport
from opstudio.core.measure.compare import Comparison, NodeDelta
from opstudio.core.measure.timing import Ratio
from opstudio.core.plan import report
from profile_builders import node_stats, profile_of

CASES = {  # verdict: (ratio, words in the HTML card, css class)
    "faster": (Ratio(1.85, 1.79, 1.92, 30), "1.85×", "good"),
    "slower": (Ratio(0.87, 0.83, 0.92, 30), "0.87× (1.15× slower)", "bad"),
    "same": (Ratio(1.01, 0.96, 1.05, 30), "≈ 1×", "neutral"),
    "undecided": (Ratio(0.87, 0.83, 0.92, 5), "too few runs", "neutral"),
}


def comparison(ratio: Ratio) -> Comparison:
    p = profile_of(node_stats("mm0", 2.0), node_stats("relu0", 0.1, op="Relu"))
    nodes = [NodeDelta("mm0", "MatMul", 2.0, 2.0 / ratio.median, ratio=ratio),
             NodeDelta("relu0", "Relu", 0.1, 0.1, ratio=Ratio(1.0, 0.9, 1.1, ratio.rounds))]
    return Comparison(p, p, nodes, AccuracyReport(), {"before": 100, "after": 80},
                      total_ratio=ratio, plain_ratio=ratio)


@pytest.mark.parametrize("verdict", list(CASES))
def test_json_html_and_csv_say_the_one_verdict(verdict, tmp_path):
    ratio, card, cls = CASES[verdict]
    c = comparison(ratio)
    data = report.comparison_json(c)
    assert data["verdict"] == verdict
    assert data["nodes"][0]["verdict"] == verdict
    assert data["significant"] is (verdict in ("faster", "slower"))
    page = report.write_html(c, tmp_path / "r.html").read_text()
    assert f"<div class='value {cls}'" in page and f">{card}</div>" in page.replace("&#x27;", "'")
    if verdict == "undecided":
        assert "too few runs to tell (5 pairs; 6 needed)" in page
        assert "≈ 1×" not in page and "no change" not in page
    if verdict == "slower":
        assert "1.15× slower" in page
    rows = report.nodes_csv(c).splitlines()
    assert rows[0].endswith(",significant,verdict") and rows[1].endswith(f",{verdict}")
