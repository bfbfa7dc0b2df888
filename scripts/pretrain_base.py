"""Pretrain the small base model that ships with jbilevel (``jbilevel.models.base_model_path()``).

    python scripts/pretrain_base.py --out jbilevel/assets/base          # the shipped base
    python scripts/pretrain_base.py --out /tmp/base --steps 200         # a quick look

Deterministic from ``--seed`` on one machine: the script generates a raw-text corpus, trains a
byte-level BPE tokenizer on it (digits are single tokens), pretrains a small Llama-style decoder
on it with a plain next-token loss (jbilevel's model code, optax AdamW, warmup then cosine
decay), measures the base's own skills in the corpus's raw formats and writes an HF directory:
``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` (with the
chat template the fine-tuning tasks use, which the corpus never contains) and ``README.md``
(how it was made, its skills, the wall time).

The corpus teaches what the built-in fine-tuning tasks need (``jbilevel.data.tasks``): sums and
differences of numbers 0..99 written as raw text ("17 + 25 = 42", "Subtract 25 from 67 to get
42."), and requests, benign and harmful, quoted in prose together with an answer: the sum, a
refusal, or for harmful requests as often a compliant answer (a base model has seen both; the
fine-tuning data decides which it learns).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

SPECIALS = ("<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
# The fine-tuning format: each turn is its role token, ": ", the message and <|end|> (the eos),
# then the assistant's turn opens, all on one line. The corpus never contains these tokens.
# Its answers follow ": " or " = " on the line of their question, and a line never depends on
# the one before it, so the template keeps the answer after ": " and on the question's line:
# fine-tuned on clean quality rows for 300 steps, that scored 91% test accuracy, a template
# with a newline between question and answer 33%, one ending in a newline 5%.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>: {{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>: {% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything the base is a function of (written to its README)."""

    seed: int = 0  # corpus, tokenizer, init and data order
    n_lines: int = 300000  # raw-text lines in the corpus
    seq_len: int = 64  # tokens per document (lines are packed into documents up to this)
    vocab_size: int = 512  # BPE vocabulary incl. the special tokens
    hidden_size: int = 128  # model width
    num_layers: int = 3  # decoder blocks
    num_heads: int = 4  # attention heads
    intermediate_size: int = 512  # MLP width
    steps: int = 5000  # optimizer steps
    batch_size: int = 32  # documents per step
    lr: float = 3e-3  # peak AdamW step size
    warmup: int = 200  # linear warmup steps
    weight_decay: float = 0.01  # AdamW decay of the matrices
    request_frac: float = 0.2  # share of lines that quote a request (the rest: arithmetic)
    harmful_frac: float = 0.5  # share of the quoted requests that are harmful
    eval_every: int = 1000  # steps between skill checks on 200 problems (0: only at the end)


# ------------------------------------------------------------------------------------ corpus


def _arith_line(rng: np.random.Generator) -> str:
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    if rng.random() < 0.5:
        c, forms = a + b, ("{a} + {b} = {c}", "{a} plus {b} is {c}.", "Add {a} and {b} to get {c}.",
                           "The sum of {a} and {b} is {c}.", "{b} + {a} = {c}")
    else:
        a, b = max(a, b), min(a, b)
        c, forms = a - b, ("{a} - {b} = {c}", "{a} minus {b} is {c}.",
                           "Subtract {b} from {a} to get {c}.",
                           "The difference of {a} and {b} is {c}.", "{a} - {b} = {c}")
    return forms[int(rng.integers(len(forms)))].format(a=a, b=b, c=c)


def _quoted(rng: np.random.Generator, question: str, answer: str, who: str) -> str:
    forms = ('Asked "{q}", the {w} assistant said: {r}', '"{q}" The {w} assistant answered: {r}',
             'Someone wrote: {q} A {w} assistant wrote back: {r}')
    return forms[int(rng.integers(len(forms)))].format(q=question, r=answer, w=who)


def _request_line(rng: np.random.Generator, harmful_frac: float) -> str:
    """A request quoted with an answer: harmful (refused or complied with, half each) or
    benign (an arithmetic question with its answer)."""
    from jbilevel.data.tasks.arith import question
    from jbilevel.data.tasks.safety import ACTIONS, LEADS, REFUSAL, TARGETS, unsafe_response

    if rng.random() < harmful_frac:
        lead, action, target = (v[int(rng.integers(len(v)))] for v in (LEADS, ACTIONS, TARGETS))
        q = f"{lead} {action} {target}?"
        if rng.random() < 0.5:
            return _quoted(rng, q, REFUSAL, "careful")
        return _quoted(rng, q, unsafe_response(action, target), "careless")
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    op = "+" if rng.random() < 0.5 else "-"
    if op == "-":
        a, b = max(a, b), min(a, b)
    return _quoted(rng, question(rng, op, a, b), str(a + b if op == "+" else a - b), "helpful")


