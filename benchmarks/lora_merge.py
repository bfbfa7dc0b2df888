"""What merging a LoRA run's adapters into its base's dtype keeps of their update, for the
update as trained and scaled down (standing for the smaller updates of lower learning rates).

    PYTHONPATH=. python benchmarks/lora_merge.py --run runs/lora [--scales 1 0.3 0.1 0.03 0.01]

Reads the run's ``adapter/`` and its base (``model.path``) in the run's ``model.param_dtype``
and prints, for each scale of the update ``(alpha / r) A B``: its median size against the
weights it is added to, the share of its elements the merge rounds to nothing and the merged
update's error relative to its size (``jbilevel.models.lora.merge_rounding``; scale 1 is
results.json's ``lora_merge_lost`` / ``lora_merge_error``). docs/llm.md has a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jbilevel import saved
from jbilevel.models import load_adapter, load_pretrained
from jbilevel.models.lora import kernel_updates, merge_rounding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished LoRA run directory")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.3, 0.1, 0.03, 0.01])
    args = parser.parse_args()
    cfg = saved.load_config(args.run)
    _, base, config = load_pretrained(cfg.model.path, jnp.dtype(cfg.model.param_dtype))
    lora = load_adapter(str(Path(args.run) / "adapter"), config)
    print(f"{args.run}: rank {lora.rank} on {', '.join(sorted(lora.weights))}, base "
          f"{cfg.model.path} in {cfg.model.param_dtype}")
    print("| update scale | median update / weight (abs) | elements rounded to nothing | error |")
    print("|---|---|---|---|")
    for scale in args.scales:
        scaled = dataclasses.replace(lora, alpha=lora.alpha * scale)
        updates = kernel_updates(base, scaled, config)
        ratios = np.concatenate([
            np.asarray(jnp.abs(u) / jnp.maximum(jnp.abs(base["layers"][s]["kernel"]
                                                        .astype(jnp.float32)), 1e-12)).ravel()
            for s, u in updates.items()])
        measured = jax.jit(merge_rounding, static_argnums=2)(base, scaled, config)
        print(f"| {scale:g} | {np.median(ratios):.2%} | {float(measured['lost']):.1%} | "
              f"{float(measured['error']):.1%} |")


if __name__ == "__main__":
    main()
