"""Where the bundled demo models live, from a source checkout or an installed wheel.

A source checkout (and an editable install) has them in ``<repo>/resources``; a wheel carries
copies as package data in ``opstudio/_resources``.
"""

from __future__ import annotations

from importlib import resources as importlib_resources
from pathlib import Path

from opstudio.core.errors import OpstudioError

DEMO_MODELS = {
    "article_cnn": ("article_cnn.onnx", "Small CNN (3 convolutions, max-pooling, Gemm head)"),
    "tiny_llm": ("tiny_llm.onnx", "Tiny decoder-only LLM (attention, MatMul, LayerNorm)"),
}


def resource_dirs() -> list[Path]:
    dirs = [Path(__file__).resolve().parents[2] / "resources"]
    try:
        packaged = importlib_resources.files("opstudio") / "_resources"
        dirs.append(Path(str(packaged)))
    except (ModuleNotFoundError, TypeError):
        pass
    return dirs


def resource_path(file_name: str) -> Path | None:
    for d in resource_dirs():
        p = d / file_name
        if p.is_file():
            return p
    return None


def demo_model_path(name: str) -> Path:
    """Path of a demo model by short name (``tiny_llm``) or file name (``tiny_llm.onnx``)."""
    key = name.removesuffix(".onnx")
    if key not in DEMO_MODELS:
        raise OpstudioError(f"unknown demo model {name!r}; expected one of "
                            f"{', '.join(DEMO_MODELS)}")
    path = resource_path(DEMO_MODELS[key][0])
    if path is None:
        raise OpstudioError(f"demo model {DEMO_MODELS[key][0]} is not installed "
                            f"(looked in {', '.join(str(d) for d in resource_dirs())})")
    return path


def available_demos() -> list[tuple[str, str, Path]]:
    """(short name, description, path) of the demo models that are present."""
    out = []
    for key, (file_name, desc) in DEMO_MODELS.items():
        p = resource_path(file_name)
        if p is not None:
            out.append((key, desc, p))
    return out
