"""The HTML report lists the inputs both models ran on, a KV cache folded into one row."""

from __future__ import annotations

import re

from llm_builders import kv_decoder
from opstudio.core.measure.compare import compare_models
from opstudio.core.measure.profiler import Profile, ProfileSettings
from opstudio.core.model.model_io import save_model
from opstudio.core.plan import report


def test_the_report_folds_a_30_layer_kv_cache_into_one_row(tmp_path):
    path = tmp_path / "decoder.onnx"
    save_model(kv_decoder("gqa", layers=30), path)
    settings = ProfileSettings(runs=2, warmup=0, threads=1, phase="decode", past=16,
                               measure_plain=False)
    c = compare_models(path, path, settings)
    fed = {t.name: (t.dtype, t.shape) for t in c.before.inputs}
    assert len(fed) == 62 and fed["past_key_values.29.value"] == ("float32", [1, 2, 16, 16])
    assert fed["input_ids"] == ("int64", [1, 1]) and fed["attention_mask"] == ("int64", [1, 17])
    # kept in the profile's JSON
    again = Profile.from_json(c.before.to_json())
    assert again.inputs == c.before.inputs
    html = report.render_html(c)
    section = html.split("<h2>Inputs</h2>", 1)[1].split("<h2>", 1)[0]
    rows = re.findall(r"<tr><td><code>(.*?)</code></td><td>(.*?)</td><td>(.*?)</td></tr>",
                      section)
    assert rows == [("input_ids", "int64", "[1,1]"), ("attention_mask", "int64", "[1,17]"),
                    ("past_key_values.{0..29}.{key,value}", "float32", "[1,2,16,16]")]
    assert "past_key_values.7.key" not in html


def test_a_report_of_profiles_without_inputs_has_no_inputs_section():
    from opstudio.core.measure.accuracy import AccuracyReport
    from opstudio.core.measure.compare import Comparison, match_nodes
    from profile_builders import node_stats, profile_of

    before, after = profile_of(node_stats("mm0", 2.0)), profile_of(node_stats("mm0", 1.0))
    c = Comparison(before, after, match_nodes(before, after), AccuracyReport([]), {})
    assert "<h2>Inputs</h2>" not in report.render_html(c)
