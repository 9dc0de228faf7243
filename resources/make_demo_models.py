"""Build the bundled demo models: ``article_cnn.onnx`` and ``tiny_llm.onnx``.

    python resources/make_demo_models.py            # rewrites the files beside this script
    python resources/make_demo_models.py --out DIR  # writes them into DIR instead

The models themselves are built in tests/demo_builders.py (see there for how they stay
byte-identical from one run to the next).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from demo_builders import BUILDERS, SEED


def build_all(out_dir: str | Path) -> list[Path]:
    """Write every demo model into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for offset, (file_name, build) in enumerate(BUILDERS.items()):
        # One generator per model, so changing one model never changes the other's bytes.
        model = build(np.random.default_rng(SEED + offset))
        path = out / file_name
        path.write_bytes(model.SerializeToString())
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent),
                        help="folder to write into (default: this script's folder)")
    args = parser.parse_args(argv)
    for path in build_all(args.out):
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
