"""Two processes under `accelerate launch` (gloo on CPU), started the way the pod starts them: one
`kubetune train` that re-launches itself. A 2-process run with micro batch 2 must train exactly like
one process with micro batch 2 and 2 accumulation steps (the same global batches), through a SIGTERM
and a kill -9 of every process."""
import json

import pytest

import tiny
from proc import TrainerProc, free_port

pytestmark = pytest.mark.slow

STEPS = 20
DPO = {"type": "dpo", "beta": 0.5}  # lora: the implicit reference, the base under disabled adapters
REWARDS = ("rewardAccuracy", "rewardMargin", "rewardsChosen", "rewardsRejected")


def rows(objective: str, n: int, seed: int) -> list[dict]:
    return tiny.preference_rows(n, seed=seed) if objective == "dpo" else tiny.alpaca_rows(n, seed=seed)


def config(tmp_path, model_dir, data, store, nproc, objective="sft"):
    ga = 2 // nproc
    cfg = tiny.trainer_config(
        tmp_path, model_dir, data,
        method={"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}},  # no per-rank RNG in the math
        dataset={"validationSplit": 0.1},
        training={"maxSteps": STEPS, "microBatchSize": 2, "gradientAccumulationSteps": ga, "learningRate": 1e-2,
                  "scheduler": "cosine", "warmupRatio": 0.1, "weightDecay": 0.01, "evalSteps": 5, "loggingSteps": 1,
                  "seed": 5},
        checkpoints={"saveSteps": 4, "keep": 2},
        resolved={"numProcesses": nproc, "gradientAccumulationSteps": ga},
        ckpt_uri=f"file://{store}/ckpt", output_uri=f"file://{store}/out", progress_uri=f"file://{store}/progress.json")
    cfg["paths"]["workDir"] = str(store / "work")
    if objective == "dpo":
        cfg["spec"]["objective"] = dict(DPO)
    return cfg


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_two_processes_train_like_one_through_sigterm_and_kill9(tmp_path, model_dir, objective):
    data = tiny.write_jsonl(tmp_path / "train.jsonl", rows(objective, 45, seed=9))

    single = TrainerProc(config(tmp_path, model_dir, data, tmp_path / "single", 1, objective), tmp_path / "single.yaml")
    assert single.wait(300) == 0, single.stderr[-3000:]
    expected = single.losses()
    assert sorted(expected) == list(range(1, STEPS + 1))
    # 40 = 10 global batches of 4. With a remainder the epochs would break at different steps: one
    # process with 2 accumulation steps cuts epochs per micro batch of 2, not per global batch of 4
    # (test_an_epochs_last_partial_batch_is_trained_not_dropped compares like with like).
    assert single.events_of("data")[0]["train"] == 40

    store = tmp_path / "ddp"
    cfg = config(tmp_path, model_dir, data, store, 2, objective)
    env = {"KUBETUNE_MASTER_PORT": free_port(), "KUBETUNE_DEBUG_STEP_SLEEP": "0.5", "KUBETUNE_GRACE_SECONDS": "30"}

    # 1. SIGTERM to the container's main process (the supervisor); both ranks stop at the same step.
    first = TrainerProc(cfg, tmp_path / "ddp.yaml", env=env)
    first.wait_for(lambda e: e.get("event") == "launch", 30)
    first.wait_for(lambda e: e.get("event") == "step" and e["step"] >= 5, 300)
    first.sigterm()
    assert first.wait(90) == 143, first.stderr[-3000:]
    stopped = max(first.losses())
    term = json.loads(first.termination.read_text())
    assert term["reason"] == "Preempted" and term["step"] == stopped, term
    assert (store / "ckpt" / f"checkpoint-{stopped:08d}" / "manifest.json").is_file()
    # rank 0 reports the run; rank 1 only acknowledges the signal
    steps = first.events_of("step")
    assert all("rank" not in e for e in steps) and len(steps) == len({e["step"] for e in steps}) == stopped
    assert {e.get("rank", 0) for e in first.events_of("preempted")} == {0, 1}
    model_ev = first.events_of("model")
    assert len(model_ev) == 1 and model_ev[0]["processes"] == 2 and model_ev[0]["sharding"] == "ddp"

    # 2. kill -9 of every process once a later periodic checkpoint is committed.
    second = TrainerProc(cfg, tmp_path / "ddp.yaml", env={**env, "KUBETUNE_MASTER_PORT": free_port()})
    assert second.wait_for(lambda e: e.get("event") == "resumed", 120)["step"] == stopped
    nxt = (stopped // 4 + 1) * 4
    second.wait_for(lambda e: e.get("event") == "log" and f"checkpoint-{nxt:08d} committed" in e.get("message", ""), 120)
    second.wait_for(lambda e: e.get("event") == "step" and e["step"] >= nxt + 1, 60)
    second.kill9()

    # 3. The last attempt resumes from that checkpoint and finishes.
    third = TrainerProc(cfg, tmp_path / "ddp.yaml", env={"KUBETUNE_MASTER_PORT": free_port()})
    assert third.wait(300) == 0, third.stderr[-3000:]
    assert third.events_of("resumed")[0]["step"] == nxt

    got = {**first.losses(), **second.losses(), **third.losses()}
    assert sorted(got) == sorted(expected)
    worst = max(abs(got[s] - expected[s]) for s in expected)
    print(f"\n{objective}: 2 processes (SIGTERM at {stopped}, kill -9 after {nxt}) vs 1 process: "
          f"max |dloss| = {worst:.3g}")
    assert worst < 1e-4, {s: (got[s], expected[s]) for s in expected if abs(got[s] - expected[s]) >= 1e-4}

    final = json.loads(third.termination.read_text())
    ref = json.loads(single.termination.read_text())
    assert final["reason"] == "Completed" and final["step"] == STEPS
    keys = ("evalLoss", "baseEvalLoss", "bestEvalLoss") + (REWARDS if objective == "dpo" else ())
    for k in keys:
        assert abs(final["result"]["metrics"][k] - ref["result"]["metrics"][k]) < 1e-4, k
    assert (store / "out" / "adapter" / "manifest.json").is_file()
    if objective == "dpo":
        # rank 0 logs the reward metrics of the global batch in every step, as the one process does
        want = {e["step"]: e for e in single.events_of("step")}
        ddp = [e for run in (first, second, third) for e in run.events_of("step")]
        assert all(set(REWARDS) <= set(e) for e in ddp), ddp[0]
        dr = max(abs(e[k] - want[e["step"]][k]) for e in ddp for k in REWARDS)
        m = final["result"]["metrics"]
        print(f"dpo: max |d reward metric| = {dr:.3g}; reward accuracy {m['baseRewardAccuracy']:.2f} -> "
              f"{m['rewardAccuracy']:.2f}")
        assert dr < 1e-4


def test_an_epochs_last_partial_batch_is_trained_not_dropped(tmp_path, model_dir):
    """41 sequences = 10 global batches of 4 and one of 1: on 2 processes rank 1 has no share of the
    last one and runs a fully masked example to keep the all-reduce in step. Both processes together
    must train exactly what one process with micro batch 4 trains, across the epoch boundary."""
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(46, seed=9))
    runs = {}
    for n in (1, 2):
        cfg = config(tmp_path, model_dir, data, tmp_path / f"p{n}", n)
        cfg["spec"]["training"] |= {"maxSteps": 13, "microBatchSize": 4 // n, "gradientAccumulationSteps": 1}
        cfg["resolved"] |= {"microBatchSize": 4 // n, "gradientAccumulationSteps": 1}
        runs[n] = TrainerProc(cfg, tmp_path / f"p{n}.yaml", env={"KUBETUNE_MASTER_PORT": free_port()})
        assert runs[n].wait(300) == 0, runs[n].stderr[-3000:]
    assert runs[1].events_of("data")[0]["train"] == 41
    model = runs[2].events_of("model")[0]
    assert model["totalSteps"] == 13 and model["processes"] == 2
    one, two = runs[1].losses(), runs[2].losses()
    assert sorted(two) == list(range(1, 14))
    worst = max(abs(two[s] - one[s]) for s in one)
    print(f"\n41 sequences, 13 steps (epoch boundary after step 11): 2 processes vs 1, max |dloss| = {worst:.3g}")
    assert worst < 1e-4, {s: (two[s], one[s]) for s in one}
    # step 11 (the batch of one) ends the first epoch: nothing was dropped to get there
    assert [e["epoch"] for e in runs[2].events_of("step") if e["step"] in (11, 12)] == pytest.approx([1.0, 12 / 11], abs=1e-4)


def test_a_worker_failure_keeps_its_exit_code_through_the_launcher(tmp_path, model_dir):
    """torchrun reports any failed worker as exit 1; the pod must still exit 3 for bad data, so the
    Job's podFailurePolicy fails it at once instead of retrying."""
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(20), {7: "{not json"})
    cfg = config(tmp_path, model_dir, data, tmp_path / "store", 2)
    run = TrainerProc(cfg, tmp_path / "bad.yaml", env={"KUBETUNE_MASTER_PORT": free_port()})
    assert run.wait(180) == 3, run.stderr[-3000:]
    term = json.loads(run.termination.read_text())
    assert term["reason"] == "BadData" and f"file://{data}: line 7: invalid JSON" in term["message"]
    assert run.events_of("launch")
    assert {e.get("rank", 0) for e in run.events_of("failed")} == {0, 1}


def test_full_fine_tuning_on_two_processes_matches_one_and_writes_the_whole_model(tmp_path, model_dir):
    """Full fine-tuning asks for FSDP; on CPU accelerate runs DDP instead, and says so. The gathered
    full state (checkpoint and output) must still be the one model."""
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(45, seed=9))
    runs = {}
    for n in (1, 2):
        cfg = config(tmp_path, model_dir, data, tmp_path / f"p{n}", n)
        cfg["spec"]["method"] = {"type": "full"}
        cfg["spec"]["training"] |= {"maxSteps": 8, "learningRate": 1e-3, "sharding": "fsdp" if n > 1 else "auto"}
        runs[n] = TrainerProc(cfg, tmp_path / f"p{n}.yaml", env={"KUBETUNE_MASTER_PORT": free_port()})
        assert runs[n].wait(300) == 0, runs[n].stderr[-3000:]
    one, two = runs[1].losses(), runs[2].losses()
    assert sorted(two) == list(range(1, 9)) and max(abs(two[s] - one[s]) for s in one) < 1e-4
    assert two[8] < one[1] - 1.0  # it learned
    assert any("sharding fsdp needs CUDA GPUs; these 2 processes run MULTI_CPU" in m for m in runs[2].messages())
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "p1" / "out" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "p2" / "out" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_two_nodes_rendezvous_from_the_indexed_job_env(tmp_path, model_dir):
    """Two "pods" of an Indexed Job, one process each: the launch takes its node rank from
    JOB_COMPLETION_INDEX and the rendezvous from MASTER_ADDR/MASTER_PORT, as the operator renders
    them. Each has its own work dir (its emptyDir) and termination log; together they train like one
    process with 2 accumulation steps."""
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(45, seed=9))
    single = TrainerProc(config(tmp_path, model_dir, data, tmp_path / "single", 1), tmp_path / "single.yaml")
    assert single.wait(300) == 0, single.stderr[-3000:]

    store = tmp_path / "multi"
    port = free_port()
    pods = []
    for index in (0, 1):
        cfg = config(tmp_path, model_dir, data, store, 2)
        cfg["spec"]["resources"] |= {"nodes": 2, "gpusPerNode": 1}
        cfg["paths"]["workDir"] = str(tmp_path / f"pod-{index}")
        env = {"JOB_COMPLETION_INDEX": str(index), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "KUBETUNE_TERMINATION_LOG": str(tmp_path / f"pod-{index}.termination")}
        pods.append(TrainerProc(cfg, tmp_path / f"pod-{index}.yaml", env=env))
    for p in pods:
        assert p.wait(300) == 0, p.stderr[-3000:]
    launch = pods[1].events_of("launch")[0]["command"]
    assert "--multi_gpu --num_processes 2 --num_machines 2 --machine_rank 1" in launch
    assert "--rdzv_backend static" in launch and f"--main_process_port {port}" in launch
    got, expected = pods[0].losses(), single.losses()
    assert sorted(got) == sorted(expected) and not pods[1].losses()  # node 1 reports nothing of the run
    assert max(abs(got[s] - expected[s]) for s in expected) < 1e-4
    # each pod's termination message: rank 0's result, and node 1's own (local rank 0) exit
    t0 = json.loads((tmp_path / "pod-0.termination").read_text())
    t1 = json.loads((tmp_path / "pod-1.termination").read_text())
    assert t0["reason"] == t1["reason"] == "Completed" and t0["result"]["metrics"]["steps"] == STEPS