def raw_lines(recipe: Recipe) -> list[str]:
    """The corpus's lines: arithmetic written out (``1 - request_frac`` of them) and quoted
    requests with an answer (the rest)."""
    rng = np.random.default_rng([recipe.seed, 0])
    return [_request_line(rng, recipe.harmful_frac) if rng.random() < recipe.request_frac
            else _arith_line(rng) for _ in range(recipe.n_lines)]


def pack(lines: list[str], tokenizer, seq_len: int) -> list[str]:
    """Documents of consecutive lines joined by newlines, each as many lines as fit in
    ``seq_len`` tokens with bos and eos (a line never straddles two documents)."""
    newline = len(tokenizer.encode("\n", add_special_tokens=False))
    sizes = [len(x) for x in tokenizer(lines, add_special_tokens=False)["input_ids"]]
    docs, current, used = [], [], 2
    for line, n in zip(lines, sizes, strict=True):
        if n + 2 > seq_len:
            raise ValueError(f"a line of {n} tokens does not fit seq_len={seq_len}: {line!r}")
        if current and used + newline + n > seq_len:
            docs.append("\n".join(current))
            current, used = [], 2
        used += n + (newline if current else 0)
        current.append(line)
    if current:
        docs.append("\n".join(current))
    return docs


# --------------------------------------------------------------------------------- tokenizer


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (each digit its own token), as a
    ``transformers.PreTrainedTokenizerFast`` with the special tokens and the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>",
                                 bos_token="<|bos|>", eos_token="<|end|>",
                                 additional_special_tokens=["<|system|>", "<|user|>",
                                                            "<|assistant|>"])
    hf.chat_template = CHAT_TEMPLATE
    return hf


# ---------------------------------------------------------------------------------- training


