"""The README in step with the product: its Quick start is what CI runs, and every command and
recipe it shows runs as written on the bundled models."""

import json
import re
import shlex
from pathlib import Path

import onnx
import pytest

from opstudio.cli import main
from opstudio.core.model import provenance

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.strip().splitlines()]


def test_quick_start_has_exactly_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("opstudio demo")
    assert "[test]" in commands[1] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = quick_start_commands()[1]
    assert test_command in ci.splitlines()


# --- every command and recipe the README shows runs, as written, on the bundled models -------

def section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split(title, 1)[1].split("\n## ", 1)[0]


def example_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", section("### Examples"), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.strip().splitlines()]
    assert all(line.startswith("opstudio ") for line in lines), lines
    return [shlex.split(line)[1:] for line in lines]


def readme_recipe() -> dict:
    (block,) = re.findall(r"```json\n(.*?)```", section("## Recipe format"), flags=re.S)
    return json.loads(block)


# Inline `opstudio …` spans that are not commands to run: the app, and names of outputs.
NOT_RUN = {"opstudio gui MODEL", "opstudio --debug …", "opstudio inspect --json",
           "opstudio profile --json", "opstudio compare --json"}


def inline_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    spans = sorted(set(re.findall(r"`(opstudio [^`\n]+)`", text)))
    run = [s for s in spans if s not in NOT_RUN]
    assert set(spans) >= NOT_RUN
    assert all("MODEL" in s for s in run), run
    return [shlex.split(s.replace("MODEL", "resources/tiny_llm.onnx"))[1:] for s in run]


def quick(argv: list[str]) -> list[str]:
    """Fewer timed runs than the README asks for (the command is the same otherwise)."""
    if argv[0] not in ("profile", "compare", "advise"):
        return argv
    out = list(argv)
    if "--runs" in out:
        out[out.index("--runs") + 1] = "3"
    else:
        out += ["--runs", "3"]
    return [*out, "--warmup", "1"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "resources").symlink_to(ROOT / "resources")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_the_examples_and_the_recipe_run_as_written(workdir, capsys):
    recipe = readme_recipe()
    (workdir / "recipe.json").write_text(json.dumps(recipe))
    commands = example_commands()
    assert [c[0] for c in commands] == ["inspect", "profile", "optimize", "compare"]
    for argv in commands:
        code = main(quick(argv))
        err = capsys.readouterr().err
        assert code == 0, f"opstudio {' '.join(argv)}: {err}"
        for i, arg in enumerate(argv[1:], start=1):
            if argv[i - 1] in ("--json", "--trace", "-o", "--html"):
                assert (workdir / arg).stat().st_size > 0, arg
    # the recipe did what it says: low-rank fc1/fc2 of block 0, INT8 on every other MatMul
    # that takes it, INT4 on lm_head
    optimized = onnx.load(workdir / "tiny_llm.opt.onnx")
    kinds: dict[str, list[str]] = {}
    for node in optimized.graph.node:
        for origin in provenance.get_origin(node):
            kinds.setdefault(origin, []).append(node.op_type)
    assert kinds["lm_head"] == ["MatMulNBits"]
    assert kinds["block0.mlp.fc1"].count("MatMulInteger") == 2  # both low-rank factors
    assert kinds["block1.mlp.fc2"].count("MatMulInteger") == 1


def test_the_recipe_notes_which_step_takes_lm_head(workdir):
    from opstudio.core.model.model_io import load_model
    from opstudio.core.plan.optimize import optimize
    from opstudio.core.plan.recipe import Recipe

    result = optimize(load_model(ROOT / "resources" / "tiny_llm.onnx"),
                      Recipe.from_json(readme_recipe()))
    _, int8, int4 = result.steps
    assert "left lm_head to step 3 (int4-weight), which names it" in int8.notes
    assert "lm_head" not in int8.applied and int4.applied == ["lm_head"]


@pytest.mark.parametrize("argv", [c for c in inline_commands() if c[0] != "advise"],
                         ids=lambda argv: " ".join(argv[:1] + argv[2:]))
def test_inline_commands_run(workdir, capsys, argv):
    code = main(quick(argv))
    assert code == 0, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("argv", [c for c in inline_commands() if c[0] == "advise"],
                         ids=lambda argv: " ".join(argv[:1] + argv[2:]))
def test_inline_advise_runs(workdir, capsys, argv):
    # the smallest scan that still runs every stage of the advisor
    code = main([*quick(argv), "--max-nodes", "2", "--techniques", "int8-dynamic"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "plan (cosine ≥ 0.999 on every output)" in out


def test_the_deploy_commands_run_on_a_genai_folder(workdir, capsys):
    from llm_builders import runtime_folder

    blocks = re.findall(r"```bash\n(.*?)```", section("## Deploy"), flags=re.S)
    commands = [shlex.split(line.strip()) for block in blocks
                for line in block.strip().splitlines()]
    assert [c[:2] for c in commands] == [["opstudio", "optimize"], ["opstudio", "generate"],
                                         ["opstudio", "export-olive"]]
    runtime_folder(workdir / "qwen")
    (workdir / "int4.json").write_text(json.dumps(
        {"version": 1, "steps": [{"op_types": ["MatMul"], "technique": "int4-weight"}]}))
    printed = {}
    for argv in commands:
        code = main(argv[1:])
        out, err = capsys.readouterr()
        assert code == 0, f"{' '.join(argv)}: {err}"
        printed[argv[1]] = out
    assert (workdir / "qwen-int4" / "genai_config.json").is_file()
    assert "time to first token" in printed["generate"]
    assert json.loads((workdir / "workflow.json").read_text())["passes"]
