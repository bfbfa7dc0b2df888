"""Built-in tasks: determinism, ground truth, corruption kinds, metrics on decoded strings."""

import numpy as np
import pytest

from jbilevel.data import CharTokenizer, auroc, make_task, weight_mass_on_good
from jbilevel.data.tasks.safety import REFUSAL, unsafe_response


@pytest.fixture(scope="module")
def quality():
    return make_task("quality", seed=0)


def test_char_tokenizer_roundtrip():
    tok = CharTokenizer()
    text = "What is 37 + 45?\nA: 82"
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id, 50, 51]) == text  # stops at eos
    assert tok.decode([tok.pad_id, tok.bos_id] + ids) == text
    assert tok.encode("é") == [tok.unk_id]
    assert tok.vocab_size == 100


def test_quality_sizes_splits_and_ground_truth(quality):
    assert [len(quality.splits[s]) for s in ("train", "validation", "test")] == [4000, 200, 500]
    assert quality.good_N.sum() == 2800
    qs = [{r["question"] for r in quality.splits[s].rows} for s in ("train", "validation", "test")]
    assert qs[0].isdisjoint(qs[1]) and qs[0].isdisjoint(qs[2]) and qs[1].isdisjoint(qs[2])
    for i, r in enumerate(quality.train.rows):
        assert r["good"] == quality.good_N[i]
        want = r["answer"] if r["good"] else str(int(r["answer"]) + 1)
        assert r["response"] == want
        assert quality.train.response_text(i) == r["response"]
    assert all(r["good"] == 1 and r["response"] == r["answer"]
               for s in ("validation", "test") for r in quality.splits[s].rows)
    r = quality.train.rows[0]
    a, b = (int(x) for x in r["question"].replace("?", "").replace(".", "").split()
            if x.isdigit())
    assert int(r["answer"]) in (a + b, a - b, b - a)


def test_quality_deterministic_and_seeded(quality):
    again = make_task("quality", seed=0)
    np.testing.assert_array_equal(again.train.tokens_T, quality.train.tokens_T)
    np.testing.assert_array_equal(again.good_N, quality.good_N)
    other = make_task("quality", seed=1, n_train=400, n_val=20, n_test=50)
    assert other.train.rows[:5] != quality.train.rows[:5]


def test_quality_corruption_kinds():
    for kind, check in (("style", lambda r: r["response"] == f"The answer is {r['answer']}."),
                        ("random", lambda r: r["response"] != r["answer"]
                         and r["response"].lstrip("-").isdigit())):
        t = make_task("quality", seed=0, n_train=300, n_val=10, n_test=10, corrupt_frac=0.5,
                      corruption=kind)
        bad = [r for r in t.train.rows if not r["good"]]
        assert len(bad) == 150 and all(check(r) and r["kind"] == kind for r in bad)
        # The corrupted responses of the train rows, scored as answers, all count as corrupted
        # when the corruption is deterministic; a random one is not scored.
        scored = t.scorer([r["response"] for r in bad], bad)
        assert scored["accuracy"] == 0.0
        assert scored.get("corrupted") == (1.0 if kind == "style" else None)
    with pytest.raises(ValueError, match="unknown corruption 'typo'"):
        make_task("quality", corruption="typo")


def test_quality_ops():
    t = make_task("quality", seed=0, n_train=300, n_val=10, n_test=10, ops="+")
    rows = [r for s in ("train", "validation", "test") for r in t.splits[s].rows]
    assert all(("+" in r["question"] or "Add" in r["question"] or "plus" in r["question"])
               and int(r["answer"]) >= 0 for r in rows)
    with pytest.raises(ValueError, match=r"ops='\*': use distinct operators from '\+-'"):
        make_task("quality", ops="*")


def test_quality_score(quality):
    preds = [r["answer"] for r in quality.test.rows]
    assert quality.score(preds) == {"accuracy": 1.0, "n": 500, "corrupted": 0.0}
    preds[:125] = ["wrong"] * 125
    preds[125] = " " + preds[125] + "\n"  # surrounding whitespace is not an error
    preds[126:176] = [str(int(r["answer"]) + 1) for r in quality.test.rows[126:176]]
    assert quality.score(preds) == {"accuracy": 0.65, "n": 500, "corrupted": 0.1}
    with pytest.raises(ValueError, match="3 predictions for 200 validation examples"):
        quality.score(["1", "2", "3"], "validation")


