"""The one SessionOptions factory: each named setting lands on the onnxruntime options."""

import onnxruntime as ort
import pytest

from opstudio.core.errors import OpstudioError
from opstudio.core.model.runtime import session_options


def test_named_settings_reach_the_options(tmp_path):
    options = session_options(threads=2, inter_threads=1, opt_level="basic", log_severity=4,
                              spinning=False, prepacking=False,
                              profile_prefix=str(tmp_path / "p"),
                              optimized_model_path=str(tmp_path / "o.onnx"),
                              config={"session.optimized_model_external_initializers_"
                                      "min_size_in_bytes": "1024"})
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.log_severity_level == 4
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.disable_prepacking") == "1"
    assert options.enable_profiling and options.profile_file_prefix == str(tmp_path / "p")
    assert options.optimized_model_filepath == str(tmp_path / "o.onnx")
    assert options.get_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes") == "1024"


def test_defaults_keep_onnxruntime_defaults_but_a_quiet_log():
    options = session_options()
    plain = ort.SessionOptions()
    assert options.intra_op_num_threads == plain.intra_op_num_threads
    assert options.graph_optimization_level == plain.graph_optimization_level
    assert not options.enable_profiling
    assert options.log_severity_level == 3
    assert session_options(log_severity=None).log_severity_level == plain.log_severity_level


def test_an_unknown_opt_level_is_a_user_error():
    with pytest.raises(OpstudioError, match="unknown optimization level 'fast'"):
        session_options(opt_level="fast")