FSDP_PROBE = r'''
import functools, json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
from torch.distributed.fsdp import _traversal_utils
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
from kubetune_trainer.loop import fsdp_wrap_policy

dist.init_process_group("gloo")
model_dir, which = sys.argv[1], sys.argv[2]
# what the GPU pod holds: bf16 base weights, fp32 adapters (the plan's dtypes for LoRA)
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"), autocast_adapter_dtype=True)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
if which == "trainer":
    policy = fsdp_wrap_policy(model, "lora")
else:  # accelerate's transformer_based_wrap: one unit per decoder block
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={type(base.model.layers[0])})
try:
    f = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"),
             sharding_strategy=ShardingStrategy.FULL_SHARD)
except ValueError as e:
    out = {"error": str(e)}
else:
    x = torch.randint(3, base.config.vocab_size, (2, 16))
    f(input_ids=x, labels=x).loss.backward()
    handles = _traversal_utils._get_fsdp_handles(f)
    grads = [h.flat_param.grad for h in handles if h.flat_param.grad is not None]
    out = {"trainable": trainable, "grad_numel": sum(g.numel() for g in grads),
           "grad_dtypes": sorted({str(g.dtype) for g in grads}), "units": len(handles)}
if dist.get_rank() == 0:
    print("PROBE " + json.dumps(out), flush=True)
dist.destroy_process_group()
'''


