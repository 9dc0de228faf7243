"""Check the runnable-folder export and ``generate`` on real exports (built by llm_exports.py).

    python benchmarks/check_deploy_real_models.py [--cache ~/.cache/opstudio-bench/llm]
        [--out /tmp/opstudio-deploy] [--tokens 32]

For each export found in the cache (``trained_genai/fp32``: SmolLM2-135M through the
onnxruntime-genai builder; ``trained_hf``: the same weights as an HF/optimum-style decoder), two
recipes are applied with ``opstudio optimize MODEL --recipe R -o DIR/``: INT4 on every MatMul,
and one query head in three pruned from every attention (9 → 6 heads, 3 KV heads). The written
folder is then loaded as its runtime does: a genai folder in onnxruntime-genai (``Model`` +
``Generator``, greedy), an HF folder by opstudio's onnxruntime loop, and ``opstudio generate``
prints the original's and the result's text side by side. A table sums up the head count each
config records and whether the runtime generated. Exit status 1 if a step fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

from opstudio.cli import main as cli_main

DEFAULT_CACHE = Path("~/.cache/opstudio-bench/llm").expanduser()
RECIPES = {
    "int4": {"version": 1, "steps": [{"op_types": ["MatMul"], "technique": "int4-weight",
                                      "params": {"block_size": 32}}]},
    "heads": {"version": 1, "steps": [{"name_pattern": "*/o_proj/MatMul", "technique": "prune",
                                       "params": {"structured": True, "sparsity": 0.34}}]},
}
PROMPT = "The capital of France is"


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


def heads_in_config(folder: Path) -> str:
    genai = folder / "genai_config.json"
    if genai.is_file():
        decoder = json.loads(genai.read_text())["model"]["decoder"]
        return f"{decoder['num_attention_heads']}/{decoder['num_key_value_heads']}"
    config = json.loads((folder / "config.json").read_text())
    return f"{config['num_attention_heads']}/{config.get('num_key_value_heads')}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=Path("/tmp/opstudio-deploy"))
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], False
    for name in ("trained_genai/fp32", "trained_hf"):
        model = args.cache / name / "model.onnx"
        if not model.is_file():
            print(f"{model}: not built (python benchmarks/llm_exports.py trained ...)")
            continue
        for recipe_name, recipe in RECIPES.items():
            tag = f"{name.split('/')[0]}-{recipe_name}"
            recipe_path = args.out / f"{recipe_name}.json"
            recipe_path.write_text(json.dumps(recipe))
            folder = args.out / tag
            code, out, err = run(["optimize", str(model), "--recipe", str(recipe_path), "-o",
                                  f"{folder}/", "--overwrite"])
            checked = next((line for line in out.splitlines()
                            if line.startswith(("onnxruntime-genai loads", "onnxruntime runs",
                                                "onnxruntime-genai is not"))), "")
            print(f"== {tag}\n" + "\n".join(line for line in out.splitlines()
                                             if line.startswith(("wrote", "  config", "  note",
                                                                 "onnx", "next-token"))))
            if code != 0:
                print(err)
                failed = True
                rows.append((tag, "-", "optimize failed"))
                continue
            code, out, err = run(["generate", str(model), str(folder / "model.onnx"),
                                  "--prompt", PROMPT, "--max-tokens", str(args.tokens)])
            print(out if code == 0 else err)
            failed |= code != 0
            rows.append((tag, heads_in_config(folder), checked))
    print(f"{'export':<22} {'heads/kv in config':<19} runtime check")
    for tag, heads, checked in rows:
        print(f"{tag:<22} {heads:<19} {checked}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
