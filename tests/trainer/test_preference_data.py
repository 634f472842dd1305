"""Preference and KTO data: detection, bad lines named by file, line and rule, chat records, truncation
(the prompt's tail, the response's head) and the one-forward batch layout."""
import pytest
import torch

import tiny
from kubetune_trainer import data as dt
from kubetune_trainer.errors import BadConfig, BadData
from kubetune_trainer.model import load_tokenizer
from kubetune_trainer.objectives import prefdata

PREF = ("preference",)
PAIR = {"prompt": "What color is the apple ?", "chosen": "The apple is red .", "rejected": "The apple is green ."}


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


def words(tok, ids):
    return [tok.convert_ids_to_tokens(i) for i in ids]


def learned(tok, ex):
    return [tok.convert_ids_to_tokens(y) for y in ex.labels if y != dt.IGNORE]


def read(tmp_path, rows, fmt="auto", formats=PREF, raw=None, on_bad_line="fail"):
    f = tiny.write_jsonl(tmp_path / "prefs.jsonl", rows, raw)
    stats = dt.DataStats()
    recs, fmt = dt.read_records([("s3://b/prefs.jsonl", f)], fmt, on_bad_line, stats, formats=formats)
    return recs, fmt, stats


def test_auto_detects_preference_and_kto_among_the_objectives_formats(tmp_path):
    assert read(tmp_path, [PAIR])[1] == "preference"
    kto = {"prompt": "p", "completion": "c", "label": False}
    assert read(tmp_path, [kto], formats=("kto",))[1] == "kto"
    # UltraFeedback keeps the conversation in messages too: SFT reads it as chat, DPO as preference
    uf = {**PAIR, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert dt.detect_format(uf) == "chat"
    assert dt.detect_format(uf, PREF) == "preference"
    # SFT never detects the new formats, and its message is the one it always was, plus a hint
    with pytest.raises(BadData) as e:
        read(tmp_path, [PAIR], formats=dt.SFT_FORMATS)
    assert ("line 1: cannot detect the format from the first line: expected keys instruction+output (alpaca), "
            "messages or conversations (chat) or text (text); it looks like preference data, which objective "
            "dpo or orpo or simpo reads") in e.value.message
    with pytest.raises(BadData, match=r"line 1: cannot detect the format from the first line: expected keys "
                                      r"prompt\+chosen\+rejected \(preference\); it looks like alpaca data"):
        read(tmp_path, tiny.alpaca_rows(2))
    with pytest.raises(BadConfig, match=r"dataset.format chat is not a format this objective reads: "
                                        r"preference \(prompt\+chosen\+rejected\)"):
        read(tmp_path, [PAIR], fmt="chat")


def test_bad_lines_name_the_file_the_line_and_the_rule(tmp_path):
    rows = [PAIR, {"prompt": "p", "chosen": "c"}, {**PAIR, "chosen": 3}, {**PAIR, "rejected": "  "},
            {**PAIR, "chosen": [{"role": "bot", "content": "x"}]},
            {**PAIR, "chosen": [{"role": "user", "content": "again ?"}, {"role": "assistant", "content": "x"}]},
            {**PAIR, "rejected": []}, PAIR]
    with pytest.raises(BadData) as e:
        read(tmp_path, rows, raw={9: "not json"})
    msg = e.value.message
    assert "7 malformed lines" in msg and "s3://b/prefs.jsonl: " in msg
    for part in ("line 2: missing field 'rejected' (preference lines need prompt, chosen, rejected)",
                 "line 3: field 'chosen' must be text or a list of chat messages {role, content}, got int",
                 "line 4: field 'rejected' is empty",
                 "line 5: chosen[0].role must be one of system, user, assistant, tool (got 'bot')",
                 ("line 6: field 'chosen' must continue the prompt with an assistant message (its first message "
                  "after the prompt has role 'user')"),
                 "line 7: field 'rejected' is an empty list",
                 "line 9: invalid JSON"):
        assert part in msg, (part, msg)
    recs, _, stats = read(tmp_path, rows, on_bad_line="skip")
    assert (len(recs), stats.skipped_lines) == (2, 6)


def test_kto_lines_need_a_boolean_label(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "c", "label": "yes"},
            {"prompt": "p", "completion": "c"}]
    with pytest.raises(BadData) as e:
        read(tmp_path, rows, formats=("kto",))
    assert "line 2: field 'label' must be true (desirable) or false (undesirable), got 'yes'" in e.value.message
    assert "line 3: missing field 'label' (kto lines need prompt, completion, label)" in e.value.message


