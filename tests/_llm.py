"""Shared by the real-model tests: the tiny llama fixture with a tokenizer, and the SFT files."""

import shutil
from pathlib import Path

from jbilevel.data import CharTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "data"


def model_dir(root: Path) -> Path:
    """The tiny llama fixture (vocab 128, pad 0 / bos 1 / eos 2) plus a character tokenizer
    with a chat template."""
    path = root / "llama"
    shutil.copytree(FIXTURES / "models" / "llama", path)
    hf = CharTokenizer().to_hf()
    hf.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    hf.save_pretrained(str(path))
    return path