@pytest.mark.parametrize("which", ["trainer", "per-block"])
def test_lora_under_fsdp_wraps_adapters_apart_so_frozen_weights_get_no_gradient(tmp_path, model_dir, which):
    """FSDP itself runs on CPU (gloo); accelerate only turns it on with GPUs, so the wrap policy the
    trainer hands it is checked here directly, on the dtypes a GPU pod has: wrapped per decoder block,
    LoRA cannot even start; with the trainer's policy each rank holds gradients for its half of the
    adapters and nothing else."""
    import os
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(FSDP_PROBE)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                        str(script), str(model_dir), which], capture_output=True, text=True, env=env, timeout=300)
    line = [x for x in p.stdout.splitlines() if x.startswith("PROBE ")]
    assert line, p.stdout[-2000:] + p.stderr[-3000:]
    out = json.loads(line[-1][6:])
    if which == "per-block":
        assert "Must flatten tensors with uniform dtype" in out["error"]
        return
    assert p.returncode == 0, p.stderr[-3000:]
    assert out["grad_numel"] == out["trainable"] // 2, out  # sharded over 2 ranks: adapters only
    assert out["grad_dtypes"] == ["torch.float32"]
    assert out["units"] > 2 * 7  # every adapted linear of both blocks is a unit of its own


