"""The constant lookup's shared index holds up when passes run on several threads at once (the
app checks and applies them on worker threads)."""

import threading

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from opstudio.core.passes import _ort_support as ort_support


def model_with(value: float):
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.full(2, value, np.float32), "w")])
    return helper.make_model(graph)


def test_constant_lookups_from_many_threads_with_edits_in_place():
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def work(seed: int) -> None:
        try:
            start.wait(10)
            for i in range(150):
                model = model_with(seed)
                value, why = ort_support.constant_value(model, "w")
                assert why is None and value is not None and value[0] == seed
                # an edit in place the cached index does not know: the lookup starts afresh
                model.graph.initializer[0].name = f"w{i}"
                model.graph.node[0].input[1] = f"w{i}"
                value, _ = ort_support.constant_value(model, f"w{i}")
                assert value is not None and value[0] == seed
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
