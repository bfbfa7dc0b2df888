"""Prompt masking and batch layout, hand-checked for every schema (built-in char tokenizer)."""

import os

import numpy as np
import pytest

from jbilevel.data import CharTokenizer, DataError, load_sft
from jbilevel.data.schemas import ALPACA_NO_INPUT_TEMPLATE, ALPACA_TEMPLATE

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
TOK = CharTokenizer()
PAD, BOS, EOS = TOK.pad_id, TOK.bos_id, TOK.eos_id


def _c(ch):
    return TOK.encode(ch)[0]


def test_batch_arrays_exact_by_hand():
    ds = load_sft([{"question": "ab", "response": "c"}], schema="qa",
                  prompt_template="{question}|", max_len=16)
    b = ds.batch([0], 8)
    a, bb, bar, c = _c("a"), _c("b"), _c("|"), _c("c")
    np.testing.assert_array_equal(b["input_ids"], [[BOS, a, bb, bar, c, EOS, PAD, PAD]])
    np.testing.assert_array_equal(b["labels"], [[a, bb, bar, c, EOS, PAD, PAD, PAD]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 0, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b["ids"], [0])
    np.testing.assert_array_equal(b["valid"], [1.0])
    assert b["input_ids"].dtype == np.int32 and b["labels"].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32 and b["attention_mask"].dtype == np.int32
    assert b["ids"].dtype == np.int32 and b["valid"].dtype == np.float32
    p = ds.prompt_batch([0], 6)
    np.testing.assert_array_equal(p["prompt_ids"], [[PAD, PAD, BOS, a, bb, bar]])
    np.testing.assert_array_equal(p["prompt_mask"], [[0, 0, 1, 1, 1, 1]])


def _check(ds, i, prompt_text, response_text):
    """The sequence is bos+prompt+response+eos; the loss covers exactly response+eos."""
    b = ds.batch([i], ds.max_len)
    ids, labels, mask = b["input_ids"][0], b["labels"][0], b["loss_mask"][0]
    n = int(b["attention_mask"][0].sum())
    p = len(prompt_text) + 1
    assert ids[0] == BOS
    assert TOK.decode(ids[1:p]) == prompt_text
    assert TOK.decode(ids[p:n]) == response_text
    assert ids[n - 1] == EOS
    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(p - 1, n - 1))
    assert TOK.decode(labels[mask > 0]) == response_text
    assert labels[mask > 0][-1] == EOS


def test_qa_schema():
    ds = load_sft([{"question": "Hi?", "response": "Yo"}], max_len=64)
    _check(ds, 0, "Question: Hi?\nAnswer: ", "Yo")


def test_openorca_schema_with_and_without_system():
    ds = load_sft(os.path.join(FIXTURES, "openorca.jsonl"), max_len=128)
    assert len(ds) == 3
    _check(ds, 0, "You are an AI assistant. Answer briefly.\n\nQuestion: "
                  "What is the capital of France?\nAnswer: ", "Paris.")
    _check(ds, 1, "Question: Translate 'chat' to English.\nAnswer: ", "cat")


def test_redorca_schema_loads_as_openorca():
    ds = load_sft(os.path.join(FIXTURES, "redorca.jsonl"), max_len=128)
    _check(ds, 0, "You are an AI assistant.\n\nQuestion: How do I pick a lock?\nAnswer: ",
           "I can't help with that.")
    _check(ds, 1, "Question: Name a fruit.\nAnswer: ", "Apple.")


def test_alpaca_schema_with_and_without_input():
    ds = load_sft(os.path.join(FIXTURES, "alpaca_cleaned.json"), max_len=256)
    _check(ds, 0, ALPACA_NO_INPUT_TEMPLATE.format(instruction="Give a synonym for happy."),
           "Joyful.")
    _check(ds, 1, ALPACA_TEMPLATE.format(instruction="Sum the numbers.", input="2, 3"), "5")


def test_chat_schema_default_template():
    ds = load_sft(os.path.join(FIXTURES, "chat.jsonl"), max_len=128)
    _check(ds, 0, "<|system|>\nBe terse.\n<|user|>\nHi?\n<|assistant|>\n", "Hello.")
    _check(ds, 1, "<|user|>\n2+2?\n<|assistant|>\n", "4")


def test_custom_keys_and_jinja_chat_template_on_qa():
    rows = [{"q": "Hi?", "a": "Yo", "sys": "Be nice."}]
    ds = load_sft(rows, schema="openorca",
                  keys={"question": "q", "response": "a", "system_prompt": "sys"},
                  chat_template="{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                                "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
                  max_len=64)
    _check(ds, 0, "[system]Be nice.[user]Hi?[assistant]", "Yo")


def test_tokenizer_chat_template(tmp_path):
    hf = TOK.to_hf()
    hf.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    ds = load_sft([{"question": "Hi?", "response": "Yo"}], tokenizer=hf,
                  chat_template="tokenizer", max_len=64)
    b = ds.batch([0], 32)
    n = int(b["attention_mask"][0].sum())
    assert TOK.decode(b["input_ids"][0, 1:n]) == "user: Hi?\nassistant: Yo"
    assert TOK.decode(b["labels"][0][b["loss_mask"][0] > 0]) == "Yo"
    assert int(b["loss_mask"].sum()) == 3  # "Y", "o", eos


