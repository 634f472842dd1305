"""Preference examples: a tokenized {prompt, chosen, rejected} pair, or KTO's {prompt, completion,
label}, and their micro batches. Records arrive validated and normalized by data.preference_record
(all text, or all chat messages with the responses apart from the prompt).

Each sequence is prompt + response with labels on the response only (shifted as data.Example's). Too
long, a sequence keeps the prompt's tail (it leads into the response) and the response's head: the
prompt keeps at least half of maxSeqLength, and is cut the same for both responses of a pair, so the
two are compared in the same context.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from kubetune_trainer import data as dt
from kubetune_trainer.errors import BadConfig


@dataclass
class PreferenceExample:
    sequences: tuple[dt.Example, ...]  # (chosen, rejected), or KTO's (completion,)
    desirable: bool = True  # KTO's label (a pair's chosen response is the desirable one)
    ref_logps: tuple[float, ...] | None = None  # per sequence, when the reference is precomputed
    live: bool = True  # False: a filler that counts for nothing (data.void)

    def __len__(self) -> int:
        return max(len(s) for s in self.sequences)

    def void(self) -> "PreferenceExample":
        return replace(self, live=False)


class PreferenceTokenizer:
    def __init__(self, tokenizer, fmt: str, max_len: int):
        self.tok, self.fmt, self.max_len = tokenizer, fmt, max_len
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self._chat: dt.Tokenize | None = None

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _chat_template(self) -> dt.Tokenize:
        if self._chat is None:
            try:
                self._chat = dt.Tokenize(self.tok, "chat", self.max_len)
            except BadConfig:
                raise BadConfig("preference records given as chat messages need a chat template, and the model's "
                                "tokenizer has none (tokenizer_config.json chat_template); give prompt and responses "
                                "as text, or use a model with one") from None
        return self._chat

    def parts(self, rec: dict) -> tuple[list[int], list[tuple[list[int], list[bool]]]]:
        """The prompt's ids and each response's (ids, learned) before truncation."""
        responses = dt.RESPONSES[self.fmt]
        if isinstance(rec["prompt"], str):
            prompt = ([self.bos] if self.bos is not None else []) + self._encode(rec["prompt"])
            eos = [self.eos] if self.eos is not None else []
            ids = [self._encode(rec[k]) + eos for k in responses]
            return prompt, [(r, [True] * len(r)) for r in ids]
        chat = self._chat_template()
        prompt_text = chat._render(rec["prompt"], True) if rec["prompt"] else ""
        return self._encode(prompt_text), [self._chat_response(chat, rec["prompt"], rec[k], prompt_text)
                                           for k in responses]

    def _chat_response(self, chat: dt.Tokenize, prompt: list[dict], response: list[dict],
                       prompt_text: str) -> tuple[list[int], list[bool]]:
        """The rendered response after the prompt's text, tokenized on its own, and which tokens belong to
        assistant turns (the same spans data.Tokenize._chat learns)."""
        msgs = prompt + response
        full = chat._render(msgs, False)
        spans = []
        for i in range(len(prompt), len(msgs)):
            if msgs[i]["role"] != "assistant":
                continue
            before = chat._render(msgs[:i], True) if i else ""
            upto = chat._render(msgs[: i + 1], False)
            if not full.startswith(upto) or not upto.startswith(before) or not before.startswith(prompt_text):
                raise BadConfig("the tokenizer's chat template does not render conversations incrementally, so "
                                "the response cannot be told apart from the prompt")
            spans.append((len(before) - len(prompt_text), len(upto) - len(prompt_text)))
        enc = self.tok(full[len(prompt_text):], add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]

    def fit(self, prompt: list[int], responses: list[tuple[list[int], list[bool]]]):
        """Truncate to max_len per sequence: the prompt's tail (its BOS kept), each response's head."""
        longest = max(len(ids) for ids, _ in responses)
        truncated = len(prompt) + longest > self.max_len
        if truncated:
            keep = min(len(prompt), max(self.max_len - longest, self.max_len // 2))
            if keep < len(prompt):
                # The BOS stays: models are trained with it at position 0 (and attend to it heavily).
                bos = prompt[:1] if self.bos is not None and prompt and prompt[0] == self.bos and keep > 0 else []
                prompt = bos + prompt[len(prompt) - keep + len(bos):]
            room = self.max_len - len(prompt)
            responses = [(ids[:room], learn[:room]) for ids, learn in responses]
        return prompt, responses, truncated

    def example(self, rec: dict, stats: dt.DataStats) -> PreferenceExample | None:
        prompt, responses, truncated = self.fit(*self.parts(rec))
        stats.truncated_examples += truncated
        seqs = []
        for ids, learn in responses:
            labels = dt._shifted(prompt + ids, [False] * len(prompt) + learn)
            if all(y == dt.IGNORE for y in labels):
                stats.dropped_examples += 1  # no response token left to score
                return None
            seqs.append(dt.Example(prompt + ids, labels))
        return PreferenceExample(tuple(seqs), desirable=rec.get("label", True))


def tokenize_all(records: list[dict], fmt: str, tokenizer, max_len: int, stats: dt.DataStats) -> list[PreferenceExample]:
    t = PreferenceTokenizer(tokenizer, fmt, max_len)
    return [e for e in (t.example(r, stats) for r in records) if e is not None]


def collate(batch: list[PreferenceExample], pad_id: int, pad_to: int | None = None) -> dict:
    """One batch of every sequence, response by response: [chosen_1..chosen_B, rejected_1..rejected_B]
    (KTO: [completion_1..completion_B]), right-padded, so one forward runs them all. ``live`` marks the
    examples that count, ``count`` is their number; ``ref_logps`` follows the same layout when every
    example carries precomputed reference log-probs."""
    import torch

    k = len(batch[0].sequences)
    b = dt.collate([e.sequences[j] for j in range(k) for e in batch], pad_id, pad_to=pad_to)
    b["live"] = torch.tensor([e.live for e in batch], dtype=torch.bool)
    b["desirable"] = torch.tensor([e.desirable for e in batch], dtype=torch.bool)
    b["count"] = sum(e.live for e in batch)
    if all(e.ref_logps is not None for e in batch):
        b["ref_logps"] = torch.tensor([e.ref_logps[j] for j in range(k) for e in batch], dtype=torch.float32)
    return b
