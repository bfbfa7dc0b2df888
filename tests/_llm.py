"""Shared by the real-model tests: the tiny llama fixture with a tokenizer, and the SFT files."""

import shutil
from pathlib import Path

from jbilevel.data import CharTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "data"


def model_dir(root: Path) -> Path:
    """The tiny llama fixture (vocab 128, pad 0 / bos 1 / eos 2) plus a character tokenizer."""
    path = root / "llama"
    shutil.copytree(FIXTURES / "models" / "llama", path)
    CharTokenizer().to_hf(str(path))
    return path
