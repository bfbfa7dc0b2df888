"""A run directory belongs to one run: it records the run's configuration and its data.

``jbilevel train --out DIR`` writes ``DIR/config.yaml`` (the settings that apply to the run,
loadable with ``--config``) and ``DIR/run.json`` (a fingerprint of the tokenised data and of
the model directory). Every later start into ``DIR`` compares itself with both, before
anything is written: the same run resumes from its newest checkpoint; anything else is
refused with the differing keys and the ways out (another ``--out``, or deleting ``DIR``).

The keys in :data:`RESUMABLE` may differ on resume: they change how long the run goes, how
often it looks and saves, and how the same computation is laid out on the devices, not what
it computes (``loop.steps`` extends a finished run; ``mesh.*`` resumes on another slice).
The data files and the model directory (:data:`BY_CONTENT`) are compared by their contents,
not by their paths: the data by what it tokenises to, the model by its ``config.json``, its
weight files' sizes and safetensors headers and a sample of their bytes. So a run directory
that moved (with the files of its built-in task in ``DIR/data/``) resumes with the command
that started it and the new ``--out``, and so does a run whose model directory moved (a
checkout or install of jbilevel that moved takes the shipped base with it). A built-in
task's files are checked before they are written again (:func:`check_task_files`): another
task, seed or option is refused without touching the old run's files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jbilevel import config as config_lib
from jbilevel.algorithms.offline import UNIFORM_METHODS
from jbilevel.errors import UserError

RESUMABLE = (
    "loop.steps", "loop.log_every", "loop.checkpoint_every", "loop.keep", "loop.progress",
    "loop.eval_every", "eval_batch_size", "mesh.data", "mesh.fsdp", "mesh.tensor",
    "model.remat", "model.remat_policy", "model.scan_unroll", "model.attention",
    "method.train_chunk", "method.hyper_chunk", "online.gather_params",
    "data.score_validation", "data.score_test",
)
# compared through run.json's fingerprint of their contents instead (check_fingerprint)
BY_CONTENT = ("data.train", "data.validation", "data.test", "model.path")
# each weight file contributes this many evenly spaced samples of this many bytes to the
# model's fingerprint (the whole file when it is smaller): 1 MiB read per file, at any size
WEIGHT_SAMPLES, WEIGHT_SAMPLE_BYTES = 16, 1 << 16
_SHAPE = ("family", "hidden_size", "num_layers", "num_heads", "intermediate_size")
_OMEGA = ("weighting", "lr_omega", "omega_optim", "omega_step_max", "omega_eps",
          "omega_weight_decay", "omega_decay_steps", "omega_normalize")
_BMO = ("lam", "lam_decay", "lam_min")
_BDS = ("hyper_every", "hyper_start", "hyper_max_val_loss", "hypergrad", "mu",
        "hessian_rows", "hyper_chunk")


_NA = "(does not apply)"
# the persistent compilation cache jbilevel train keeps in its --out by default
# (--compile-cache): not part of the run, so a directory holding only it is still a new one
COMPILE_CACHE = "xla_cache"


class RunDirError(UserError):
    """``--out`` holds another run (or something that is not a run)."""


def applied(cfg: Any) -> dict:
    """The settings of an ExperimentConfig that apply to its run, as a nested dict.

    Left out: the built-in task when data comes from files (and the data section when it
    does not), the random model's shape with ``model.path``, LoRA settings for full
    fine-tuning, the omega / bmo / bds settings of methods that do not use them, the online
    section when generation is off, and batch sizes of steps the method does not take. What
    is left out keeps its default when the file is read back, and does not matter.
    """
    d = config_lib.to_dict(cfg)
    method = cfg.method.method
    del d["data" if not cfg.data.train else "task"]
    if cfg.model.path is not None:
        _drop(d["model"], _SHAPE)
    if cfg.theta.kind == "full":
        d["theta"] = {"kind": "full"}
    if method in UNIFORM_METHODS:
        _drop(d["method"], _OMEGA + _BMO + _BDS)
    else:
        _drop(d["method"], _BDS if method == "bmo" else _BMO)
    if not cfg.online.enabled:
        del d["online"]
    if method != "bmo":
        _drop(d["loop"], ("steps_per_epoch",))
    if method in UNIFORM_METHODS:
        _drop(d, ("val_batch_size",))
    if method != "bds":
        _drop(d, ("hyper_batch_size",))
    return d


def _drop(d: dict, keys) -> None:
    for k in keys:
        d.pop(k, None)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "options" and k != "keys":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(recorded: Any, now: Any) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (recorded value, new value)}`` of the applied settings that differ and
    may not differ on resume (a key that applies to only one of them counts; the paths of
    :data:`BY_CONTENT` do not, their contents are compared later by check_fingerprint)."""
    a, b = _flat(applied(recorded)), _flat(applied(now))
    missing = object()
    return {k: (a.get(k, _NA), b.get(k, _NA))
            for k in sorted(set(a) | set(b))
            if k not in RESUMABLE + BY_CONTENT and a.get(k, missing) != b.get(k, missing)}


