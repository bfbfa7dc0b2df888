"""The small pretrained models that ship with jbilevel.

``base_model_path()`` is a local HF directory (``config.json``, ``model.safetensors``, the
tokenizer with its chat template, and a ``README.md`` model card saying how it was made and
what it knows). ``scripts/pretrain_base.py`` makes it: a tiny Llama pretrained on raw-text
arithmetic and quoted requests, the skills the built-in fine-tuning tasks need.
``base_model_path("instruct")`` is that base instruction-tuned (``scripts/instruct_base.py``:
SFT on clean chat rows of additions and differences, none of them a question of the built-in
tasks' validation or test splits), so that it already answers in the chat format; the
coverage task starts from it (``task.base: instruct``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# which shipped model -> (its directory under jbilevel/assets, the script that makes it)
BASE_MODELS = {"pretrained": ("base", "pretrain_base.py"),
               "instruct": ("instruct", "instruct_base.py")}


def base_model_path(which: str = "pretrained") -> str:
    """A shipped model's directory, loadable by ``jbilevel.models.load_pretrained`` and
    ``transformers`` (``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``) unchanged.

    Args:
      which: "pretrained" (the base, pretrained on raw text) or "instruct" (the base
        instruction-tuned on chat rows of arithmetic).
    Returns: the absolute path of ``jbilevel/assets/base`` (or ``assets/instruct``) in the
      installed package; raises FileNotFoundError if its weights are missing (an install
      without package data).
    """
    if which not in BASE_MODELS:
        raise ValueError(f"unknown shipped model {which!r}; use one of {sorted(BASE_MODELS)}")
    name, script = BASE_MODELS[which]
    path = Path(str(resources.files("jbilevel"))) / "assets" / name
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path}: the shipped {which} model is missing (model.safetensors); reinstall "
            f"jbilevel with its package data, or make it with scripts/{script} --out {path}")
    return str(path.resolve())
