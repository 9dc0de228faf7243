"""The comparison view shows next-token agreement and KL for logits, and removed/added rows
without a made-up 0 ms."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from opstudio.core.measure.accuracy import compare_outputs
from opstudio.core.measure.compare import NodeDelta
from opstudio.qt.plots import PlotsPanel


def profile(total):
    return SimpleNamespace(nodes=[], total_ms={"p50": total, "mean": total}, plain_ms=None,
                           op_types=[], kernel_events=[])


def test_kl_column_and_summary(app, qtbot):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1, 4, 50)).astype(np.float32)
    kv = rng.normal(size=(1, 2, 4, 8)).astype(np.float32)
    acc = compare_outputs({"logits": ref, "present.0.key": kv},
                          {"logits": ref + 0.3 * rng.normal(size=ref.shape).astype(np.float32),
                           "present.0.key": kv})
    rows = [NodeDelta("mm0", "MatMul", 2.0, 1.0, status="mapped", after_names=["mm0_Q4"]),
            NodeDelta("tanh0", "Tanh", 0.5, None, status="removed"),
            NodeDelta("sig0", "Sigmoid", None, 0.2, status="added")]
    comparison = SimpleNamespace(
        before=profile(3.0), after=profile(1.5), nodes=rows, accuracy=acc, speedup=2.0,
        plain_speedup=None, size_bytes={}, op_types=lambda: [])
    panel = PlotsPanel()
    qtbot.addWidget(panel)
    panel.show_comparison(comparison)
    table = panel.accuracy
    assert table.horizontalHeaderItem(5).text() == "KL nats"
    logits = acc.outputs[0]
    assert table.item(0, 5).text() == f"{logits.kl_divergence:.3g}" and logits.kl_divergence > 0
    assert table.item(1, 4).text() == "" and table.item(1, 5).text() == ""  # KV cache
    assert table.rows[0]["top1_agreement"] == logits.top1_agreement
    assert panel.tokens.text() == acc.summary()
    assert panel.ops.data["before"] == [2.0, 0.5, 0.0] and panel.ops.data["after"] == [1.0, 0.0, 0.2]
    assert panel.ops.data["speedup"] == [2.0, None, None]
