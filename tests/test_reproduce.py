"""scripts/reproduce.py: the mean ± std table over seeds (the sweep is smoke-tested by hand)."""

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "reproduce", Path(__file__).parents[1] / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(reproduce)


def test_summary_and_table():
    results = {"mix": [{"test_accuracy": 0.5, "val_loss": 1.0}, {"test_accuracy": 0.7,
                                                                "val_loss": 3.0}],
               "bds": [{"test_accuracy": 0.9, "weight_auroc": 0.8}]}
    summary = reproduce.summarise(results)
    mean, std, n = summary["mix"]["test_accuracy"]
    assert (mean, n) == (pytest.approx(0.6), 2)
    assert std == pytest.approx(0.1414213, rel=1e-5)  # sample std (ddof=1)
    assert summary["bds"]["test_accuracy"] == (0.9, 0.0, 1)
    table = reproduce.markdown(summary, "python scripts/reproduce.py --seeds 0 1", [0, 1])
    assert "| method | test_accuracy | val_loss | weight_auroc |" in table
    assert "| mix | 0.6 ± 0.14 | 2 ± 1.4 |  |" in table
    assert "| bds | 0.9 ± 0 |  | 0.8 ± 0 |" in table
