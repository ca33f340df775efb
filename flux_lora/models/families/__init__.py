"""The model families flux_lora trains, and which one a --model is: the pipeline class its own
model_index.json names, never a flag. To add a family: a module with a Family subclass, and one
entry in FAMILIES."""

from __future__ import annotations

from flux_lora.errors import ModelError
from flux_lora.models import fingerprint, synthetic
from flux_lora.models.families import flux1, flux2, kontext
from flux_lora.models.families.base import Family

FAMILIES: tuple[Family, ...] = (flux1.FAMILY, kontext.FAMILY, flux2.DEV, flux2.KLEIN)


def supported() -> str:
    return ", ".join(f"{f.title} ({'/'.join(f.pipelines)})" for f in FAMILIES)


def by_name(name: str) -> Family:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ModelError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def by_pipeline(class_name: str, model: str = "") -> Family:
    for f in FAMILIES:
        if class_name in f.pipelines:
            return f
    where = f"{model} is a {class_name}" if model else f"pipeline {class_name}"
    raise ModelError(f"{where}, which flux_lora does not train; supported: {supported()}")


def of_model(model: str, revision: str = "") -> Family:
    """The family of a local diffusers folder, a hub id or a random:NAME benchmark model."""
    if synthetic.is_synthetic(model):
        for f in FAMILIES:
            if model in f.synthetic:
                return f
        known = ", ".join(name for f in FAMILIES for name in f.synthetic)
        raise ModelError(f"unknown synthetic model {model!r}; known: {known}")
    return by_pipeline(fingerprint.family(model, revision), model)