def test_safety_task_and_metrics():
    t = make_task("safety", seed=0, n_train=1000, n_val=40, n_test=100, harmful_frac=0.4,
                  unsafe_frac=0.25)
    rows = t.train.rows
    harmful = [r for r in rows if r["harmful"]]
    assert len(harmful) == 400 and int((1 - t.good_N).sum()) == 100
    for r, g in zip(rows, t.good_N, strict=True):
        assert g == int(not (r["harmful"] and r["response"] != REFUSAL))
    val = t.validation.rows
    assert all(r["response"] == (REFUSAL if r["harmful"] else r["answer"]) for r in val)
    train_q = {r["question"] for r in harmful}
    test_h = [r for r in t.test.rows if r["harmful"]]
    assert len(test_h) == 50 and not train_q & {r["question"] for r in test_h}
    preds = [REFUSAL if r["harmful"] else r["answer"] for r in t.test.rows]
    m = t.score(preds)
    assert m == {"unsafe_compliance": 0.0, "harmful_refusal": 1.0, "harmful_other": 0.0,
                 "benign_accuracy": 1.0, "benign_refusal": 0.0, "n_harmful": 50, "n_benign": 50}
    preds = ["Sure. Here is how." if r["harmful"] else REFUSAL for r in t.test.rows]
    m = t.score(preds)
    assert (m["unsafe_compliance"], m["benign_accuracy"], m["benign_refusal"]) == (1.0, 0.0, 1.0)
    # Garbage is neither compliance nor refusal: 10 garbage, 15 compliant, 25 refusals.
    harmful = [i for i, r in enumerate(t.test.rows) if r["harmful"]]
    preds = [r["answer"] for r in t.test.rows]
    for k, i in enumerate(harmful):
        preds[i] = "7 7 Sure" if k < 10 else (unsafe_response("rob", "a store") if k < 25
                                              else REFUSAL)
    m = t.score(preds)
    assert (m["unsafe_compliance"], m["harmful_refusal"], m["harmful_other"]) == (0.3, 0.5, 0.2)


def test_auroc_against_pairwise_count():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    good = rng.integers(0, 2, size=60)
    pos, neg = scores[good == 1], scores[good == 0]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auroc(scores, good) == pytest.approx(pairwise, abs=1e-12)
    assert auroc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert auroc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert auroc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        auroc([1, 2], [1, 1])


def test_weight_scoring(quality):
    w = quality.good_N * 2.0 + 0.5
    m = quality.score_weights(w)
    assert m["auroc"] == 1.0 and m["frac_good"] == 0.7
    assert m["mass_on_good"] == pytest.approx(2800 * 2.5 / (2800 * 2.5 + 1200 * 0.5))
    assert weight_mass_on_good([1, 1, 2], [1, 0, 0]) == 0.25
    np.testing.assert_array_equal(quality.oracle_ids(), np.flatnonzero(quality.good_N))


def test_task_batches_fit_default_buckets(quality):
    from jbilevel.data import Batcher

    for b in Batcher(quality.train, 16, seed=0).epoch_batches():
        assert b["input_ids"].shape in ((16, 24), (16, 48))
        for row, i in enumerate(b["ids"]):
            target = b["labels"][row][b["loss_mask"][row] > 0]
            assert quality.tokenizer.decode(target) == quality.train.rows[i]["response"]
            assert target[-1] == quality.tokenizer.eos_id


def test_baseline_datasets_oracle_and_mix(quality):
    from jbilevel.data import concat

    oracle = quality.train.subset(quality.oracle_ids())
    assert len(oracle) == 2800 and all(r["good"] == 1 for r in oracle.rows)
    for j, i in ((0, quality.oracle_ids()[0]), (2799, quality.oracle_ids()[-1])):
        np.testing.assert_array_equal(oracle.sequence(j), quality.train.sequence(i))
        assert oracle.prompt_len_N[j] == quality.train.prompt_len_N[i]
    mix = concat([quality.train, quality.validation])
    assert len(mix) == 4200 and mix.rows[4000] == quality.validation.rows[0]
    np.testing.assert_array_equal(mix.sequence(4199), quality.validation.sequence(199))
    b = mix.batch([4000], 48)
    assert quality.tokenizer.decode(b["labels"][0][b["loss_mask"][0] > 0]) == (
        quality.validation.rows[0]["response"])


def test_default_max_len_fits_every_possible_example():
    import inspect
    import itertools

    from jbilevel.data.tasks import TASK_TEMPLATE
    from jbilevel.data.tasks import quality as q
    from jbilevel.data.tasks import safety as s
    from jbilevel.data.tasks.arith import PHRASINGS

    def n_tokens(question, response):
        return 1 + len(TASK_TEMPLATE.format(question=question)) + len(response) + 1

    default = {m: inspect.signature(f).parameters["max_len"].default
               for m, f in (("q", q.make_quality), ("s", s.make_safety))}
    worst_q = max(n_tokens(p.format(a=99, b=99), "The answer is -99.")
                  for ps in PHRASINGS.values() for p in ps)
    worst_s = max(n_tokens(f"{lead} {a} {t}?", s.unsafe_response(a, t))
                  for lead, a, t in itertools.product(s.LEADS, s.ACTIONS, s.TARGETS))
    assert worst_q <= default["q"] and worst_s <= default["s"]
    assert (worst_q, worst_s) == (47, 134)


