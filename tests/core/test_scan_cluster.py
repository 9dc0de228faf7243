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
from opstudio.core.plan import llm_plan
from opstudio.core.plan.llm_plan import Variant, find_targets, recipe_of
from opstudio.core.plan.scan_executor import RayScan, open_cluster

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
    section = text.split("### Scans on a cluster", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    (line,) = block.strip().splitlines()
    return shlex.split(line)


def test_the_readme_command_gives_the_plan_the_local_pool_gives(cluster, decoder, tmp_path,
                                                                monkeypatch, capsys):
    """The README's command, with and without ``--cluster auto``. Timing stays on this
    machine either way, so the run on Ray reuses the local run's timings (a second timing
    would differ by noise) and measures every accuracy again, on the workers."""
    from opstudio.cli import cmd_advise, main

    argv = cluster_command()
    assert argv[:2] == ["opstudio", "advise"] and argv[argv.index("--cluster") + 1] == "auto"
    for name in ("model.onnx", "prompt.npz"):
        (tmp_path / name).symlink_to(decoder / name)
    monkeypatch.chdir(tmp_path)
    # a short scan: two techniques, brief timings, a prompt too short for a 90 % bound
    quick = ["--techniques", "int8-weight", "--confidence", "0.5", "--threads", "1"]
    monkeypatch.setattr(cmd_advise, "advise_llm",
                        functools.partial(llm_plan.advise_llm, time_budget_s=0.3))
    at = argv.index("--cluster")
    here = [*argv[1:at], *argv[at + 2:]]
    local_plan = tmp_path / "local-plan.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "local"))
    assert main([*here[:-1], str(local_plan), *quick, "--json", "local.json"]) == 0
    capsys.readouterr()

    (cached,) = (tmp_path / "local").rglob("*.llm.json")
    timings = {"speed": json.loads(cached.read_text())["speed"]}
    mine = tmp_path / "ray" / cached.relative_to(tmp_path / "local")
    mine.parent.mkdir(parents=True)
    mine.write_text(json.dumps(timings))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ray"))
    judged_there: list[str] = []

    def run(self, factory, args, items, on_result, **kwargs):
        judged_there.extend(i for i, _ in items)
        real_run(self, factory, args, items, on_result, **kwargs)

    real_run = RayScan.run
    monkeypatch.setattr(RayScan, "run", run)
    assert main([*argv[1:], *quick, "--json", "ray.json"]) == 0
    # the scan's rewrites went to the cluster (the plans it verified were judged here)
    assert judged_there and all(i.split("|")[0] in ("role", "layer") for i in judged_there)
    local, there = (json.loads((tmp_path / f).read_text()) for f in ("local.json", "ray.json"))
    for advice in (local, there):
        advice.pop("seconds")
    assert there == local
    plan = tmp_path / argv[-1]
    assert plan.exists() == local_plan.exists()
    if plan.exists():
        assert json.loads(plan.read_text()) == json.loads(local_plan.read_text())


def test_whole_model_variants_are_judged_there_and_timed_here(cluster, decoder, jobs, tmp_path):
    prompt, tasks, expected = jobs
    scan = open_cluster("auto", str(decoder / "model.onnx"))
    assert scan is not None
    out = llm_plan.speed_in_parallel(str(decoder / "model.onnx"), prompt, prompt, tasks[:1],
                                     str(tmp_path / "scan.json"), 1, 0.2, cluster=scan)
    for task_id, _ in tasks[:1]:
        assert out[task_id]["ratio"] > 0 and out[task_id]["base_ms"] > 0
        assert {k: out[task_id][k] for k in expected[task_id]} == expected[task_id]


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