def test_text_pairs_learn_the_responses_only(tok):
    rec = dt.preference_record(PAIR, "preference")
    ex = prefdata.tokenize_all([rec], "preference", tok, 64, dt.DataStats())[0]
    chosen, rejected = ex.sequences
    assert words(tok, chosen.input_ids) == "<s> What color is the apple ? The apple is red . </s>".split()
    assert learned(tok, chosen) == "The apple is red . </s>".split()
    assert learned(tok, rejected) == "The apple is green . </s>".split()
    assert chosen.input_ids[:7] == rejected.input_ids[:7]  # one prompt


def test_chat_pairs_render_with_the_template_and_learn_the_assistant_turns(tok):
    rec = dt.preference_record({
        "prompt": [{"role": "system", "content": "You answer briefly ."}, {"role": "user", "content": "What color is the lime ?"}],
        # UltraFeedback's layout: each response repeats the prompt's messages first
        "chosen": [{"role": "system", "content": "You answer briefly ."}, {"role": "user", "content": "What color is the lime ?"},
                   {"role": "assistant", "content": "green"}],
        "rejected": "The lime is red ."}, "preference")
    assert rec["chosen"] == [{"role": "assistant", "content": "green"}]
    assert rec["rejected"] == [{"role": "assistant", "content": "The lime is red ."}]
    chosen, rejected = prefdata.tokenize_all([rec], "preference", tok, 64, dt.DataStats())[0].sequences
    assert words(tok, chosen.input_ids) == ("<s> <|system|> You answer briefly . <|end|> <|user|> What color is the "
                                            "lime ? <|end|> <|assistant|> green <|end|>").split()
    assert learned(tok, chosen) == ["green", "<|end|>"]
    assert learned(tok, rejected) == "The lime is red . <|end|>".split()
    # a text prompt with message responses is a chat too: the prompt becomes a user message
    rec = dt.preference_record({"prompt": "hi", "chosen": [{"role": "assistant", "content": "yo"}], "rejected": "no"},
                               "preference")
    assert rec["prompt"] == [{"role": "user", "content": "hi"}]


def test_a_response_of_several_turns_learns_only_its_assistant_turns(tok):
    rec = dt.preference_record({
        "prompt": [{"role": "user", "content": "What does the cat say ?"}],
        "chosen": [{"role": "assistant", "content": "meow"}, {"role": "tool", "content": "dog"},
                   {"role": "assistant", "content": "woof"}],
        "rejected": [{"role": "assistant", "content": "moo"}]}, "preference")
    chosen, _ = prefdata.tokenize_all([rec], "preference", tok, 64, dt.DataStats())[0].sequences
    assert learned(tok, chosen) == ["meow", "<|end|>", "woof", "<|end|>"]


def test_truncation_keeps_the_prompts_tail_and_the_responses_head(tok):
    prompt = " ".join(tiny.FRUITS)  # 12 words, with <s>: 13 tokens
    chosen = " ".join(tiny.ANIMALS[:7])  # 7 words + </s>: 8
    rec = dt.preference_record({"prompt": prompt, "chosen": chosen, "rejected": "cat dog"}, "preference")
    stats = dt.DataStats()
    c, r = prefdata.tokenize_all([rec], "preference", tok, 16, stats)[0].sequences
    # the prompt keeps max(16 - 8, 16 // 2) = 8 tokens: <s> and its last 7 words; the chosen response fits
    assert words(tok, c.input_ids) == ["<s>"] + tiny.FRUITS[-7:] + tiny.ANIMALS[:7] + ["</s>"]
    assert words(tok, r.input_ids) == ["<s>"] + tiny.FRUITS[-7:] + ["cat", "dog", "</s>"]  # the same prompt
    assert stats.truncated_examples == 1
    # a long response keeps its head: the prompt keeps half (<s> + 3 words), the response the other 4 tokens
    rec = dt.preference_record({"prompt": "apple banana cherry grape lemon", "chosen": " ".join(tiny.SOUNDS),
                                "rejected": "meow"}, "preference")
    c, r = prefdata.tokenize_all([rec], "preference", tok, 8, dt.DataStats())[0].sequences
    assert words(tok, c.input_ids) == ["<s>", "cherry", "grape", "lemon"] + tiny.SOUNDS[:4]
    assert learned(tok, c) == tiny.SOUNDS[:4]
    assert len(c) == 8