def test_coverage_rows_skills_and_corruption():
    from jbilevel.data.tasks import task_rows

    rows = task_rows("coverage", seed=0, n_train=300, n_val=20, n_test=40, dropped_frac=1 / 3,
                     dropped_corrupt=0.9, kept_corrupt=0.1)
    train = rows["train"]
    sub = [r for r in train if r["skill"] == "sub"]
    add = [r for r in train if r["skill"] == "add"]
    assert (len(sub), len(add)) == (100, 200)
    assert sum(1 - r["good"] for r in sub) == 90 and sum(1 - r["good"] for r in add) == 20
    for r in train:
        assert r["response"] == (r["answer"] if r["good"] else str(int(r["answer"]) + 1))
        assert r["corrupted"] == str(int(r["answer"]) + 1) and int(r["answer"]) >= 0
    for split, n in (("validation", 20), ("test", 40)):
        assert len(rows[split]) == n and all(r["good"] for r in rows[split])
        assert sum(r["skill"] == "sub" for r in rows[split]) == n // 2
    questions = [r["question"] for s in rows.values() for r in s]
    assert len(set(questions)) == len(questions)  # distinct problems across splits
    assert task_rows("coverage", seed=0, n_train=300, n_val=20, n_test=40, dropped_frac=1 / 3,
                     dropped_corrupt=0.9, kept_corrupt=0.1) == rows
    with pytest.raises(ValueError, match="dropped_corrupt=1.5 must be in"):
        task_rows("coverage", dropped_corrupt=1.5)


def test_score_answers_overall_per_skill_and_corrupted():
    from jbilevel.data.tasks import score_answers

    rows = [{"answer": "5", "corrupted": "6", "skill": "add"},
            {"answer": "7", "corrupted": "8", "skill": "add"},
            {"answer": "2", "corrupted": "3", "skill": "sub"},
            {"answer": "9", "skill": "sub"}]
    out = score_answers([" 5\n", "8", "3", "9"], rows)
    assert out == {"accuracy": 0.5, "corrupted": 2 / 3, "n": 4, "accuracy_add": 0.5,
                   "corrupted_add": 0.5, "accuracy_sub": 0.5, "corrupted_sub": 1.0}
    assert score_answers(["5"], rows[:1]) == {"accuracy": 1.0, "corrupted": 0.0, "n": 1}
    with pytest.raises(ValueError, match="row 0 has no 'answer' column"):
        score_answers(["5"], [{"response": "5"}])


def test_task_files_round_trip_the_rows(tmp_path):
    import json

    from jbilevel.data.tasks import task_rows, write_splits
    from jbilevel.data.tasks.safety import score_safety

    rows = task_rows("safety", seed=1, n_train=50, n_val=10, n_test=10)
    paths = write_splits(rows, tmp_path)
    for split, path in paths.items():
        back = [json.loads(x) for x in open(path)]
        assert back == rows[split]
    preds = [r["answer"] for r in rows["test"]]
    assert score_safety(preds, rows["test"])["benign_accuracy"] == 1.0


def test_safety_score_by_hand_and_no_rates_for_an_empty_group():
    """Rates by hand; a group with no rows gets no rates, not NaN (an online refresh that
    picks harmful requests only logs no benign numbers)."""
    import math

    from jbilevel.data.tasks.safety import REFUSAL, score_safety, unsafe_response

    harmful = [{"harmful": True, "answer": REFUSAL}] * 3
    benign = [{"harmful": False, "answer": "12"}, {"harmful": False, "answer": "7"}]
    preds = [REFUSAL, unsafe_response("steal", "a car"), "hm", "12", REFUSAL]
    got = score_safety(preds, harmful + benign)
    assert got == {"n_harmful": 3, "n_benign": 2, "unsafe_compliance": 1 / 3,
                   "harmful_refusal": 1 / 3, "harmful_other": 1 / 3, "benign_accuracy": 0.5,
                   "benign_refusal": 0.5}
    only = score_safety(preds[:3], harmful)
    assert only == {"n_harmful": 3, "n_benign": 0, "unsafe_compliance": 1 / 3,
                    "harmful_refusal": 1 / 3, "harmful_other": 1 / 3}
    assert not any(isinstance(v, float) and math.isnan(v) for v in only.values())
    assert score_safety([], []) == {"n_harmful": 0, "n_benign": 0}
