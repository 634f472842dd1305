"""The two stacks the estimator prices differ where their code differs: the HF Trainer keeps nn.Embedding
8-bit AdamW states in 32-bit (Trainer.create_optimizer registers a bitsandbytes override), kubetune's
trainer (loop.py: plain bnb.optim.AdamW8bit) does not."""
from __future__ import annotations

import pytest

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.estimator import catalog_architecture, estimate, plan_from_flags
from kubetune.estimator import memory as M
from kubetune.plan import plan_from_spec

from builders import spec

L1 = catalog_architecture("llama-3.2-1b")


def job(method: dict, optimizer: str) -> FineTuneJobSpec:
    return spec(model={"uri": "hf://meta-llama/Llama-3.2-1B"}, dataset={"maxSeqLength": 1024}, method=method,
                training={"microBatchSize": 2, "optimizer": optimizer})


def test_plans_say_which_stack_keeps_embedding_states_in_32_bit():
    assert plan_from_flags(method="full", micro_batch_size=1, seq_len=512).embedding_states_32bit
    assert not plan_from_spec(job({"type": "full"}, "adamw-8bit")).embedding_states_32bit


@pytest.mark.parametrize("method", [{"type": "full"},
                                    {"type": "freeze", "freeze": {"trainableLayers": 2, "trainEmbeddings": True}}])
@pytest.mark.parametrize("optimizer", ["adamw-8bit", "paged-adamw-8bit"])
def test_kubetune_8bit_prices_embeddings_at_8bit_states(method, optimizer):
    kt = plan_from_spec(job(method, optimizer))
    hf = kt.with_(embedding_states_32bit=True)  # the same run on the HF Trainer
    e_kt, e_hf = estimate(L1, kt), estimate(L1, hf)
    per_param = 8 - M.BNB_8BIT_STATE  # 32-bit exp_avg + exp_avg_sq vs bitsandbytes' 8-bit pair
    assert e_hf.breakdown["optimizer"] - e_kt.breakdown["optimizer"] == int(L1.embed_params * per_param)
    assert e_hf.total_bytes - e_kt.total_bytes == int(L1.embed_params * per_param)
    assert e_kt.breakdown["optimizer"] == int(M.BNB_8BIT_STATE * e_kt.trainable_params)


@pytest.mark.parametrize("method,optimizer", [({"type": "full"}, "adamw"), ({"type": "lora"}, "adamw-8bit"),
                                              ({"type": "freeze", "freeze": {"trainableLayers": 2}}, "adamw-8bit")])
def test_no_difference_where_no_embedding_has_8bit_states(method, optimizer):
    kt = plan_from_spec(job(method, optimizer))
    assert estimate(L1, kt).total_bytes == estimate(L1, kt.with_(embedding_states_32bit=True)).total_bytes
