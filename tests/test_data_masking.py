"""Prompt masking and batch layout, hand-checked for every schema (built-in char tokenizer)."""

import os

import numpy as np
import pytest

from jbilevel.data import CharTokenizer, DataError, concat, load_sft
from jbilevel.data.schemas import ALPACA_NO_INPUT_TEMPLATE, ALPACA_TEMPLATE, DEFAULT_CHAT_TEMPLATE

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


def test_sharegpt_rows_train_as_the_same_chat():
    """ShareGPT's conversations (from human/gpt/system, value) are the chat schema's messages:
    the same tokens and trained tokens; an unknown speaker is refused by name."""
    import json

    path = os.path.join(FIXTURES, "sharegpt.jsonl")
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    with open(path) as f:
        lines = f.read().splitlines()
    chat = [{"messages": [{"role": roles[m["from"]], "content": m["value"]}
                          for m in json.loads(line)["conversations"]]} for line in lines]
    got, want = load_sft(path, max_len=128), load_sft(chat, max_len=128)
    assert got.tokens_T.tolist() == want.tokens_T.tolist()
    assert got.trained_T.tolist() == want.trained_T.tolist()
    _check(got, 1, "<|user|>\nName a colour.\n<|assistant|>\n", "Red.")
    assert got.report.assistant_turns.startswith("assistant turns before the last: 1 (in 1 of 2")
    bad = [{"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}]
    with pytest.raises(DataError, match=r"row 0: conversations\[1\]: 'from' is 'bot', not one "
                                        r"of human, user, gpt, assistant, system"):
        load_sft(bad, max_len=64)
    with pytest.raises(DataError, match=r"row 0: conversations\[0\] must be \{'from': str, "
                                        r"'value': str\}"):
        load_sft([{"conversations": [{"role": "user", "content": "x"}] * 2}], max_len=64)


def test_trl_prompt_completion_rows():
    """TRL's prompt-completion datasets: texts (schema completion: the prompt as written, or as
    the user's message under a chat template) and message lists (chat_completion: the chat
    schema's messages split in two), detected from their first row."""
    ds = load_sft([{"prompt": "The capital of France is", "completion": " Paris."}], max_len=64)
    _check(ds, 0, "The capital of France is", " Paris.")
    ds = load_sft([{"prompt": "Hi?", "completion": "Yo"}], chat_template=DEFAULT_CHAT_TEMPLATE,
                  max_len=64)
    _check(ds, 0, "<|user|>\nHi?\n<|assistant|>\n", "Yo")
    split = [{"prompt": c["messages"][:-1], "completion": c["messages"][-1:]} for c in CHAT]
    got, want = load_sft(split, max_len=96), load_sft(CHAT, max_len=96)
    assert got.tokens_T.tolist() == want.tokens_T.tolist()
    assert got.trained_T.tolist() == want.trained_T.tolist()  # prompt[1] trained, as messages[1]
    with pytest.raises(DataError, match=r"row 0: 'completion' must be a list of messages, got "
                                        r"str"):
        load_sft([{"prompt": CHAT[1]["messages"][:1], "completion": "y"}], max_len=64)
    with pytest.raises(DataError, match=r"row 0: completion\[0\] must be \{'role': str"):
        load_sft([{"prompt": CHAT[1]["messages"][:1], "completion": ["y"]}], max_len=64)


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


# Gemma's chat template, its structure kept: it writes the bos, names the assistant "model" and
# ends every turn with <end_of_turn>, which its tokenizer's eos (<eos>) is not
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
    "else m['role'] %}<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _gemma_like_tokenizer(directory, *, declares_turn_end=True):
    import json

    from jbilevel.data.tokenizer import as_tokenizer

    hf = TOK.to_hf()
    hf.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    hf.chat_template = GEMMA_TEMPLATE
    hf.save_pretrained(str(directory))
    eot = hf.convert_tokens_to_ids("<end_of_turn>")
    if declares_turn_end:  # as google/gemma-*-it's generation_config.json: [1, 106]
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS,
                                                                                      eot]}))
    return as_tokenizer(str(directory)), eot