def check_config(out: str | Path, cfg: Any, *, named: str | Path | None = None) -> bool:
    """Whether ``out`` already holds this run; raises RunDirError if it holds another one.

    Reads only: nothing is written, so a refused run leaves the directory as it was.
    ``named``: the directory the user gave, when ``out`` is inside it (``jbilevel demo``
    keeps one run per method under its ``--out``); the ways out name that one.
    Returns:
      False for a new run (no directory, or one empty but for the compilation cache), True
      for one to resume.
    """
    from jbilevel import experiment

    out = Path(out)
    named = Path(named) if named is not None else out
    config_path = out / "config.yaml"
    if not out.exists() or (out.is_dir() and all(p.name == COMPILE_CACHE
                                                 for p in out.iterdir())):
        return False
    if not out.is_dir():
        raise RunDirError(f"--out {out}: is a file, not a directory; choose another --out")
    if not config_path.exists():
        raise RunDirError(
            f"--out {out}: the directory exists but holds no jbilevel run (no config.yaml); "
            f"choose another --out, or empty the directory ({_remove(out)})")
    try:
        recorded = config_lib.load(experiment.ExperimentConfig, config_path)
    except config_lib.ConfigError as e:
        raise RunDirError(f"--out {out}: its config.yaml no longer loads ({e}); choose another "
                          f"--out, or delete the old run ({_remove(out)})") from None
    diff = differences(recorded, cfg)
    if diff:
        both = {k: ab for k, ab in diff.items() if _NA not in ab}
        lines = "\n".join(f"  {k}: {json.dumps(a)} in the directory, {json.dumps(b)} now"
                          for k, (a, b) in both.items())
        one = [k for k in diff if k not in both]
        if one:
            lines += (f"\n  and {len(one)} settings that apply to only one of the two runs: "
                      f"{', '.join(one)}")
        inside = f" ({out})" if named != out else ""
        raise RunDirError(
            f"--out {named} holds a different run{inside}; its configuration differs in:\n"
            f"{lines}\nResuming would mix two runs. Either give this run its own directory "
            f"(--out {named}_2), or delete the old run to start over ({_remove(named)}). Keys "
            f"that may differ on resume: {', '.join(RESUMABLE)}; the paths of the data files "
            "and of the model directory (their contents are compared).")
    return True


def check_task_files(out: str | Path, task_cfg: Any) -> None:
    """Before a resumed built-in task's files are written again: raises RunDirError when the
    files in ``out/data`` differ from the ones ``task_cfg`` (name, seed, options) gives, so a
    refused run leaves the old run's files as they were. A missing file is not checked (it is
    written again, and the fingerprint compares what it tokenises to)."""
    from jbilevel.data.tasks import split_text, task_rows

    rows = task_rows(task_cfg.name, seed=task_cfg.seed, **task_cfg.options)
    changed = [split for split, split_rows in rows.items()
               if (path := Path(out) / "data" / f"{split}.jsonl").exists()
               and path.read_text() != split_text(split_rows)]
    if changed:
        raise RunDirError(
            f"--out {out}: the run in this directory was trained on other data: task "
            f"{task_cfg.name!r} with seed {task_cfg.seed} and options {task_cfg.options} gives "
            f"other rows than its data/{{{','.join(changed)}}}.jsonl. Either give this run its "
            f"own directory (--out {out}_2), or delete the old run ({_remove(Path(out))}).")


def _remove(out: Path) -> str:
    return f"rm -r {out}"


def fingerprint(task: Any, model_path: str | None) -> dict:
    """What the run computes on beyond its config: each split's tokens and the model files.

    The data part hashes the tokenised examples (token ids, boundaries, prompt lengths, and
    the trained tokens inside the prompts where there are any), so a changed file, tokenizer,
    template or choice of trained turns shows up whatever the file format; the model part
    hashes ``config.json``, lists the weight files' sizes and hashes a sample of the weights
    (:func:`weights_digest`), which tells another fine-tune of the same architecture apart.
    """
    data = {}
    for name, ds in task.splits.items():
        h = hashlib.sha256()
        for a in (ds.tokens_T, ds.offsets_N1, ds.prompt_len_N, ds.trained_T):
            if a is not None:  # trained_T: where earlier assistant turns are trained
                h.update(np.ascontiguousarray(a).tobytes())
        data[name] = {"examples": len(ds), "sha256": h.hexdigest()}
    model = None
    if model_path is not None:
        root = Path(model_path)
        files = sorted(root.glob("*.safetensors"))
        model = {"config_sha256": hashlib.sha256((root / "config.json").read_bytes()).hexdigest(),
                 "weights": {p.name: p.stat().st_size for p in files},
                 "weights_sample_sha256": weights_digest(files)}
    return {"data": data, "model": model}


