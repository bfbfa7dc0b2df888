"""Writes tiny random HF checkpoints + reference outputs for the model-parity tests.

Run (needs torch, e.g. `pip install torch==2.13.0` CPU wheel, and transformers 5):

    PYTHONPATH=. python scripts/make_model_fixtures.py [--out tests/fixtures/models]

For every case it saves config.json + model.safetensors (HF save_pretrained) and ref.npz:
  input_ids (2, 12), logits: plain forward;
  pad_ids, pad_mask, pad_logits: left-padded forward with HF generate's position ids;
  prompt_ids, prompt_mask (2, 6, left padded), greedy (2, 8): HF generate(do_sample=False).
Weights are redrawn with larger scale than HF's init so logits are far from uniform and
greedy argmaxes are not near-ties. Re-running reproduces the files (fixed seeds).
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import torch
import transformers as tf

V = 128


def cases():
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0)
    yield "llama", tf.LlamaConfig(**{**small, "num_key_value_heads": 2},
                                  tie_word_embeddings=False)
    yield "llama_tied_llama3", tf.LlamaConfig(
        **{**small, "hidden_size": 64}, num_key_value_heads=4, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))
    yield "llama_dynamic_bias", tf.LlamaConfig(
        **{**small, "max_position_embeddings": 8}, num_key_value_heads=1, attention_bias=True,
        mlp_bias=True, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))
    yield "qwen2", tf.Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=False)
    yield "mistral", tf.MistralConfig(
        **small, num_key_value_heads=2, head_dim=8, sliding_window=4,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))
    yield "gpt_neox", tf.GPTNeoXConfig(
        **small, use_parallel_residual=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))
    yield "gpt_neox_seq", tf.GPTNeoXConfig(
        **{**small, "hidden_size": 64}, use_parallel_residual=False, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25))
    yield "gpt2", tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # Last, so that the cases above keep their seeds (the case's index).
    # Qwen3: q/k norms, a head width that is not hidden_size / heads, GQA, tied head.
    yield "qwen3", tf.Qwen3Config(**small, num_key_value_heads=2, head_dim=16,
                                  tie_word_embeddings=True)
    # Gemma 2: soft caps, windowed and full layers alternating, sandwich norms, query scale.
    gemma = {**small, "num_hidden_layers": 3, "num_key_value_heads": 2, "head_dim": 16,
             "sliding_window": 4, "query_pre_attn_scalar": 24}
    yield "gemma2", tf.Gemma2Config(**gemma, attn_logit_softcapping=5.0,
                                    final_logit_softcapping=3.0)
    # Gemma 3 (text): q/k norms, and RoPE per layer type (scaled on the full layers only).
    yield "gemma3_text", tf.Gemma3TextConfig(
        **gemma, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", rope_theta=100000.0,
                                                factor=2.0),
                         "sliding_attention": dict(rope_type="default", rope_theta=1000.0)})


def load(path):
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    attn_implementation="eager")
    return model.eval()


def hf_positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/models")
    ap.add_argument("--only", nargs="*", help="write these cases only (default: all)")
    args = ap.parse_args()
    for i, (name, cfg) in enumerate(cases()):
        if args.only and name not in args.only:
            continue
        torch.manual_seed(i)
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.ndim == 1 and pname.endswith("weight"):  # norm scales
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif p.ndim == 1:
                    p.copy_(0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.15 * torch.randn_like(p))
        path = os.path.join(args.out, name)
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path)
        if os.path.exists(os.path.join(path, "generation_config.json")):
            os.remove(os.path.join(path, "generation_config.json"))
        rs = np.random.RandomState(100 + i)
        ref = {}
        ids = rs.randint(3, V, size=(2, 12)).astype(np.int64)
        with torch.no_grad():
            ref["input_ids"] = ids
            ref["logits"] = load(path)(torch.tensor(ids)).logits.numpy()
            pad_mask = np.ones((2, 12), np.int64)
            pad_mask[0, :4] = 0
            pad_mask[1, :1] = 0
            pad_ids = np.where(pad_mask > 0, rs.randint(3, V, size=(2, 12)), 0)
            ref["pad_ids"], ref["pad_mask"] = pad_ids, pad_mask
            ref["pad_logits"] = load(path)(
                torch.tensor(pad_ids), attention_mask=torch.tensor(pad_mask),
                position_ids=torch.tensor(hf_positions(pad_mask))).logits.numpy()
            prompt_mask = np.ones((2, 6), np.int64)
            prompt_mask[1, :2] = 0
            prompt_ids = np.where(prompt_mask > 0, rs.randint(3, V, size=(2, 6)), 0)
            ref["prompt_ids"], ref["prompt_mask"] = prompt_ids, prompt_mask
            out = load(path).generate(
                torch.tensor(prompt_ids), attention_mask=torch.tensor(prompt_mask),
                do_sample=False, max_new_tokens=8, min_new_tokens=8, eos_token_id=None,
                pad_token_id=0)
            ref["greedy"] = out[:, 6:].numpy()
        np.savez(os.path.join(path, "ref.npz"), **ref)
        print(name, {k: v.shape for k, v in ref.items()})


if __name__ == "__main__":
    main()