def test_chat_template_kwargs_reach_the_template():
    """data.chat_template_kwargs: e.g. Qwen3's enable_thinking=false, whose prompts end in an
    empty think block; the tokenizer's template and a jinja source both read them."""
    from jbilevel import config, experiment
    from jbilevel.config import ConfigError

    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined "
                "and enable_thinking is false %}<think></think>{% endif %}{% endif %}")
    hf = TOK.to_hf()
    hf.chat_template = template
    rows = [{"question": "Hi?", "response": "Yo"}]
    for source in ("tokenizer", template):
        for kwargs, prompt in ((None, "<user>Hi?<assistant>"),
                               ({"enable_thinking": False}, "<user>Hi?<assistant><think></think>")):
            ds = load_sft(rows, tokenizer=hf, chat_template=source, chat_template_kwargs=kwargs,
                          max_len=64, add_bos=False)
            _check_text(ds, prompt, "Yo")
    with pytest.raises(ConfigError, match="data.chat_template_kwargs=.*set data.chat_template"):
        load_sft(rows, chat_template_kwargs={"enable_thinking": False}, max_len=64)
    cfg = config.replace(experiment.ExperimentConfig(),
                         ["data.chat_template_kwargs={enable_thinking: false}"], "test")
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}


def test_a_template_that_writes_the_bos_is_not_given_a_second_one():
    hf = TOK.to_hf()
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}>{% endif %}")
    rows = [{"question": "Hi?", "response": "Yo"}]
    with pytest.raises(DataError, match=r"row 0.*already begins with the tokenizer's bos token "
                                        r"\(id 1.*set data.add_bos=false"):
        load_sft(rows, tokenizer=hf, chat_template="tokenizer", max_len=64)
    ds = load_sft(rows, tokenizer=hf, chat_template="tokenizer", max_len=64, add_bos=False)
    assert ds.batch([0], 16)["input_ids"][0, :2].tolist() == [BOS, _c("H")]


def _check_text(ds, prompt, response):
    b = ds.batch([0], 48)
    n = int(b["attention_mask"][0].sum())
    assert TOK.decode(b["input_ids"][0, :n]) == prompt + response
    assert TOK.decode(b["labels"][0][b["loss_mask"][0] > 0]) == response


def test_hf_tokenizer_stops_at_every_end_token_its_model_declares(tmp_path):
    """eos first, then generation_config.json's and config.json's eos_token_id (an id or a
    list; ids outside the vocabulary ignored); decoding cuts at the first of them."""
    import json

    from jbilevel import inputs
    from jbilevel.data.tokenizer import as_tokenizer

    TOK.to_hf(str(tmp_path))
    assert as_tokenizer(str(tmp_path)).stop_ids == (EOS,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 5]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [7, 10**6]}))
    tok = as_tokenizer(str(tmp_path))
    assert tok.stop_ids == (EOS, 5, 7)
    assert tok.decode([_c("H"), _c("i"), 7, _c("x")]) == "Hi"
    inputs.save_tokenizer(tok, str(tmp_path / "saved"))  # as a run writes its model/
    assert as_tokenizer(str(tmp_path / "saved")).stop_ids == (EOS, 5, 7)


def test_hf_tokenizer_matches_char_tokenizer(tmp_path):
    TOK.to_hf(str(tmp_path / "tok"))
    rows = [{"question": "What is 3 + 4?", "response": "7"}]
    ds_char = load_sft(rows, max_len=64)
    ds_hf = load_sft(rows, tokenizer=str(tmp_path / "tok"), max_len=64)
    for k, v in ds_char.batch([0], 48).items():
        np.testing.assert_array_equal(ds_hf.batch([0], 48)[k], v, err_msg=k)
    assert ds_hf.response_text(0) == "7"
    with pytest.raises(DataError, match="'gpt2' is not a directory.*hub names are not fetched"):
        load_sft(rows, tokenizer="gpt2", max_len=64)  # a hub name, not a local path


def test_padding_rows_carry_no_loss():
    ds = load_sft([{"question": "a", "response": "b"}], prompt_template="{question}", max_len=16)
    b = ds.batch([0, 0], 8, valid_B=[1, 0])
    np.testing.assert_array_equal(b["valid"], [1, 0])
    assert b["loss_mask"][1].sum() == 0 and b["attention_mask"][1].sum() == 0
    assert (b["input_ids"][1] == PAD).all()
    with pytest.raises(ValueError, match="seq_len 3 < longest sequence 4"):
        ds.batch([0], 3)


def test_non_ascii_text_maps_to_unk():
    ds = load_sft([{"question": "café?", "response": "oui"}, {"question": "a", "response": "b"}],
                  prompt_template="{question}", max_len=16)
    np.testing.assert_array_equal(ds.sequence(0), [BOS] + TOK.encode("caf") + [TOK.unk_id]
                                  + TOK.encode("?oui") + [EOS])
    np.testing.assert_array_equal(ds.sequence(1), [BOS, _c("a"), _c("b"), EOS])
