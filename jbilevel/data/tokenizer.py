"""Tokenizers behind one small protocol: a built-in character-level one and an HF adapter.

The protocol the data pipeline uses: ``encode_batch(texts) -> list[list[int]]`` (no special
tokens added), ``decode(ids) -> str``, and the ids ``pad_id``, ``bos_id`` (or None), ``eos_id``
(ending every training response) and ``stop_ids`` (every token that ends a generated one).
"""

from __future__ import annotations

import json
import os

import numpy as np

from jbilevel.data.report import DataError

_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class CharTokenizer:
    """Character-level tokenizer over printable ASCII plus newline; needs no files.

    Ids: 0 pad, 1 bos, 2 eos, 3 unk, then newline and the printable ASCII characters 32..126.
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    stop_ids = (eos_id,)

    def __init__(self):
        chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self.vocab = list(_SPECIALS) + chars
        self.vocab_size = len(self.vocab)
        # Byte -> id lookup; bytes outside the alphabet map to unk.
        self._table_256 = np.full(256, self.unk_id, np.int32)
        for i, ch in enumerate(chars):
            self._table_256[ord(ch)] = len(_SPECIALS) + i
        self._chars = np.array([""] * len(_SPECIALS) + chars, dtype=object)

    def encode(self, text: str) -> list[int]:
        """Args: text. Returns: one id per character (non-ASCII characters become unk)."""
        raw = np.frombuffer(text.encode("ascii", errors="replace"), np.uint8)
        ids = self._table_256[raw]
        # "?" from errors="replace" is a real character; map genuine non-ASCII to unk instead.
        if not text.isascii():
            ids = np.array([self._id(c) for c in text], np.int32)
        return ids.tolist()

    def _id(self, ch: str) -> int:
        return int(self._table_256[ord(ch)]) if ord(ch) < 128 else self.unk_id

    def encode_batch(self, texts: list[str]) -> list:
        """Args: texts. Returns: one int32 id array per text (one vectorised lookup if ASCII)."""
        joined = "".join(texts)
        if not joined.isascii():
            return [np.asarray(self.encode(t), np.int32) for t in texts]
        ids = self._table_256[np.frombuffer(joined.encode("ascii"), np.uint8)]
        ends = np.cumsum([len(t) for t in texts])
        return np.split(ids, ends[:-1]) if len(texts) else []

    def decode(self, ids, *, stop_at_eos: bool = True) -> str:
        """Args: ids (any int sequence). Returns: text, specials dropped, cut at the first end
        token (``stop_ids``: eos)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if stop_at_eos:
            end = np.flatnonzero(np.isin(ids, self.stop_ids))
            if end.size:
                ids = ids[: end[0]]
        ids = ids[(ids >= len(_SPECIALS)) & (ids < self.vocab_size)]
        return "".join(self._chars[ids])

    def batch_decode(self, ids_BxL) -> list[str]:
        return [self.decode(row) for row in np.asarray(ids_BxL)]

    def to_hf(self, directory: str | None = None):
        """Returns: an equivalent ``transformers.PreTrainedTokenizerFast`` (saved if directory)."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        model = models.WordLevel({t: i for i, t in enumerate(self.vocab)}, unk_token="<unk>")
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
            unk_token="<unk>",
        )
        if directory is not None:
            hf.save_pretrained(directory)
        return hf


class HFTokenizer:
    """Adapter from a ``transformers`` tokenizer to the pipeline protocol.

    The pad id falls back to eos when the tokenizer has no pad token (common for decoder LMs).
    """

    chunk = 4096

    def __init__(self, tokenizer):
        self.hf = tokenizer
        if tokenizer.eos_token_id is None:
            raise DataError("tokenizer has no eos token; set tokenizer.eos_token before loading")
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        bos = tokenizer.bos_token_id
        self.bos_id = int(bos) if bos is not None else None
        self.vocab_size = len(tokenizer)
        self.stop_ids = _stop_ids(getattr(tokenizer, "name_or_path", ""), self.eos_id,
                                  self.vocab_size)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        backend = getattr(self.hf, "backend_tokenizer", None)
        out = []
        # Chunks bound the memory of the Encoding objects (offsets, token strings) per call.
        for start in range(0, len(texts), self.chunk):
            part = list(texts[start : start + self.chunk])
            if backend is not None:  # the Rust tokenizer directly: same ids, faster
                out.extend(e.ids for e in backend.encode_batch(part, add_special_tokens=False))
            else:
                out.extend(self.hf(part, add_special_tokens=False)["input_ids"])
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids) -> str:
        ids = np.asarray(ids, np.int64).reshape(-1)
        end = np.flatnonzero(np.isin(ids, self.stop_ids))
        if end.size:
            ids = ids[: end[0]]
        return self.hf.decode(ids.tolist(), skip_special_tokens=True)

    def batch_decode(self, ids_BxL) -> list[str]:
        return [self.decode(row) for row in np.asarray(ids_BxL)]


def _stop_ids(directory: str, eos_id: int, vocab_size: int) -> tuple[int, ...]:
    """The tokenizer's eos, then every other end token its directory's model declares
    (``eos_token_id`` of generation_config.json and config.json, an id or a list): an
    instruction-tuned model may end its turn with a token other than the tokenizer's eos
    (Gemma's ``<end_of_turn>``), and generation stops there as transformers' does."""
    ids = [eos_id]
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(directory, name) if directory else ""
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                declared = json.load(f).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError) as e:
            raise DataError(f"{path}: not a JSON object ({e}); fix or remove the file") from None
        for i in declared if isinstance(declared, list) else [declared]:
            if isinstance(i, int) and 0 <= i < vocab_size and i not in ids:
                ids.append(i)
    return tuple(ids)


def as_tokenizer(tokenizer):
    """Args: a CharTokenizer/HFTokenizer, an HF tokenizer object, or a local directory path.

    Returns: an object following the pipeline protocol.
    """
    if tokenizer is None:
        return CharTokenizer()
    if hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "pad_id"):
        return tokenizer
    if isinstance(tokenizer, str):
        from jbilevel.models.hf_io import load_tokenizer

        if not os.path.isdir(tokenizer):
            raise DataError(f"tokenizer {tokenizer!r} is not a directory (working directory "
                            f"{os.getcwd()}); pass a local HF tokenizer directory (hub names "
                            "are not fetched), a tokenizer object, or None for the built-in "
                            "character tokenizer")
        tokenizer = load_tokenizer(tokenizer)
    return HFTokenizer(tokenizer)
