"""Data: SFT ingestion, prompt masking, fixed-shape batches with stable ids, built-in tasks.

Public API::

    ds = load_sft("train.jsonl", schema="auto", tokenizer=None, max_len=512)
    batcher = Batcher(ds, batch_size=16, seed=0)
    batch = next(batcher)  # input_ids/labels/loss_mask/attention_mask BxL, ids/valid B
    task = make_task("quality", seed=0)
    export_curated(ds, weights_N, "curated.jsonl", top_frac=0.5)
"""

from jbilevel.data.batching import Batcher, default_buckets
from jbilevel.data.dataset import SFTDataset, concat, load_sft, tokenize_pairs
from jbilevel.data.export import export_curated, select_ids, source_of
from jbilevel.data.metrics import auroc, weight_mass_on_good
from jbilevel.data.report import DataError, LoadReport
from jbilevel.data.tasks import Task, make_task
from jbilevel.data.tokenizer import CharTokenizer, HFTokenizer, as_tokenizer

__all__ = [
    "Batcher",
    "CharTokenizer",
    "DataError",
    "HFTokenizer",
    "LoadReport",
    "SFTDataset",
    "Task",
    "as_tokenizer",
    "auroc",
    "concat",
    "default_buckets",
    "export_curated",
    "load_sft",
    "make_task",
    "select_ids",
    "source_of",
    "tokenize_pairs",
    "weight_mass_on_good",
]
