"""SFTDataset: tokenised examples with stable ids, prompt masks and fixed-shape batches.

Example ``i`` (its stable id, 0..N-1 in source order after skips) is the token sequence
``[bos] + prompt + response + [eos]``, or, where the chat template's turn end is trained
(``response_end="template"``), ``[bos] + prompt + response turn`` up to the template's end
token. Prompt and response are tokenised separately, so the prompt/response boundary is
exact. The loss covers the response tokens and the end token, and, in a conversation whose
earlier assistant turns are trained (the chat schema's ``assistant_turns="all"``), those turns'
tokens inside the prompt (each turn tokenised on its own, like the response).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

from jbilevel.data.readers import iter_rows
from jbilevel.data.report import DataError, LoadReport
from jbilevel.data.schemas import Formatter, Pieces, detect_schema
from jbilevel.data.tokenizer import as_tokenizer

POLICIES = ("error", "truncate", "skip")


@dataclasses.dataclass
class SFTDataset:
    """Tokenised SFT examples; id ``i`` is row ``i`` of every array and of ``rows``.

    Attributes:
      tokens_T: all sequences concatenated (int32).
      offsets_N1: example i is ``tokens_T[offsets_N1[i]:offsets_N1[i+1]]``.
      prompt_len_N: number of prompt tokens (incl. bos) of each example.
      rows: the original rows (for export), ``where``: their locations in the source.
      tokenizer: the pipeline tokenizer (``pad_id``, ``eos_id``, ``decode``).
      max_len: the longest allowed sequence; batches are at most this long.
      report: what was read, kept, truncated and skipped.
      trained_T: 1 on every token the loss predicts (uint8, aligned with ``tokens_T``): the
        response and its end token, and any earlier assistant turns inside the prompt; None
        when no example trains anything before its response (the tokens after the prompt).
    """

    tokens_T: np.ndarray
    offsets_N1: np.ndarray
    prompt_len_N: np.ndarray
    rows: list
    where: list
    tokenizer: object
    max_len: int
    report: LoadReport
    trained_T: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompt_len_N)

    @functools.cached_property
    def length_N(self) -> np.ndarray:
        return np.diff(self.offsets_N1).astype(np.int32)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens_T[self.offsets_N1[i] : self.offsets_N1[i + 1]]

    def targets(self, i: int) -> np.ndarray:
        """Args: id. Returns: 1 on the tokens of example i the loss predicts, else 0 (uint8)."""
        if self.trained_T is not None:
            return self.trained_T[self.offsets_N1[i] : self.offsets_N1[i + 1]]
        out = np.zeros(self.length_N[i], np.uint8)
        out[self.prompt_len_N[i] :] = 1
        return out

    def batch(self, ids_B, seq_len: int, valid_B=None) -> dict:
        """Build one fixed-shape training batch (the batch contract).

        Args:
          ids_B: example ids; rows with ``valid_B == 0`` are padding (their id is kept as is).
          seq_len: L, at least the longest valid sequence in the batch.
          valid_B: 1 for real rows, 0 for padding rows (default: all real).
        Returns:
          dict of numpy arrays: input_ids, labels (int32 BxL; labels[:, t] = input_ids[:, t+1],
          last = pad), loss_mask (float32 BxL; 1 where labels is a trained token: the
          response and its end token, and earlier assistant turns where trained),
          attention_mask (int32 BxL), ids (int32 B), valid (float32 B).
        """
        ids_B = np.asarray(ids_B, np.int64)
        valid_B = np.ones(len(ids_B), bool) if valid_B is None else np.asarray(valid_B) > 0
        n_B = np.where(valid_B, self.length_N[ids_B], 0)
        p_B = np.where(valid_B, self.prompt_len_N[ids_B], 0)
        if n_B.max(initial=0) > seq_len:
            raise ValueError(f"seq_len {seq_len} < longest sequence {n_B.max()} in the batch")
        input_ids = np.full((len(ids_B), seq_len), self.pad_id, np.int32)
        for b in np.flatnonzero(valid_B):
            input_ids[b, : n_B[b]] = self.sequence(ids_B[b])
        labels = np.full_like(input_ids, self.pad_id)
        labels[:, :-1] = input_ids[:, 1:]
        t_L = np.arange(seq_len)
        loss_mask = (t_L[None, :] >= p_B[:, None] - 1) & (t_L[None, :] < n_B[:, None] - 1)
        if self.trained_T is not None:  # the earlier assistant turns inside the prompts
            for b in np.flatnonzero(valid_B):
                loss_mask[b, : n_B[b] - 1] |= self.targets(ids_B[b])[1:] > 0
        return {
            "input_ids": input_ids,
            "labels": labels,
            "loss_mask": loss_mask.astype(np.float32),
            "attention_mask": (t_L[None, :] < n_B[:, None]).astype(np.int32),
            "ids": ids_B.astype(np.int32),
            "valid": valid_B.astype(np.float32),
        }

    def prompt_batch(self, ids_B, prompt_len: int, valid_B=None) -> dict:
        """Prompts only, left-padded for generation.

        Args: ids_B, prompt_len (P, at least the longest prompt), valid_B as in ``batch``.
        Returns: dict with prompt_ids (int32 BxP, left-padded with pad), prompt_mask (int32 BxP),
          ids (int32 B), valid (float32 B).
        """
        ids_B = np.asarray(ids_B, np.int64)
        valid_B = np.ones(len(ids_B), bool) if valid_B is None else np.asarray(valid_B) > 0
        p_B = np.where(valid_B, self.prompt_len_N[ids_B], 0)
        if p_B.max(initial=0) > prompt_len:
            raise ValueError(f"prompt_len {prompt_len} < longest prompt {p_B.max()}")
        prompt_ids = np.full((len(ids_B), prompt_len), self.pad_id, np.int32)
        for b in np.flatnonzero(valid_B):
            start = self.offsets_N1[ids_B[b]]
            prompt_ids[b, prompt_len - p_B[b] :] = self.tokens_T[start : start + p_B[b]]
        t_P = np.arange(prompt_len)
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": (t_P[None, :] >= prompt_len - p_B[:, None]).astype(np.int32),
            "ids": ids_B.astype(np.int32),
            "valid": valid_B.astype(np.float32),
        }

    def subset(self, ids_M) -> SFTDataset:
        """Args: ids_M, example ids to keep (in this order).

        Returns: a new dataset whose example j is this dataset's ``ids_M[j]`` (new ids 0..M-1;
        e.g. the ``oracle`` baseline's good-only data). ``report`` is shared.
        """
        ids_M = np.asarray(ids_M, np.int64).reshape(-1)
        return concat([self], [ids_M])

    def response_text(self, i: int) -> str:
        """Args: id. Returns: the decoded response of example i (eos dropped)."""
        seq = self.sequence(i)
        return self.tokenizer.decode(seq[self.prompt_len_N[i] :])


def concat(datasets: list[SFTDataset], ids_per_dataset=None) -> SFTDataset:
    """Concatenate datasets (e.g. the ``mix`` baseline: train then validation).

    Args:
      datasets: SFTDatasets sharing one tokenizer.
      ids_per_dataset: optional ids to take from each (default: all, in order).
    Returns: a dataset with ids 0..M-1 in concatenation order; ``max_len`` is the largest.
    """
    if ids_per_dataset is None:
        ids_per_dataset = [np.arange(len(d)) for d in datasets]
    pieces, lengths, prompt_lens, rows, where, trained = [], [], [], [], [], []
    any_trained = any(d.trained_T is not None for d in datasets)
    for d, ids in zip(datasets, ids_per_dataset, strict=True):
        if d.tokenizer is not datasets[0].tokenizer:
            raise ValueError("concat needs datasets built with the same tokenizer object")
        for i in np.asarray(ids, np.int64):
            pieces.append(d.sequence(i))
            if any_trained:
                trained.append(d.targets(i))
            rows.append(d.rows[i])
            where.append(d.where[i])
        lengths.append(d.length_N[ids])
        prompt_lens.append(d.prompt_len_N[ids])
    lengths = np.concatenate(lengths).astype(np.int64)
    return SFTDataset(
        tokens_T=np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32),
        offsets_N1=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        prompt_len_N=np.concatenate(prompt_lens).astype(np.int32),
        rows=rows,
        where=where,
        tokenizer=datasets[0].tokenizer,
        max_len=max(d.max_len for d in datasets),
        report=datasets[0].report,
        trained_T=np.concatenate(trained).astype(np.uint8) if trained else None,
    )


def tokenize_pairs(pairs, rows, where, tokenizer, *, max_len: int, overlength: str = "error",
                   report: LoadReport | None = None, add_bos: bool = True,
                   response_end: str = "eos") -> SFTDataset:
    """Tokenise (prompt, response) strings into an SFTDataset.

    Args:
      pairs: list of (prompt, response text); a prompt is a text, or :class:`Pieces` whose
        trained pieces (earlier assistant turns) the loss covers.
      rows/where: matching raw rows and locations.
      tokenizer: pipeline tokenizer (see ``jbilevel.data.tokenizer``).
      max_len: longest sequence (bos + prompt + response + eos) kept.
      response_end: "eos" appends the tokenizer's eos to each response; "template": each
        response text (and each trained piece) is a chat template's assistant turn, trained up
        to its first end token (``tokenizer.stop_ids``), which it must hold.
      overlength: "error" raises, "truncate" cuts the response's end (then the prompt's start,
        after bos), "skip" drops the example; truncations and skips are counted in ``report``.
    Returns: the dataset; ids are 0..N-1 in input order over the kept examples.
    """
    if overlength not in POLICIES:
        raise ValueError(f"overlength={overlength!r}; use one of {POLICIES}")
    report = report or LoadReport(n_read=len(pairs))
    prompts_tok, marks = _encode_prompts([p for p, _ in pairs], tokenizer, where, response_end)
    responses_tok = tokenizer.encode_batch([r for _, r in pairs])
    head = [tokenizer.bos_id] if (add_bos and tokenizer.bos_id is not None) else []
    tail = [tokenizer.eos_id] if response_end == "eos" else []
    if head:
        _refuse_second_bos(prompts_tok, head[0], where)
    if response_end == "template":
        responses_tok = [r[: _turn_end(r, tokenizer, where[k], "the response's turn",
                                       pairs[k][1]) + 1] for k, r in enumerate(responses_tok)]
    report.response_end = _end_name(tokenizer, response_end, responses_tok)
    pieces, prompt_lens, lengths, kept_rows, kept_where, kept_marks = [], [], [], [], [], []
    for k, (p, r) in enumerate(zip(prompts_tok, responses_tok, strict=True)):
        n_p, n_r = len(head) + len(p), len(r) + len(tail)
        m = None if marks[k] is None else np.concatenate([np.zeros(len(head), np.uint8),
                                                          marks[k]])
        if n_p == 0:
            raise DataError(f"{where[k]}: the prompt is empty", "empty_prompt")
        if n_p + n_r > max_len:
            msg = (f"{where[k]}: {n_p + n_r} tokens (prompt {n_p}, response {n_r}) > "
                   f"max_len={max_len}")
            if overlength == "error":
                raise DataError(f"{msg}; raise max_len or set overlength='truncate' or 'skip'",
                                "too_long")
            if overlength == "skip":
                report.skip("too_long", msg)
                continue
            report.truncate(msg)
            r = list(r) + tail
            if n_p < max_len:  # cut the response's end first, then the prompt's start
                p, r = head + list(p), r[: max_len - n_p]
            else:  # keep bos, the prompt's end and one response token
                keep = max_len - 1 - len(head)
                p, r = head + list(p)[len(p) - keep :], r[:1]
                m = None if m is None else np.concatenate([m[: len(head)], m[len(m) - keep :]])
            pieces.append(p + r)
            n_p, n_r = len(p), len(r)
        else:
            pieces.extend((head, p, r, tail))
        prompt_lens.append(n_p)
        lengths.append(n_p + n_r)
        kept_rows.append(rows[k])
        kept_where.append(where[k])
        kept_marks.append(m)
    if not lengths:
        raise DataError(f"no examples left: {report}", "empty")
    lengths = np.asarray(lengths, np.int64)
    if all(isinstance(x, np.ndarray) for x in pieces[1::4]):
        tokens_T = np.concatenate([np.asarray(x, np.int32) for x in pieces])
    else:
        tokens_T = np.fromiter(itertools.chain.from_iterable(pieces), np.int32,
                               int(lengths.sum()))
    trained_T = None
    if any(m is not None for m in kept_marks):
        trained_T = np.ones(len(tokens_T), np.uint8)
        for start, n_p, m in zip(lengths.cumsum() - lengths, prompt_lens, kept_marks,
                                 strict=True):
            trained_T[start : start + n_p] = 0 if m is None else m
    report.n_kept = len(lengths)
    return SFTDataset(
        tokens_T=tokens_T,
        offsets_N1=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        prompt_len_N=np.asarray(prompt_lens, np.int32),
        rows=kept_rows,
        where=kept_where,
        tokenizer=tokenizer,
        max_len=max_len,
        report=report,
        trained_T=trained_T,
    )


def _encode_prompts(prompts, tokenizer, where, response_end: str) -> tuple[list, list]:
    """Token ids of each prompt, and for a :class:`Pieces` prompt a 0/1 mark per token (1 on
    its trained pieces: the whole piece, or up to its first end token under ``template``);
    None for a text prompt. A piece is tokenised on its own, as a response is."""
    pieced = [k for k, p in enumerate(prompts) if isinstance(p, Pieces)]
    out = tokenizer.encode_batch(["" if isinstance(p, Pieces) else p for p in prompts])
    marks = [None] * len(prompts)
    encoded = iter(tokenizer.encode_batch([text for k in pieced for text, _ in prompts[k]]))
    for k in pieced:
        ids, mark = [], []
        for text, trained in prompts[k]:
            t, n = list(next(encoded)), 0
            if trained:
                n = (_turn_end(t, tokenizer, where[k], "an earlier assistant turn", text) + 1
                     if response_end == "template" else len(t))
            ids += t
            mark += [1] * n + [0] * (len(t) - n)
        out[k], marks[k] = np.asarray(ids, np.int32), np.asarray(mark, np.uint8)
    return out, marks


def _turn_end(ids, tokenizer, where, what: str, text: str) -> int:
    """Where a templated assistant turn's first end token is; a turn without one is refused by
    name (the model would never learn to stop)."""
    end = np.flatnonzero(np.isin(np.asarray(ids), np.asarray(tokenizer.stop_ids)))
    if not end.size:
        raise DataError(
            f"{where}: the chat template writes {what} as {text[-60:]!r}, which holds none of "
            f"the tokenizer's end tokens (ids {list(tokenizer.stop_ids)}); set "
            "data.response_end=eos (the response followed by the tokenizer's eos), or give "
            "the tokenizer's directory a generation_config.json naming the template's end "
            "token in eos_token_id", "template_turn")
    return int(end[0])


def _end_name(tokenizer, response_end: str, responses_tok) -> str:
    """How the responses end, for the load report, e.g. "the tokenizer's eos <eos> (id 1)" or
    "the chat template's turn end <end_of_turn> (id 106)"."""
    ids = ([tokenizer.eos_id] if response_end == "eos"
           else sorted({int(r[-1]) for r in responses_tok if len(r)}))
    hf = getattr(tokenizer, "hf", None)
    names = [f"{hf.convert_ids_to_tokens(i) if hf is not None else ''} (id {i})".lstrip()
             for i in ids]
    what = "the tokenizer's eos" if response_end == "eos" else "the chat template's turn end"
    return f"{what} {', '.join(names)}"


def _refuse_second_bos(prompts_tok, bos_id: int, where) -> None:
    """A chat template that writes the bos itself (Llama 3's, Gemma's) plus ``add_bos`` would
    start every sequence with two: a format the model never saw. Refused, naming the fix."""
    k = next((k for k, p in enumerate(prompts_tok) if len(p) and p[0] == bos_id), None)
    if k is not None:
        raise DataError(
            f"{where[k]}: the formatted prompt already begins with the tokenizer's bos token "
            f"(id {bos_id}; its chat template writes it), and data.add_bos=true would add a "
            "second one: set data.add_bos=false", "double_bos")


def _bad(report: LoadReport, err: DataError, policy: str) -> None:
    if policy == "error":
        raise err
    report.skip(err.reason, str(err))


def load_sft(source, *, schema: str = "auto", tokenizer=None, max_len: int = 512,
             overlength: str = "error", on_bad_row: str = "error", keys: dict | None = None,
             prompt_template: str | None = None, chat_template: str | None = None,
             chat_template_kwargs: dict | None = None, split: str = "train",
             add_bos: bool = True, response_end: str = "auto",
             assistant_turns: str = "all", max_rows: int = 0) -> SFTDataset:
    """Load an SFT dataset from a local file, a save_to_disk directory, an HF dataset or rows.

    Args:
      source: path (.jsonl/.json/.csv/.parquet/.arrow or save_to_disk dir), hub name (only
        where a hub is reachable), ``datasets.Dataset``, or list of dicts.
      schema: "auto" | "qa" | "alpaca" | "openorca" | "chat" | "sharegpt" | "completion" |
        "chat_completion" (see ``jbilevel.data.schemas``).
      tokenizer: None (built-in CharTokenizer), an HF tokenizer, or a local tokenizer dir.
      max_len: longest sequence (bos + prompt + response + eos).
      overlength: "error" | "truncate" | "skip" for sequences over max_len.
      on_bad_row: "error" raises on the first bad row; "skip" skips and counts each.
      keys: logical field -> column name, e.g. {"response": "answer"}.
      prompt_template: ``str.format`` template over the schema's logical fields.
      chat_template: jinja2 source, or "tokenizer" for the tokenizer's chat template.
      chat_template_kwargs: extra variables the chat template reads, e.g.
        ``{"enable_thinking": False}`` (Qwen3's template).
      split: split for hub names and DatasetDict directories.
      add_bos: prepend the tokenizer's bos (if it has one).
      response_end: "auto" | "eos" | "template": what ends each trained response (see
        ``jbilevel.data.schemas``): the tokenizer's eos, or the chat template's turn end.
      assistant_turns: "all" | "last": a conversation's (chat, sharegpt) every assistant
        turn is trained, or its last one only (the earlier ones are context).
      max_rows: read only the source's first ``max_rows`` rows (0: all), e.g. for a quick
        trial; the report says when rows were left unread.
    Returns: SFTDataset with ids 0..N-1 over kept rows in source order, and ``.report``.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row={on_bad_row!r}; use 'error' or 'skip'")
    tok = as_tokenizer(tokenizer)
    report = LoadReport()
    formatter = None
    pairs, rows, where = [], [], []
    for loc, row in iter_rows(source, split=split):
        if max_rows and report.n_read == max_rows:
            report.row_limit = max_rows  # rows are left unread
            break
        report.n_read += 1
        if isinstance(row, DataError):
            _bad(report, row, on_bad_row)
            continue
        if formatter is None:
            name = detect_schema(row, loc) if schema == "auto" else schema
            formatter = Formatter(name, keys=keys, prompt_template=prompt_template,
                                  chat_template=chat_template,
                                  chat_template_kwargs=chat_template_kwargs, tokenizer=tok,
                                  response_end=response_end, assistant_turns=assistant_turns)
        try:
            pairs.append(formatter(row, loc))
        except DataError as err:
            _bad(report, err, on_bad_row)
            continue
        rows.append(row)
        where.append(loc)
    if report.n_read == 0:
        raise DataError(f"{_name(source)}: no rows (empty file or dataset)", "empty")
    if formatter is not None and formatter.conversations:
        report.assistant_turns = (
            f"assistant turns before the last: {formatter.earlier_turns} (in "
            f"{formatter.conversations} of {len(pairs)} conversations), "
            + ("each trained" if assistant_turns == "all" else "context (only the last turn "
               "is trained)"))
    return tokenize_pairs(pairs, rows, where, tok, max_len=max_len, overlength=overlength,
                          report=report, add_bos=add_bos,
                          response_end=formatter.response_end if formatter else "eos")


def _name(source) -> str:
    return str(source) if isinstance(source, str) else type(source).__name__