# Cases whose FSDP checkpoint is another case's (the same trainable tensors, dtypes and sharding): the
# kill -9 and resume half (two more 2-process runs) is run once per checkpoint layout, not per case.
# DPO's implicit reference is the base under disabled adapters: it adds no state of its own.
SAME_CHECKPOINT_AS = {"lora+dpo": "lora", "qlora+dpo": "qlora"}


@pytest.mark.parametrize("case", ["lora", "qlora", "full", "freeze", "prompt-tuning", "prefix-tuning",
                                  "lora+bf16-mixed", "full+bf16-mixed", "full+liger", "lora+dpo", "qlora+dpo"])
def test_fsdp_trains_like_one_process_and_resumes_exactly_after_kill9(tmp_path, model_dir, case):
    """The trainer's FSDP paths (the wrap policy, sharded state gathered into checkpoints, resume into
    sharded parameters, outputs) driven on CPU: KUBETUNE_DEBUG_FSDP_ON_CPU makes accelerate wrap with
    FSDP over gloo, which it otherwise does only on GPUs. Two FSDP processes train like one process
    with 2 accumulation steps (to FSDP's reduce-scatter rounding), and a kill -9 midway changes no
    loss of the FSDP run (within 1e-4, the resume criterion). QLoRA runs on bitsandbytes' CPU kernels
    (KUBETUNE_DEBUG_BNB_ON_CPU): the FSDP-QLoRA path, 4-bit weights flattened with the norms.
    "+bf16-mixed": the GPU default's dtypes (KUBETUNE_DEBUG_PRECISION_ON_CPU): a bf16 base with fp32
    adapters, or an fp32 master copy, under bf16 autocast. "+dpo": DPO with the implicit reference (the
    base under disabled adapters, through FSDP's wrapper), its reward metrics logged."""
    method, _, precision = case.partition("+")
    liger = precision == "liger"  # Liger's kernels (Triton's interpreter) on FSDP's sharded norm weights
    objective = "dpo" if precision == "dpo" else "sft"
    precision = "" if liger or objective == "dpo" else precision
    rounding = method == "qlora" or precision == "bf16-mixed"  # bf16 matmuls: FSDP's summation order shows
    data = tiny.write_jsonl(tmp_path / "train.jsonl", rows(objective, 45, seed=9))
    steps = 6 if liger else 12

    def cfg_for(store, n):
        cfg = config(tmp_path, model_dir, data, store, n, objective)
        if method == "full":
            cfg["spec"]["method"] = {"type": "full"}
        elif method == "freeze":  # the top block, embeddings and head train: frozen and trained weights share FSDP units
            cfg["spec"]["method"] = {"type": "freeze", "freeze": {"trainableLayers": 1, "trainEmbeddings": True}}
        elif method in ("prompt-tuning", "prefix-tuning"):  # the prompt encoder is a real tensor even on a meta rank
            cfg["spec"]["method"] = {"type": method, "virtualTokens": 8}
        elif method == "qlora":
            cfg["spec"]["method"]["type"] = "qlora"
            cfg["spec"]["resources"]["gpusPerNode"] = 1  # the API's rule for qlora; CPU all the same
        if precision:
            cfg["spec"]["training"]["precision"] = precision
        cfg["spec"]["training"] |= {"maxSteps": steps, "learningRate": {"lora": 1e-2, "qlora": 1e-2, "prompt-tuning": 0.05, "prefix-tuning": 1e-2}.get(method, 1e-3),
                                    "evalSteps": 6, "sharding": "fsdp" if n > 1 else "auto"}
        return cfg

    knob = {"KUBETUNE_DEBUG_BNB_ON_CPU": "1"} if method == "qlora" else {}
    if precision:
        knob["KUBETUNE_DEBUG_PRECISION_ON_CPU"] = "1"
    if liger:
        from test_liger import LIGER

        knob |= LIGER

    def fsdp(store, **env):
        return TrainerProc(cfg_for(store, 2), store.with_suffix(".yaml"), env={
            "KUBETUNE_DEBUG_FSDP_ON_CPU": "1", "KUBETUNE_MASTER_PORT": free_port(), **knob, **env})

    # a hang guard, not a speed check: Triton's interpreter (Liger on CPU) took over 300 s on a busy machine
    limit = 900 if liger else 300
    single = TrainerProc(cfg_for(tmp_path / "single", 1), tmp_path / "single.yaml", env=knob)
    assert single.wait(limit) == 0, single.stderr[-3000:]
    reference = fsdp(tmp_path / "reference")
    assert reference.wait(limit) == 0, reference.stderr[-3000:]
    model_ev = reference.events_of("model")
    assert model_ev[0]["distributedType"] == "FSDP" and model_ev[0]["sharding"] == "fsdp", model_ev
    if liger:
        assert single.events_of("model")[0]["fusedKernels"] == model_ev[0]["fusedKernels"] == ["rope", "rms_norm", "swiglu"]
    # rank 0 alone reads the weights; rank 1 holds no byte of the model until FSDP gives it its shard
    # of rank 0's values (so the losses below equal one process's only if that broadcast happened)
    loads = {e.get("rank", 0): e for e in reference.events_of("load")}
    whole = single.events_of("load")[0]["materializedBytes"]
    if method == "qlora":  # bitsandbytes quantizes while loading, so each rank loads its own (4-bit) copy
        assert [loads[r]["place"] for r in (0, 1)] == ["device"] * 2, loads
        assert loads[0]["materializedBytes"] == loads[1]["materializedBytes"] == whole < 200_000, loads
    else:
        assert whole > 100_000 and loads[0]["place"] == "cpu" and loads[0]["materializedBytes"] == whole, loads
        assert loads[1]["place"] == "meta" and loads[1]["materializedBytes"] == 0, loads
    one, two = single.losses(), reference.losses()
    # DPO's loss starts at ln 2 (policy = reference)
    learned = 0.1 if objective == "dpo" else 0.2 if method in ("prompt-tuning", "prefix-tuning") else 0.5
    assert sorted(two) == list(range(1, steps + 1)) and two[steps] < two[1] - learned, two
    # QLoRA's matmuls run in bf16 (its compute dtype), as bf16-mixed's do: FSDP's summation order shows more
    assert max(abs(two[s] - one[s]) for s in one) < (2e-2 if rounding else 2e-3), (two, one)
    if objective == "dpo":  # the reward metrics of the global batch, logged by rank 0 as one process logs them
        want = {e["step"]: e for e in single.events_of("step")}
        got = reference.events_of("step")
        assert all(set(REWARDS) <= set(e) for e in got), got[0]
        dr = max(abs(e[k] - want[e["step"]][k]) for e in got for k in REWARDS if k != "rewardAccuracy")
        final = json.loads(reference.termination.read_text())["result"]["metrics"]
        print(f"\n{case}: FSDP vs one process, max |dloss| {max(abs(two[s] - one[s]) for s in one):.2e}, "
              f"max |d reward| {dr:.2e}; reward accuracy {final['baseRewardAccuracy']:.2f} -> "
              f"{final['rewardAccuracy']:.2f}")
        # a reward is β times a difference of log-probs summed over a response (the loss is a mean of
        # log-sigmoids of them): the same rounding shows about ten times larger
        assert dr < (2e-1 if rounding else 2e-2)
        assert {"rewardAccuracy", "rewardMargin", "baseRewardAccuracy", "baseRewardMargin"} <= set(final), final
    if liger:  # resume and outputs are the same code as "full"; Triton's interpreter makes each run minutes
        print(f"\nfull+liger: single process vs FSDP, max |dloss| {max(abs(two[s] - one[s]) for s in one):.2e}")
        return
    if case in SAME_CHECKPOINT_AS:  # its checkpoint holds what another case's resume already proves
        print(f"\n{case}: resume is {SAME_CHECKPOINT_AS[case]}'s (the same sharded state); not run again")
        return

    store = tmp_path / "fsdp"
    first = fsdp(store, KUBETUNE_DEBUG_STEP_SLEEP="0.3")
    first.wait_for(lambda e: e.get("event") == "log" and "checkpoint-00000008 committed" in e.get("message", ""), 300)
    first.wait_for(lambda e: e.get("event") == "step" and e["step"] >= 9, 60)
    first.kill9()
    second = fsdp(store)
    assert second.wait(300) == 0, second.stderr[-3000:]
    assert second.events_of("resumed")[0]["step"] == 8
    got = {**first.losses(), **second.losses()}  # steps 9.. of the first attempt are redone by the second
    assert sorted(got) == list(range(1, steps + 1))
    assert max(abs(got[s] - two[s]) for s in two) < 1e-4, (got, two)

    from safetensors.torch import load_file

    adapter = method in ("lora", "qlora", "prompt-tuning", "prefix-tuning")
    sub, name = ("adapter", "adapter_model.safetensors") if adapter else ("model", "model.safetensors")
    ref = load_file(str(tmp_path / "reference" / "out" / sub / name))
    out = load_file(str(store / "out" / sub / name))
    base = load_file(str(tmp_path / "single" / "out" / sub / name))
    assert ref.keys() == out.keys() == base.keys() and len(out) >= (1 if method in ("prompt-tuning", "prefix-tuning") else 10), out.keys()
    assert max(float((ref[k] - out[k]).abs().max()) for k in ref) < 1e-5
    # Adam turns rounding in near-zero gradients into updates of up to lr: the bound scales with it
    lr = cfg_for(store, 1)["spec"]["training"]["learningRate"]
    if rounding:  # where bf16 rounding compounds through Adam, compare the tensors as a whole
        rel = max(float((base[k] - out[k]).norm() / out[k].norm().clamp_min(1e-12)) for k in ref if out[k].norm() > 0)
        print(f"\n{case}: single process vs FSDP, largest relative difference of a trained tensor {rel:.3g}")
        assert rel < 0.05
    else:
        assert max(float((base[k] - out[k]).abs().max()) for k in ref) < max(1e-3, 0.3 * lr)
    if method == "qlora":  # an adapter holds the adapters: a 4-bit base's constants stay out of it
        assert all(".lora_" in k for k in out) and len(out) == 28, sorted(out)[:3]


