"""Supervised fine-tuning: the summed next-token cross-entropy over the response tokens."""
from __future__ import annotations

from kubetune_trainer import data as dt
from kubetune_trainer.objectives import Objective, model_inputs, register


@register
class SFT(Objective):
    name = "sft"
    packing = True

    def formats(self) -> tuple[str, ...]:
        return ("alpaca", "chat", "text")

    def examples(self, records: list[dict], fmt: str, tokenizer, max_len: int, stats) -> list:
        return dt.tokenize_all(records, tokenizer, fmt, max_len, stats)

    def collate(self, batch: list, pad_id: int, pad_to: int | None = None) -> dict:
        b = dt.collate(batch, pad_id, pad_to=pad_to)
        # the loss is summed over label tokens, so they are what the step's mean divides by
        b["count"] = int((b["labels"] != dt.IGNORE).sum())
        return b

    def loss(self, model, head, batch: dict):
        with head.computing_loss(batch["labels"]):
            return head.loss_from(model(**model_inputs(batch))), {}
