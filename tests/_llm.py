"""Shared by the real-model tests: the tiny llama fixture with a tokenizer, the SFT files, and
the scripts as modules."""

import importlib.util
import shutil
import sys
from pathlib import Path

from jbilevel.data import CharTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "data"


def model_dir(root: Path, case: str = "llama") -> Path:
    """A tiny fixture model (tests/fixtures/models/<case>: vocab 128, pad 0 / bos 1 / eos 2;
    llama by default) plus a character tokenizer with a chat template."""
    path = root / case
    shutil.copytree(FIXTURES / "models" / case, path)
    hf = CharTokenizer().to_hf()
    hf.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    hf.save_pretrained(str(path))
    return path


def script(name: str):
    """``scripts/<name>.py`` loaded as a module (its ``main(argv)`` callable in-process), known
    to ``sys.modules`` as ``<name>_script`` (a dataclass in it resolves its annotations there)."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_script", Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cached_programs(cache: Path) -> list[str]:
    """The jitted functions' names of the programs in a persistent compilation cache
    directory, one per entry, sorted (JAX names an entry ``jit_<name>-<key>-cache``)."""
    return sorted(p.name.split("-", 1)[0] for p in cache.iterdir() if p.name.endswith("-cache"))
