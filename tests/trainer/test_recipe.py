"""The recipe's pieces, fast: knobs from the environment, the checkpointed RunState, the SFT objective."""
import json

import pytest
import torch

import tiny
from kubetune_trainer import data as dt
from kubetune_trainer import objectives
from kubetune_trainer.config import parse_config, plan_for
from kubetune_trainer.errors import BadConfig
from kubetune_trainer.knobs import Knobs
from kubetune_trainer.recipe import RunState, objective_name

# the keys of trainer_state.json as the dict-based loop wrote them: an older checkpoint must resume
OLD_KEYS = ["step", "best_eval_loss", "best_step", "evals_without_improvement", "base_eval_loss", "last_eval_loss",
            "last_eval_step", "tokens", "skipped_lines", "stopped_early", "train_loss"]


def test_knobs_default_without_env():
    k = Knobs.from_env({})
    assert k == Knobs()
    assert k.grace_seconds == 60 and k.fused_optimizer and k.fsdp_rank0_load and not k.compile
    assert k.termination_log == "/dev/termination-log" and k.fused_ce_impl is None


def test_knobs_parse_the_env():
    k = Knobs.from_env({"KUBETUNE_GRACE_SECONDS": "30", "KUBETUNE_FUSED_OPTIMIZER": "0", "KUBETUNE_COMPILE": "1",
                        "KUBETUNE_DEBUG_STEP_SLEEP": "0.5", "KUBETUNE_FUSED_CE_IMPL": "torch",
                        "KUBETUNE_FSDP_RANK0_LOAD": "0", "KUBETUNE_NUM_NODES": "2", "JOB_COMPLETION_INDEX": "1",
                        "MASTER_ADDR": "job-0.svc", "KUBETUNE_MASTER_PORT": "29400", "KUBETUNE_SKIP_OUTPUTS": ""})
    assert (k.grace_seconds, k.fused_optimizer, k.compile, k.debug_step_sleep) == (30.0, False, True, 0.5)
    assert (k.fused_ce_impl, k.fsdp_rank0_load, k.num_nodes, k.node_rank) == ("torch", False, 2, 1)
    assert (k.master_addr, k.master_port, k.skip_outputs) == ("job-0.svc", "29400", False)  # "" is unset
    assert Knobs.from_env({"KUBETUNE_NODE_RANK": "3", "JOB_COMPLETION_INDEX": "1"}).node_rank == 3
    with pytest.raises(AttributeError):  # frozen: read once, passed down unchanged
        k.compile = False


@pytest.mark.parametrize("name,value,expect", [
    ("KUBETUNE_DEBUG_STEP_SLEEP", "fast", "expected a number >= 0"),
    ("KUBETUNE_GRACE_SECONDS", "-1", "expected a number >= 0"),
    ("KUBETUNE_PROGRESS_INTERVAL", "0", "expected a positive number"),
    ("KUBETUNE_COMPILE", "maybe", "expected 1 or 0"),
    ("KUBETUNE_FUSED_CE_IMPL", "cuda", "expected one of liger, torch"),
    ("KUBETUNE_NUM_NODES", "two", "expected an integer >= 1"),
])
def test_a_bad_knob_is_a_clear_error_naming_the_variable(name, value, expect):
    with pytest.raises(BadConfig) as e:
        Knobs.from_env({name: value})
    assert str(e.value).startswith(f"environment variable {name}={value!r}: ") and expect in str(e.value)


def test_run_state_keeps_the_checkpoints_keys():
    s = RunState(step=12, best_eval_loss=1.5, best_step=10, tokens=999, skipped_lines=2, train_loss=1.25)
    assert list(s.to_checkpoint()) == OLD_KEYS  # pending_eval only once a preemption sets it
    s.pending_eval = False
    assert list(s.to_checkpoint()) == OLD_KEYS + ["pending_eval"]


def test_run_state_round_trips_through_a_checkpoint(tmp_path):
    from accelerate import Accelerator

    from kubetune_trainer import checkpoint as ck

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt = acc.prepare(model, opt)
    s = RunState(step=7, best_eval_loss=2.5, best_step=5, evals_without_improvement=1, base_eval_loss=3.0,
                 last_eval_loss=2.75, last_eval_step=6, tokens=1234, skipped_lines=1, train_loss=2.0, pending_eval=True)
    d = ck.save_local(tmp_path / ck.ckpt_name(7), model=model, optimizer=opt, scheduler=sched,
                      loop_state=s.to_checkpoint(), accelerator=acc)
    assert json.loads((d / "trainer_state.json").read_text()) == s.to_checkpoint()
    back = RunState(skipped_lines=99)
    back.restore(ck.load_local(d, model=model, optimizer=opt, scheduler=sched, accelerator=acc))
    assert back == s


def test_an_old_checkpoints_state_resumes():
    """A dict the old loop saved (and one from before a key existed) restores field by field."""
    old = dict(zip(OLD_KEYS, [20, 1.1, 20, 0, 2.0, 1.1, 20, 5000, 0, False, 1.2]))
    s = RunState(skipped_lines=3)
    s.restore({k: v for k, v in old.items() if k != "skipped_lines"})
    assert s.step == 20 and s.tokens == 5000 and s.skipped_lines == 3 and s.pending_eval is None
    assert s.to_checkpoint() == {**old, "skipped_lines": 3}


def test_the_objective_comes_from_the_spec(tmp_path, model_dir):
    cfg = parse_config(tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl"))
    assert objective_name(cfg.spec) == "sft"  # no spec.objective (or its type unset): SFT
    assert "sft" in objectives.names()
    with pytest.raises(ValueError, match="objective 'nope'"):
        objectives.get("nope")


def test_sft_count_is_the_label_count(tmp_path, model_dir):
    from kubetune_trainer.model import load_tokenizer

    cfg = parse_config(tiny.trainer_config(tmp_path, model_dir, tmp_path / "d.jsonl"))
    sft = objectives.get("sft")(cfg.spec, plan_for(cfg), log=lambda m: None)
    assert sft.packing and sft.metric_names() == ()
    ex = sft.examples(tiny.alpaca_rows(6), "alpaca", load_tokenizer(model_dir), 128, dt.DataStats())
    for pad_to in (None, 128):
        b = sft.collate(ex[:4], pad_id=0, pad_to=pad_to)
        want = dt.collate(ex[:4], 0, pad_to=pad_to)
        assert b["count"] == int((want["labels"] != dt.IGNORE).sum()) == sum(sum(y != dt.IGNORE for y in e.labels)
                                                                             for e in ex[:4])
        assert b["count"] < b["num_tokens"]  # prompts are not learned
        assert all(torch.equal(b[k], want[k]) for k in want if torch.is_tensor(want[k]))