@pytest.mark.parametrize("method", ["lora", "prompt-tuning", "full"])
def test_fsdp_answers_the_evaluation_prompts_as_one_process_does(tmp_path, model_dir, method):
    """The end-of-run evaluation under FSDP (on CPU over gloo, KUBETUNE_DEBUG_FSDP_ON_CPU): both models
    answer every prompt, each rank generating in lockstep with only the root unit's weights gathered
    beside the block being run, and the answers and figures are one process's. The base comes from
    the adapters disabled through FSDP's wrapper (prompt tuning: not the step-0 model)."""
    data = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.alpaca_rows(60, seed=9))
    runs = {}
    for n in (1, 2):
        store = tmp_path / f"p{n}"
        cfg = config(tmp_path, model_dir, data, store, n)
        cfg["spec"]["method"] = {"lora": cfg["spec"]["method"], "full": {"type": "full"},
                                 "prompt-tuning": {"type": "prompt-tuning", "virtualTokens": 8}}[method]
        cfg["spec"]["dataset"] |= {"testSplit": 0.2}
        cfg["spec"]["training"] |= {"maxSteps": 8, "evalSteps": 8, "sharding": "fsdp" if n > 1 else "auto",
                                    "learningRate": {"lora": 1e-2, "prompt-tuning": 0.05}.get(method, 1e-3)}
        cfg["spec"]["evaluation"] = {"maxPrompts": 6, "maxNewTokens": 8}
        env = {"KUBETUNE_DEBUG_FSDP_ON_CPU": "1", "KUBETUNE_MASTER_PORT": free_port()} if n > 1 else {}
        runs[n] = TrainerProc(cfg, tmp_path / f"p{n}.yaml", env=env)
        assert runs[n].wait(300) == 0, runs[n].stderr[-3000:]
    assert runs[2].events_of("model")[0]["distributedType"] == "FSDP"
    one, two = (json.loads(runs[n].termination.read_text())["result"]["evaluation"] for n in (1, 2))
    rows = {n: [json.loads(x) for x in (tmp_path / f"p{n}/out/evaluation/answers.jsonl").read_text().splitlines()]
            for n in (1, 2)}
    print(f"\n{method}: FSDP vs one process: base {two['base']} vs {one['base']}; "
          f"tuned {two['tuned']} vs {one['tuned']}; answers {[(r['base'], r['tuned']) for r in rows[2][:2]]}")
    # an answer may be empty (a tiny model's first token can be EOS); most are not
    assert len(rows[2]) == two["prompts"] == 6, rows[2]
    assert all(sum(bool(r[m]) for r in rows[2]) >= 3 for m in ("base", "tuned")), rows[2]
    assert {"exactMatch", "rougeL"} <= set(two["base"]) and {"exactMatch", "rougeL"} <= set(two["tuned"]), two
    assert [(r["base"], r["tuned"]) for r in rows[2]] == [(r["base"], r["tuned"]) for r in rows[1]]
    assert two["base"] == pytest.approx(one["base"], abs=1e-5)  # the same weights, gathered
    assert two["tuned"] == pytest.approx(one["tuned"], abs=2e-3)  # to FSDP's reduce-scatter rounding in training