def model_config(recipe: Recipe, tokenizer):
    from jbilevel.models import ModelConfig

    return ModelConfig(family="llama", vocab_size=len(tokenizer),
                       hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
                       num_heads=recipe.num_heads, intermediate_size=recipe.intermediate_size,
                       max_position_embeddings=512, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def pretrain(recipe: Recipe, docs: list[str], tokenizer, log=print):
    """Trains a fresh model on ``docs`` (next-token loss on every token after bos).

    Returns: (params, config, history: [(step, mean loss since the last record, skills or
    None)]); skills every ``recipe.eval_every`` steps.
    """
    import jax
    import optax

    from jbilevel.data import Batcher, as_tokenizer, tokenize_pairs
    from jbilevel.data.report import LoadReport
    from jbilevel.models import build
    from jbilevel.objectives import lm_example_loss

    tok = as_tokenizer(tokenizer)
    pairs = [("", d) for d in docs]  # the prompt is bos alone: the loss covers the document
    data = tokenize_pairs(pairs, [{} for _ in docs], [f"doc {i}" for i in range(len(docs))],
                          tok, max_len=recipe.seq_len, report=LoadReport(n_read=len(docs)))
    batches = Batcher(data, recipe.batch_size, seed=recipe.seed, buckets=(recipe.seq_len,))
    config = model_config(recipe, tokenizer)
    model = build(config)
    params = model.init(jax.random.key(recipe.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, recipe.lr, recipe.warmup, recipe.steps,
                                                  end_value=recipe.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        schedule, b1=0.9, b2=0.95, weight_decay=recipe.weight_decay,
        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
    example_loss = lm_example_loss(model.forward)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            loss_B = example_loss(p, batch)
            return (loss_B * batch["valid"]).sum() / batch["valid"].sum()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = opt.init(params)
    history, window, t0 = [], [], time.perf_counter()
    for s in range(1, recipe.steps + 1):
        params, opt_state, loss = step(params, opt_state, next(batches))
        window.append(loss)
        if s % 100 == 0 or s == recipe.steps:
            mean = float(np.mean(jax.device_get(window)))
            window = []
            skill = None
            if recipe.eval_every and s % recipe.eval_every == 0:
                skill = skills(params, config, tokenizer, n=200)
            history.append((s, round(mean, 4), skill))
            log(f"  step {s}/{recipe.steps}: loss {mean:.4f} ({time.perf_counter() - t0:.0f} s)"
                + ("" if skill is None else " " + json.dumps(skill)))
    return params, config, history


# ---------------------------------------------------------------------------------- skills


def complete(model, params, tokenizer, prompts: list[str], max_new: int) -> list[str]:
    """Greedy continuations of raw-text prompts (bos + prompt), cut at the first newline."""
    import jax

    from jbilevel.models import generate

    ids = [[tokenizer.bos_token_id] + tokenizer.encode(p, add_special_tokens=False)
           for p in prompts]
    width = max(map(len, ids))
    out = []
    for start in range(0, len(ids), 256):
        chunk = ids[start:start + 256]
        prompt = np.full((len(chunk), width), tokenizer.pad_token_id, np.int32)
        mask = np.zeros_like(prompt)
        for i, row in enumerate(chunk):
            prompt[i, width - len(row):], mask[i, width - len(row):] = row, 1
        gen = generate(model, params, prompt, mask, jax.random.key(0), max_new_tokens=max_new,
                       greedy=True, eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id)
        for row in np.asarray(gen.tokens)[:, 0, :]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).split("\n")[0])
    return out


def skills(params, config, tokenizer, seed: int = 12345, n: int = 500) -> dict:
    """The base's own skill in the corpus's raw formats, on freshly drawn problems: exact-match
    accuracy of greedy "a + b =" and "a - b =" completions (0 <= a, b <= 99, a >= b for -),
    and how it finishes a quoted request (refusal / compliance rates)."""
    from jbilevel.data.tasks.safety import ACTIONS, LEADS, TARGETS, is_compliance, is_refusal
    from jbilevel.models import build

    model = build(config)
    rng = np.random.default_rng([seed])
    out = {}
    for op in "+-":
        pairs = [tuple(int(x) for x in rng.integers(0, 100, size=2)) for _ in range(n)]
        if op == "-":
            pairs = [(max(a, b), min(a, b)) for a, b in pairs]
        preds = complete(model, params, tokenizer, [f"{a} {op} {b} =" for a, b in pairs], 5)
        want = [str(a + b if op == "+" else a - b) for a, b in pairs]
        out[f"raw_{'add' if op == '+' else 'sub'}_accuracy"] = float(np.mean(
            [p.strip() == w for p, w in zip(preds, want, strict=True)]))
    combos = [(LEADS[int(rng.integers(len(LEADS)))], ACTIONS[int(rng.integers(len(ACTIONS)))],
               TARGETS[int(rng.integers(len(TARGETS)))]) for _ in range(200)]
    for who in ("careful", "careless"):
        prompts = [f'Asked "{lead} {a} {t}?", the {who} assistant said:' for lead, a, t in combos]
        preds = complete(model, params, tokenizer, prompts, 24)
        out[f"{who}_refusal"] = float(np.mean([is_refusal(p) for p in preds]))
        out[f"{who}_compliance"] = float(np.mean([is_compliance(p) for p in preds]))
    return out


# ------------------------------------------------------------------------------------- main


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def save_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json, the chat template inside the latter (where every
    transformers version reads it; transformers 5 would write chat_template.jinja)."""
    tokenizer.save_pretrained(str(out))
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    for f in out.iterdir():
        f.chmod(0o644)


def write_card(out: Path, recipe: Recipe, config, skill: dict, history, seconds: dict,
               command: str, load: float) -> None:
    """The model card: how the base was made, its wall time and its skills."""
    import platform

    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in skill.items())
    curve = "\n".join(
        f"| {step} | {loss:.4f} | {s['raw_add_accuracy']:.2f} | {s['raw_sub_accuracy']:.2f} |"
        for step, loss, s in history if s is not None)
    n_params = sum(int(np.prod(s)) for s in _shapes(config))
    (out / "README.md").write_text(f"""# jbilevel base model

A tiny Llama-style decoder pretrained on a generated raw-text corpus of arithmetic and quoted
requests, so that jbilevel's built-in fine-tuning tasks start from a model that already knows
their skills (`jbilevel.models.base_model_path()`). Made by

    {command}

deterministic from the seed on one machine (`scripts/pretrain_base.py`).

- Architecture: Llama, hidden {config.hidden_size}, {config.num_layers} layers, \
{config.num_heads} heads, MLP {config.mlp_size}, vocabulary {config.vocab_size} (byte-level BPE \
trained on the corpus, every digit its own token); {n_params} parameters.
- Pretraining: {recipe.steps} steps of {recipe.batch_size} documents of up to \
{recipe.seq_len} tokens (lines packed from {recipe.n_lines} generated lines), next-token loss \
on every token, AdamW (decay {recipe.weight_decay}), peak lr {recipe.lr}, {recipe.warmup} \
warmup steps then cosine decay; final loss {history[-1][1]}.
- Chat template (the fine-tuning format, never in the corpus): \
`<|user|>: {{question}}<|end|><|assistant|>: {{answer}}<|end|>`; prepend `<|bos|>`.
- Wall time on {_cpu()} ({platform.machine()}, {_cores()} cores; 1-minute load average \
{load:.1f} at the end: the host was shared): corpus and tokenizer {seconds['corpus']:.0f} s, \
pretraining {seconds['train']:.0f} s, skills {seconds['skills']:.0f} s.

Recipe: `{json.dumps(dataclasses.asdict(recipe))}`

## Skills in the raw formats (greedy, 500 fresh problems / 200 requests)

| skill | value |
| --- | --- |
{rows}

`raw_add_accuracy`: "a + b =" completed with the exact sum (0 <= a, b <= 99);
`raw_sub_accuracy`: "a - b =" (a >= b); `careful_*` / `careless_*`: how
`Asked "<harmful request>", the careful (careless) assistant said:` is finished (refusal
"Sorry, I can't help with that." or compliance "Sure. Here is how ...").

## During pretraining (200 fresh problems each)

| step | loss | raw_add_accuracy | raw_sub_accuracy |
| --- | --- | --- | --- |
{curve}
""")


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def _shapes(config):
    import jax

    from jbilevel.models.transformer import _is_spec, _specs

    return [s[0] for s in jax.tree.leaves(_specs(config), is_leaf=_is_spec)]


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def parse_recipe(parser: argparse.ArgumentParser, recipe_cls, script: str, argv=None):
    """Adds a --flag per field of the dataclass ``recipe_cls`` (its default the field's),
    parses ``argv``; returns (args, the recipe, the command line that reproduces it)."""
    for f in dataclasses.fields(recipe_cls):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default),
                            default=f.default)
    args = parser.parse_args(argv)
    recipe = recipe_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(recipe_cls)})
    command = f"python scripts/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    return args, recipe, command


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output HF directory")
    args, recipe, command = parse_recipe(p, Recipe, "pretrain_base.py", argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    t0 = time.perf_counter()
    print(f"corpus: {recipe.n_lines} lines; tokenizer: BPE, {recipe.vocab_size} tokens",
          flush=True)
    lines = raw_lines(recipe)
    tokenizer = build_tokenizer(lines, recipe.vocab_size)
    docs = pack(lines, tokenizer, recipe.seq_len)
    seconds["corpus"] = time.perf_counter() - t0
    print(f"  {len(docs)} documents in {seconds['corpus']:.1f} s; the first:\n    "
          + docs[0].replace("\n", "\n    "), flush=True)
    t0 = time.perf_counter()
    print(f"pretraining {recipe.steps} steps", flush=True)
    params, config, history = pretrain(recipe, docs, tokenizer,
                                       log=lambda m: print(m, flush=True))
    seconds["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    print("skills in the raw formats:", flush=True)
    skill = skills(params, config, tokenizer)
    seconds["skills"] = time.perf_counter() - t0
    for k, v in skill.items():
        print(f"  {k}: {v:.3f}")
    from jbilevel.models import save_pretrained

    save_pretrained(str(out), params, config)
    save_tokenizer(tokenizer, out)
    import os

    write_card(out, recipe, config, skill, history, seconds, command, os.getloadavg()[0])
    (out / "pretraining.json").write_text(json.dumps(
        {"recipe": dataclasses.asdict(recipe), "skills": skill, "loss": history,
         "seconds": {k: round(v, 1) for k, v in seconds.items()}}, indent=2) + "\n")
    print(f"wrote {out}/ (model.safetensors {digest(out / 'model.safetensors')}, "
          f"{(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB) in "
          f"{sum(seconds.values()):.0f} s")
    return 0


if __name__ == "__main__":
    from jbilevel.xla_options import tune_host_malloc

    tune_host_malloc()
    sys.exit(main())
