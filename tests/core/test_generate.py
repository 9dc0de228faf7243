"""core.generate: greedy text on onnxruntime, the KV cache fed back, side by side."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from llm_builders import runtime_folder
from opstudio.core.errors import Cancelled, OpstudioError
from opstudio.core.measure.accuracy import run_outputs
from opstudio.core.measure.generate import (
    Greedy,
    apply_chat,
    eos_ids,
    first_divergence,
    side_by_side,
)

CHAT = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}w2{% endif %}")


def full_sequence_tokens(model: onnx.ModelProto, prompt: list[int], n: int, style: str):
    """Greedy decoding without a cache: the whole sequence run again for each token."""
    ids = list(prompt)
    layers = sum(1 for i in model.graph.input if i.name.endswith(".key"))
    heads = 4 if style == "hf" else 2
    for _ in range(n):
        feed = {"input_ids": np.array([ids], np.int64),
                "attention_mask": np.ones((1, len(ids)), np.int64)}
        if style == "hf":
            feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
        for i in range(layers):
            for kind in ("key", "value"):
                feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, heads, 0, 16), np.float32)
        logits = run_outputs(model, feed)["logits"]
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("style", ["gqa", "hf"])
def test_greedy_with_the_cache_equals_rerunning_the_whole_sequence(tmp_path, style):
    path = runtime_folder(tmp_path, style=style)
    model = onnx.load(path)
    runner = Greedy(path, np.array([0, 5, 7]))
    assert [runner.step()[0] for _ in range(8)] == full_sequence_tokens(model, [0, 5, 7], 8,
                                                                        style)


def test_side_by_side_same_model_does_not_diverge_and_times_each(tmp_path):
    path = runtime_folder(tmp_path)
    result = side_by_side([path, onnx.load(path)], "w5 w7 w9", model_path=path, max_tokens=6)
    a, b = result.runs
    assert result.prompt_tokens == 4  # <s> put first by the tokenizer
    assert a.tokens == b.tokens and len(a.tokens) <= 6 and result.diverges_at is None
    assert a.first_token_s > 0 and (a.tokens_per_s is None or a.tokens_per_s > 0)
    assert a.text == " ".join(("<s>" if t == 0 else f"w{t}") for t in a.tokens)


def test_side_by_side_marks_where_two_models_part(tmp_path):
    path = runtime_folder(tmp_path / "a")
    other = runtime_folder(tmp_path / "b")
    onnx.save(onnx.load(runtime_folder(tmp_path / "c", layers=1)), other)  # another decoder
    result = side_by_side([path, other], "w5 w7 w9", model_path=path, max_tokens=8)
    at = result.diverges_at
    a, b = result.runs
    assert at is not None and a.tokens[:at] == b.tokens[:at] and a.tokens[at] != b.tokens[at]
    marked = result.marked(a, "|")
    assert marked.replace("|", "").replace("  ", " ").strip() == a.text.strip()
    assert marked.split("|")[1].split()[0] == (f"w{a.tokens[at]}" if a.tokens[at] else "<s>")


def test_generation_stops_at_end_of_sequence(tmp_path):
    path = runtime_folder(tmp_path)
    first = side_by_side([path], "w5 w7 w9", model_path=path, max_tokens=12).runs[0].tokens
    config = json.loads((tmp_path / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = [first[2]]
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    assert first[2] in eos_ids(path, tmp_path / "tokenizer.json")
    run = side_by_side([path], "w5 w7 w9", model_path=path, max_tokens=12).runs[0]
    assert run.stopped_at_eos and run.tokens == first[:first.index(first[2])]


def test_no_tokenizer_names_the_flag(tmp_path):
    path = runtime_folder(tmp_path)
    (tmp_path / "tokenizer.json").rename(tmp_path / "tok.json")
    with pytest.raises(OpstudioError, match=r"no tokenizer.json beside the model; name one "
                                            r"with --tokenizer FILE"):
        side_by_side([path], "w5", model_path=path)
    result = side_by_side([path], "w5", model_path=path, tokenizer=tmp_path / "tok.json",
                          max_tokens=2)
    assert result.tokenizer == tmp_path / "tok.json"


def test_a_tokenizer_of_another_vocabulary_is_refused(tmp_path):
    path = runtime_folder(tmp_path / "m", vocab=64)
    big = runtime_folder(tmp_path / "big", vocab=128)
    with pytest.raises(OpstudioError, match="embedding has 64 rows: it is not this model's"):
        side_by_side([path], "w100", model_path=path, tokenizer=big.parent / "tokenizer.json")


def test_chat_template_wraps_the_prompt(tmp_path):
    path = runtime_folder(tmp_path, chat_template=CHAT)
    tok = tmp_path / "tokenizer.json"
    assert apply_chat("w5 w6", tok) == "<s> user w5 w6 </s> w2"
    result = side_by_side([path], "w5 w6", model_path=path, chat=True, max_tokens=2)
    assert result.prompt == "<s> user w5 w6 </s> w2" and result.prompt_tokens == 6


def test_chat_without_a_template_says_so(tmp_path):
    path = runtime_folder(tmp_path)
    with pytest.raises(OpstudioError, match="has no chat template"):
        side_by_side([path], "w5", model_path=path, chat=True)


def test_cancel_and_progress(tmp_path):
    path = runtime_folder(tmp_path)
    seen: list[float] = []
    side_by_side([path], "w5", model_path=path, max_tokens=3,
                 progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0
    with pytest.raises(Cancelled):
        side_by_side([path], "w5", model_path=path, cancelled=lambda: True)


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 4, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