def weights_digest(files: list[Path]) -> str:
    """sha256 of each weight file's name, size, safetensors header (tensor names, dtypes,
    shapes, offsets) and ``WEIGHT_SAMPLES`` evenly spaced ``WEIGHT_SAMPLE_BYTES`` of its bytes
    (all of a file smaller than that). About 1 MiB read per file, so a start of an 8B-model
    run does not read 16 GB, while a model fine-tuned from the same base differs in nearly
    every sample."""
    h = hashlib.sha256()
    whole = WEIGHT_SAMPLES * WEIGHT_SAMPLE_BYTES
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= whole:
                h.update(f.read())
                continue
            header = int.from_bytes(f.read(8), "little")  # safetensors: u64 length, then JSON
            h.update(f.read(min(header, size - 8)))
            for k in range(WEIGHT_SAMPLES):
                f.seek((size - WEIGHT_SAMPLE_BYTES) * k // (WEIGHT_SAMPLES - 1))
                h.update(f.read(WEIGHT_SAMPLE_BYTES))
    return h.hexdigest()


def check_fingerprint(out: str | Path, now: dict, model_path: str | None = None) -> None:
    """Raises RunDirError when ``out/run.json`` records other data or another model.

    ``model_path``: this start's ``model.path``. A run.json written before the weights were
    sampled (no ``weights_sample_sha256``) cannot tell a moved model from another one, so
    for it the model directory must also be where ``out/config.yaml`` says it was.
    """
    path = Path(out) / "run.json"
    if not path.exists():
        return
    recorded = json.loads(path.read_text()).get("fingerprint", {})
    then = recorded.get("data", {})
    # a test split one of the two starts did not read (data.score_test=false, or no data.test)
    # is no change: training never reads it
    changed = [f"data.{k}" for k in sorted(set(then) | set(now["data"]))
               if then.get(k) != now["data"].get(k)
               and not (k == "test" and (k not in then or k not in now["data"]))]
    if not _same_model(recorded.get("model"), now["model"], Path(out), model_path):
        changed.append("model.path")
    if changed:
        was = {k: v["examples"] for k, v in then.items()}
        new = {k: v["examples"] for k, v in now["data"].items()}
        raise RunDirError(
            f"--out {out}: the run in this directory was trained on other contents of "
            f"{', '.join(changed)} (the files or what they tokenise to changed; examples "
            f"then: {was}, now: {new}). Either give this run its own "
            f"directory (--out {out}_2), or delete the old run ({_remove(Path(out))}).")


def _same_model(recorded: dict | None, now: dict | None, out: Path,
                model_path: str | None) -> bool:
    sample = "weights_sample_sha256"
    if recorded is None or now is None or sample in recorded:
        return recorded == now
    from jbilevel import experiment  # an older run.json: the same contents and the same path

    then = config_lib.load(experiment.ExperimentConfig, out / "config.yaml").model.path
    return recorded == {k: v for k, v in now.items() if k != sample} and then == model_path


def record(out: str | Path, cfg: Any, fingerprint: dict, model_summary: str = "") -> None:
    """Writes ``config.yaml`` (the applied settings) and ``run.json`` (the fingerprint)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    header = [f"# jbilevel train --config {out / 'config.yaml'} --out {out}",
              "# The settings that apply to this run; the ones left out keep their defaults and "
              "do not apply."]
    if model_summary:
        header.append(f"# model: {model_summary}")
    body = yaml.safe_dump(applied(cfg), sort_keys=False)
    _write_whole(out / "config.yaml", "\n".join(header) + "\n" + body)
    _write_whole(out / "run.json", json.dumps({"fingerprint": fingerprint}, indent=2) + "\n")


def _write_whole(path: Path, text: str) -> None:
    """Writes by renaming a finished temporary file: a reader (another process, a later
    start after a kill) sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def model_summary(model_config: Any, path: str | None) -> str:
    """One line on the model a run builds (for a pretrained one, what its config.json says)."""
    c = model_config
    where = f"as {path}/config.json says" if path else "random init"
    return (f"{c.model_type or c.family} ({where}): hidden {c.hidden_size}, {c.num_layers} "
            f"layers, {c.num_heads} heads, vocab {c.vocab_size}")


def latest_checkpoint(out: str | Path) -> int | None:
    """The newest finished checkpoint step in ``out/checkpoints`` (read from the directory
    names: orbax commits a step by renaming its temporary directory to the step number)."""
    root = Path(out) / "checkpoints"
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
    return max(steps, default=None)