def test_responses_end_as_the_chat_template_ends_the_turn(tmp_path):
    """data.response_end: auto trains an instruction-tuned Gemma's responses ending with its
    <end_of_turn> (what its template writes and what generation stops at), not with <eos>;
    eos keeps the tokenizer's eos; the text after the end token is not trained."""
    tok, eot = _gemma_like_tokenizer(tmp_path)
    rows = [{"question": "Hi?", "response": "Yo "}, {"question": "2+2?", "response": "4"}]
    kw = dict(tokenizer=tok, chat_template="tokenizer", max_len=64, add_bos=False)
    ds = load_sft(rows, **kw)
    b = ds.batch([0, 1], 40)
    for k, answer in enumerate(["Yo", "4"]):
        trained = b["labels"][k][b["loss_mask"][k] > 0].tolist()
        assert trained == TOK.encode(answer) + [eot]  # no <eos>, no newline after the turn end
        n = int(b["attention_mask"][k].sum())
        assert b["input_ids"][k, n - 1] == eot and b["input_ids"][k, 0] == BOS
    assert ds.response_text(0) == "Yo"
    assert ds.report.response_end == f"the chat template's turn end <end_of_turn> (id {eot})"
    assert ds.report.as_dict()["response_end"] == ds.report.response_end
    prompt = tok.hf.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False,
                                        add_generation_prompt=True)
    assert b["input_ids"][0, :ds.prompt_len_N[0]].tolist() == list(tok.encode(prompt))
    assert load_sft(rows, response_end="template", **kw).tokens_T.tolist() == ds.tokens_T.tolist()
    eos = load_sft(rows, response_end="eos", **kw)
    b = eos.batch([0], 40)
    assert b["labels"][0][b["loss_mask"][0] > 0].tolist() == TOK.encode("Yo ") + [EOS]
    assert eos.report.response_end == f"the tokenizer's eos <eos> (id {EOS})"
    # the chat schema: the last assistant message is the response, earlier turns the prompt
    ds = load_sft(CHAT, assistant_turns="last", **kw)
    b = ds.batch([0], 60)
    assert b["labels"][0][b["loss_mask"][0] > 0].tolist() == [_c("d"), eot]


CHAT = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bb"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]


def _trained(ds, i, length=64) -> list:
    b = ds.batch([i], length)
    return b["labels"][0][b["loss_mask"][0] > 0].tolist()


def test_every_assistant_turn_is_trained_as_the_template_writes_it(tmp_path):
    """data.assistant_turns=all (the default): each earlier assistant turn of a conversation is
    trained as the template writes it, up to its end token (Gemma: `bb<end_of_turn>`, not the
    newline after it, not the `<start_of_turn>model` header); the tokens and the prompt are those
    of assistant_turns=last, which trains only the last turn; the load report counts them."""
    tok, eot = _gemma_like_tokenizer(tmp_path)
    kw = dict(tokenizer=tok, chat_template="tokenizer", max_len=96, add_bos=False)
    every, last = load_sft(CHAT, **kw), load_sft(CHAT, assistant_turns="last", **kw)
    assert _trained(every, 0) == TOK.encode("bb") + [eot] + TOK.encode("d") + [eot]
    assert _trained(last, 0) == TOK.encode("d") + [eot]
    assert _trained(every, 1) == _trained(last, 1) == TOK.encode("y") + [eot]
    assert every.tokens_T.tolist() == last.tokens_T.tolist()
    assert every.prompt_len_N.tolist() == last.prompt_len_N.tolist()
    b = every.batch([0], 64)
    n = int(b["attention_mask"][0].sum())
    marked = np.flatnonzero(b["loss_mask"][0]) + 1  # the positions of the trained tokens
    head = tok.hf.apply_chat_template(CHAT[0]["messages"][:1], tokenize=False,
                                      add_generation_prompt=True)
    start = len(tok.encode(head))  # bb starts right after the first generation prompt
    assert marked.tolist() == [start, start + 1, start + 2, *range(every.prompt_len_N[0], n)]
    assert every.report.assistant_turns == ("assistant turns before the last: 1 (in 1 of 2 "
                                            "conversations), each trained")
    assert last.report.as_dict()["assistant_turns"].endswith(
        "context (only the last turn is trained)")
    # the default template, whose turns end with a newline (responses end with the eos): the
    # earlier turn's content trains, not the newline after it (the last answer ends with the
    # eos at that place)
    plain = load_sft(CHAT, max_len=96)
    assert TOK.decode(_trained(plain, 0), stop_at_eos=False) == "bbd"
    assert _trained(plain, 0)[-1] == EOS
    # kept through subset and concat, also beside a dataset without earlier turns
    mixed = concat([plain.subset([1, 0]), load_sft(CHAT[1:], tokenizer=plain.tokenizer,
                                                    max_len=96)])
    assert [_trained(mixed, i) for i in range(3)] == [_trained(plain, 1), _trained(plain, 0),
                                                      _trained(plain, 1)]
    from types import SimpleNamespace

    from jbilevel import rundir

    def digest(ds):
        return rundir.fingerprint(SimpleNamespace(splits={"train": ds}), None)["data"]

    assert digest(every) != digest(last)  # a run resumed with the other choice is refused
    assert digest(load_sft(CHAT[1:], **kw)) == digest(load_sft(CHAT[1:], assistant_turns="last",
                                                                **kw))


