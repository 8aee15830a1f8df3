"""User-facing pipelines: generate samples together with their uncertainty scores.

Every modality's pipeline shares :class:`~genunc.pipelines.base.UncertaintyPipeline` (argument
names, score checks, head draws, posterior fit/load/save) and returns an
:class:`~genunc.pipelines.base.UncertaintyOutput` subclass.  Each modality's module is imported
when first used, so asking for the text pipeline does not load e3nn or diffusers.
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "UncertaintyOutput": "base",
    "UncertaintyPipeline": "base",
    "ImageUncertaintyOutput": "image",
    "ImageUncertaintyPipeline": "image",
    "MoleculeUncertaintyOutput": "molecule",
    "MoleculeUncertaintyPipeline": "molecule",
    "TextUncertaintyOutput": "text",
    "TextUncertaintyPipeline": "text",
    "VectorUncertaintyOutput": "vector",
    "VectorUncertaintyPipeline": "vector",
    "PipelineUncertaintyOutput": "wrapped",
    "WrappedImagePipeline": "wrapped",
    "WrappedTextOutput": "text_wrapped",
    "WrappedTextPipeline": "text_wrapped",
    "LLaDA2TextPipeline": "text_wrapped",
    "DiffusionGemmaTextPipeline": "text_wrapped",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
