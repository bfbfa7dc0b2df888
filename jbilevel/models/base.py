"""The small pretrained base model that ships with jbilevel.

``base_model_path()`` is a local HF directory (``config.json``, ``model.safetensors``, the
tokenizer with its chat template, and a ``README.md`` model card saying how it was made and
what it knows). ``scripts/pretrain_base.py`` makes it: a tiny Llama pretrained on raw-text
arithmetic and quoted requests, the skills the built-in fine-tuning tasks need.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def base_model_path() -> str:
    """The shipped base model's directory, loadable by ``jbilevel.models.load_pretrained`` and
    ``transformers`` (``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``) unchanged.

    Returns: the absolute path of ``jbilevel/assets/base`` in the installed package; raises
    FileNotFoundError if its weights are missing (an install without package data).
    """
    path = Path(str(resources.files("jbilevel"))) / "assets" / "base"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path}: the shipped base model is missing (model.safetensors); reinstall jbilevel "
            "with its package data, or make it with scripts/pretrain_base.py --out " + str(path))
    return str(path.resolve())