def test_an_earlier_turn_cut_by_truncation_keeps_its_trained_tokens():
    """overlength=truncate cutting the prompt's start cuts the earlier turn's marks with it."""
    turns = zip(["user", "assistant"] * 2, ["u", "XYZ", "v", "ok"], strict=True)
    rows = [{"messages": [{"role": r, "content": c} for r, c in turns]}]
    kept = "Z\n<|user|>\nv\n<|assistant|>\n"  # the prompt's end that fits
    ds = load_sft(rows, max_len=len(kept) + 2, overlength="truncate")
    assert ds.report.n_truncated == 1
    assert TOK.decode(ds.sequence(0)[1:], stop_at_eos=False) == kept + "o"
    assert TOK.decode(_trained(ds, 0, len(kept) + 2), stop_at_eos=False) == "Zo"


def test_a_template_writing_history_differently_cannot_train_earlier_turns():
    """A template that writes an assistant turn one way as history and another as the latest
    turn: the turn cannot be cut out; refused naming the row and the fix, or skipped and
    counted under on_bad_row=skip; assistant_turns=last trains the last turn as before."""
    marked = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' and not "
              "loop.last %}(earlier) {% endif %}{{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(DataError, match=r"row 0: the chat template writes assistant turn "
                                        r"messages\[1\] differently as history than as the "
                                        r"conversation's latest turn .*set "
                                        r"data.assistant_turns=last"):
        load_sft(CHAT, chat_template=marked, max_len=96)
    ds = load_sft(CHAT, chat_template=marked, max_len=96, on_bad_row="skip")
    assert len(ds) == 1 and ds.report.skipped == {"template_turn": 1}
    ds = load_sft(CHAT, chat_template=marked, max_len=96, assistant_turns="last")
    assert TOK.decode(_trained(ds, 0), stop_at_eos=False) == "d"
    from jbilevel.config import ConfigError

    with pytest.raises(ConfigError, match="data.assistant_turns='first'; use one of all, last"):
        load_sft(CHAT, assistant_turns="first", max_len=96)


def test_a_template_turn_end_that_stops_nothing_is_not_trained_silently(tmp_path):
    """Without generation_config.json naming <end_of_turn> it is not an end token: auto falls
    back to the eos, and template is refused by name (the model would never learn to stop)."""
    tok, _ = _gemma_like_tokenizer(tmp_path, declares_turn_end=False)
    rows = [{"question": "Hi?", "response": "Yo"}]
    kw = dict(tokenizer=tok, chat_template="tokenizer", max_len=64, add_bos=False)
    assert load_sft(rows, **kw).report.response_end == f"the tokenizer's eos <eos> (id {EOS})"
    with pytest.raises(DataError, match=r"row 0: the chat template writes the response's turn as "
                                        r"'Yo<end_of_turn>\\n', which holds none of the "
                                        r"tokenizer's end tokens \(ids \[2\]\); set "
                                        r"data.response_end=eos"):
        load_sft(rows, response_end="template", **kw)
    from jbilevel.config import ConfigError

    with pytest.raises(ConfigError, match="data.response_end=template .* no chat template"):
        load_sft(rows, response_end="template", max_len=64)
    with pytest.raises(ConfigError, match="data.response_end='last'; use one of auto, eos"):
        load_sft(rows, response_end="last", max_len=64)


def test_jinja_template_writing_the_eos_ends_turns_with_it(tmp_path):
    """A jinja source whose assistant turns end with {{ eos_token }} (Mistral's, Llama 2's):
    auto trains the template's turn, which ends with the real eos; a template that writes the
    earlier turns differently once a response follows cannot be cut and says so."""
    TOK.to_hf(str(tmp_path))
    rows = [{"question": "Hi?", "response": "Yo"}]
    mistral = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
               "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    ds = load_sft(rows, tokenizer=str(tmp_path), chat_template=mistral, max_len=64)
    assert ds.report.response_end == f"the chat template's turn end <eos> (id {EOS})"
    _check_text(ds, "[INST] Hi? [/INST]", "Yo")
    # the char tokenizer cannot write <eos> as a token: auto keeps the appended eos
    assert load_sft(rows, chat_template=mistral, max_len=64).report.response_end.startswith(
        "the tokenizer's eos")
    odd = ("{% for m in messages %}{{ 'bot' if m['role'] == 'assistant' else m['role'] }}: "
           "{{ m['content'] }}{{ eos_token }}{% endfor %}"
           "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match=r"row 0: the chat template writes the conversation "
                                        r"before the response differently once the response "
                                        r"follows .* set data.response_end=eos"):
        load_sft(rows, tokenizer=str(tmp_path), chat_template=odd, max_len=64,
                 response_end="template")
    assert load_sft(rows, tokenizer=str(tmp_path), chat_template=odd,  # auto: the eos ends it
                    max_len=64).report.response_end.startswith("the tokenizer's eos")


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
