"""The next-token advisor's scan on Ray (a local Ray of 2 CPUs): the same measurements and
plan as the local pool, a refusal when the workers cannot read the model, and no finished
result lost when a worker is killed."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from llm_builders import kv_decoder, prompt_inputs
from opstudio.core.errors import OpstudioError
from opstudio.core.plan import llm as llm_plan
from opstudio.core.plan.llm import Variant, find_targets, recipe_of
from opstudio.core.plan.scan_executor import RayScan

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 2048
INT8W = Variant("int8-weight", "int8-weight", {"block_size": 32, "accuracy_level": "auto"},
                "INT8 weight-only")


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the dying judge below reaches the workers by value (they cannot import this module)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llm")
    onnx.save(kv_decoder("hf", layers=2, vocab=VOCAB, hidden=128, seed=1),
              folder / "model.onnx")
    np.savez(folder / "prompt.npz", **prompt_inputs(24, vocab=VOCAB, position_ids=True))
    return folder


@pytest.fixture(scope="module")
def jobs(decoder):
    """Four role rewrites and their results judged here, in this process."""
    from opstudio.core.measure.inputs import make_inputs
    from opstudio.core.model.model_io import load_model

    model = load_model(decoder / "model.onnx")
    prompt = make_inputs(model, npz_path=decoder / "prompt.npz", phase="prefill")
    targets = [t for t in find_targets(model) if t.layer is not None][:4]
    tasks = [(f"t{i}", recipe_of([(INT8W, [t])]).to_json()) for i, t in enumerate(targets)]
    judge = llm_plan.Judge(str(decoder / "model.onnx"), prompt, 1)
    return prompt, tasks, {i: judge(r) for i, r in tasks}


def cluster_command() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Scans on a cluster", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    (line,) = block.strip().splitlines()
    return shlex.split(line)


def test_the_readme_command_gives_the_plan_the_local_pool_gives(cluster, decoder, jobs,
                                                                tmp_path, monkeypatch):
    """The README's command, then the same without ``--cluster auto``. Timing stays on this
    machine either way, so the local run reuses the first run's timings (a second timing would
    differ by noise) and measures every accuracy again, in its own processes."""
    from opstudio.cli import cmd_advise, main

    argv = cluster_command()
    assert argv[:2] == ["opstudio", "advise"] and argv[argv.index("--cluster") + 1] == "auto"
    for name in ("model.onnx", "prompt.npz"):
        (tmp_path / name).symlink_to(decoder / name)
    monkeypatch.chdir(tmp_path)
    # a short scan: one technique in two block sizes, brief timings, a prompt too short for a
    # 90 % bound
    quick = ["--techniques", "int8-weight", "--confidence", "0.5", "--threads", "1"]
    monkeypatch.setattr(cmd_advise, "advise_llm",
                        functools.partial(llm_plan.advise_llm, time_budget_s=0.3))
    judged_there: dict[str, dict] = {}

    def run(self, factory, args, items, on_result, **kwargs):
        judged_there.update(items)
        real_run(self, factory, args, items, on_result, **kwargs)

    real_run = RayScan.run
    monkeypatch.setattr(RayScan, "run", run)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ray"))
    assert main([*argv[1:], *quick, "--json", "ray.json"]) == 0
    # the whole-model variants and the scan by role and layer went to the cluster (the
    # plans it verified were judged here)
    assert {i.split("|")[0] for i in judged_there} == {"whole", "role", "layer"}
    (cached,) = (tmp_path / "ray").rglob("*.llm.json")
    speed = json.loads(cached.read_text())["speed"]
    prompt, _, _ = jobs
    judge = llm_plan.Judge(str(decoder / "model.onnx"), prompt, 1)
    for task_id, recipe in judged_there.items():
        if task_id.startswith("whole|"):  # judged there, timed here
            assert speed[task_id]["ratio"] > 0
            expected = judge(recipe)
            assert {k: speed[task_id].get(k) for k in expected} == expected

    mine = tmp_path / "local" / cached.relative_to(tmp_path / "ray")
    mine.parent.mkdir(parents=True)
    mine.write_text(json.dumps({"speed": speed}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "local"))
    judged_there.clear()
    at = argv.index("--cluster")
    local_plan = tmp_path / "local-plan.json"
    here = [*argv[1:at], *argv[at + 2:-1], str(local_plan)]
    assert main([*here, *quick, "--json", "local.json"]) == 0
    assert not judged_there
    local, there = (json.loads((tmp_path / f).read_text()) for f in ("local.json", "ray.json"))
    for advice in (local, there):
        advice.pop("seconds")
    assert there == local
    plan = tmp_path / argv[-1]
    assert plan.exists() == local_plan.exists()
    if plan.exists():
        assert json.loads(plan.read_text()) == json.loads(local_plan.read_text())


def test_workers_that_cannot_read_the_model_are_refused(cluster, decoder, tmp_path):
    path = tmp_path / "model.onnx"
    shutil.copy(decoder / "model.onnx", path)
    scan = RayScan("auto", str(path))
    scan.connect()
    scan.check_workers()
    with path.open("ab") as fh:  # the nodes' copy is not this one
        fh.write(b"\0")
    with pytest.raises(OpstudioError, match=r"workers on the cluster cannot read .*model.onnx "
                                            r".*bytes, here .*put it on a path they share"):
        scan.check_workers()
    path.unlink()
    with pytest.raises(OpstudioError, match="no such file"):
        scan.check_workers()


def _key(recipe) -> str:
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _dying_judge(factory, folder, *args):
    """``factory``'s judge, whose worker dies (``os._exit``) on a job marked ``.once`` the
    first time and on one marked ``.always`` every time; each job it starts is logged."""
    judge = factory(*args)

    def job(recipe):
        mark = Path(folder) / _key(recipe)
        with open(Path(folder) / "started", "a") as fh:
            fh.write(mark.name + "\n")
        if mark.with_suffix(".always").exists():
            os._exit(1)
        if mark.with_suffix(".once").exists() and not mark.exists():
            mark.touch()
            os._exit(1)
        return judge(recipe)

    return job


class _DyingScan(RayScan):
    def __init__(self, model_path: str, folder: Path) -> None:
        super().__init__("auto", model_path)
        self.folder = folder

    def run(self, factory, args, items, on_result, **kwargs):
        super().run(_dying_judge, (factory, str(self.folder), *args), items, on_result,
                    **kwargs)


def test_a_killed_worker_loses_no_finished_result_and_a_rerun_resumes(cluster, decoder, jobs,
                                                                      tmp_path, monkeypatch):
    from opstudio.core.plan import scan_executor

    prompt, tasks, expected = jobs
    folder = tmp_path / "marks"
    folder.mkdir()
    t2 = folder / _key(tasks[2][1])
    cache = tmp_path / "scan.json"
    scan = _DyingScan(str(decoder / "model.onnx"), folder)

    def scan_all() -> dict:
        return llm_plan.accuracy_in_parallel(str(decoder / "model.onnx"), prompt, tasks,
                                             str(cache), cluster=scan)

    # no second try: t2 kills the one worker it is given, the other jobs finish
    monkeypatch.setattr(scan_executor, "RETRIES", 0)
    t2.with_suffix(".always").touch()
    with pytest.raises(OpstudioError, match=r"died while judging t2 \(tried once\); the "
                                            "other results are kept: run again to resume"):
        scan_all()
    assert json.loads(cache.read_text())["accuracy"] == {i: expected[i] for i in ("t0", "t1",
                                                                                 "t3")}
    # the rerun starts only the missing job; its worker is killed once, a fresh one redoes it
    monkeypatch.setattr(scan_executor, "RETRIES", 1)
    t2.with_suffix(".always").unlink()
    t2.with_suffix(".once").touch()
    (folder / "started").unlink()
    assert scan_all() == expected
    assert (folder / "started").read_text().split() == [t2.name, t2.name]
    assert json.loads(cache.read_text())["accuracy"] == expected