def test_a_pair_with_no_response_token_left_is_dropped_and_counted(tok):
    # The prompt keeps at most half of maxSeqLength, so a response always keeps some tokens; a sequence of
    # one token has no label left (nothing before it predicts it)
    stats = dt.DataStats()
    assert prefdata.PreferenceTokenizer(tok, "preference", 1).example(dt.preference_record(PAIR, "preference"), stats) is None
    assert (stats.dropped_examples, stats.truncated_examples) == (1, 1)


def test_one_batch_holds_every_chosen_then_every_rejected_sequence(tok):
    recs = [dt.preference_record(r, "preference") for r in (
        PAIR, {"prompt": "What does the cow say ?", "chosen": "moo", "rejected": "The cow says woof woof ."})]
    ex = prefdata.tokenize_all(recs, "preference", tok, 64, dt.DataStats())
    ex[1].ref_logps = (-1.0, -2.0)
    b = prefdata.collate(ex + [dt.void(ex[0])], tok.pad_token_id, pad_to=20)
    seqs = [e.sequences[0] for e in ex] + [ex[0].sequences[0]] + [e.sequences[1] for e in ex] + [ex[0].sequences[1]]
    assert b["input_ids"].shape == (6, 20)
    for row, s in enumerate(seqs):
        n = len(s)
        assert b["input_ids"][row, :n].tolist() == s.input_ids and (b["input_ids"][row, n:] == tok.pad_token_id).all()
        assert b["labels"][row, :n].tolist() == s.labels and (b["labels"][row, n:] == dt.IGNORE).all()
        assert b["attention_mask"][row].tolist() == [1] * n + [0] * (20 - n)
    assert b["live"].tolist() == [True, True, False] and b["count"] == 2
    assert b["num_tokens"] == sum(len(s) for s in seqs)
    assert "ref_logps" not in b  # not every example carries them
    ex[0].ref_logps = (-3.0, -4.0)
    b = prefdata.collate(ex, tok.pad_token_id)
    assert b["ref_logps"].tolist() == [-3.0, -1.0, -4.0, -2.0]  # the same layout as the sequences


def test_kto_examples_carry_their_label(tok):
    recs = [dt.preference_record({"prompt": "cat", "completion": c, "label": lab}, "kto")
            for c, lab in (("meow", True), ("woof", False))]
    ex = prefdata.tokenize_all(recs, "kto", tok, 64, dt.DataStats())
    b = prefdata.collate(ex, tok.pad_token_id)
    assert b["input_ids"].shape[0] == 2 and b["desirable"].tolist() == [True, False] and b["count"] == 2
    assert learned(tok, ex[0].sequences[0]) == ["meow", "</s>"]


def test_parquet_preference_rows(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([PAIR, {"prompt": "p", "chosen": "c", "rejected": None}]), tmp_path / "p.parquet")
    with pytest.raises(BadData, match=r"p.parquet: row 2: field 'rejected' must be text or a list of chat messages"):
        dt.read_records([("p.parquet", tmp_path / "p.parquet")], "auto", "fail", dt.DataStats(), formats=PREF)


def test_sft_schedule_filler_is_unchanged():
    e = dt.Example([1, 2, 3], [2, 3, dt.IGNORE])
    v = dt.void(e)
    assert (v.input_ids, v.labels, v.position_ids) == ([1, 2, 3], [dt.IGNORE] * 3, None)
    assert torch.is_tensor(dt.collate([v], 0)["labels"])
