"""``tpcompile.suggest``: the published Llama-3.1 configurations come out of the cost model,
its model-state memory equals what the applied plan holds, sizes derived at a smaller tp
equal planning there, lone layers stay replicated where sharding costs more, presets,
``calibrate``, the CLI, and ``explain``'s predicted section. Planning only (meta device),
plus one in-process ``fake`` process group for the applied plan."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import tpcompile
from models.llama2 import Transformer, config
from tpcompile.suggest import (PRESETS, CollectiveFit, DeviceError, DevicePreset, calibrate,
                               load_device, save_device, suggest)
from tpcompile.suggest.cost import Candidate, Setup, price
from tpcompile.suggest.source import facts_for

pytest.importorskip("transformers")

LLAMA_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                vocab_size=128256, max_position_embeddings=131072)
LLAMA_70B = dict(LLAMA_8B, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                 intermediate_size=28672)
SEQ = 8192


def best(out: list) -> object:
    assert out and out[0].feasible, out[0].reason if out else "no suggestions"
    return out[0]


# ------------------------------------------------------------------- published configurations

@pytest.mark.parametrize("gpus", [8, 128])
def test_llama31_8b_two_sequences_per_gpu_is_fsdp_only(gpus):
    """torchtitan trains Llama-3.1-8B with FSDP alone (seq 8192, 2 sequences per GPU)."""
    out = suggest(LLAMA_8B, gpus, global_batch=2 * gpus, seq_len=SEQ)
    assert best(out).mesh_shape == (gpus, 1), best(out).label()
    assert all(s.tp <= 8 and 8 % s.tp == 0 for s in out)  # never tp across nodes


def test_llama31_70b_on_256_without_checkpointing_is_tp_in_node_with_sp():
    """torchtitan's 70B run: FSDP 32 x TP 8 with sequence parallelism, no checkpointing."""
    out = suggest(LLAMA_70B, 256, global_batch=256, seq_len=SEQ, activation_checkpointing="none")
    top = best(out)
    assert top.mesh_shape == (32, 8) and top.sequence_parallel, top.label()
    assert top.checkpoint_blocks == 0
    assert all(s.tp <= 8 for s in out)
    # fastest first, then the infeasible ones, each with its reason
    feasible = [s.step_time_s for s in out if s.feasible]
    assert feasible == sorted(feasible)
    flags = [s.feasible for s in out]
    assert flags == sorted(flags, reverse=True)
    assert all("GiB available" in s.reason for s in out if not s.feasible and s.micro_batch)


def test_llama31_70b_on_one_node_fits_nowhere_and_says_how_many_gpus():
    out = suggest(LLAMA_70B, 8, global_batch=8, seq_len=SEQ)
    assert out and not any(s.feasible for s in out)
    reason = out[0].reason
    assert "model state" in reason and "GiB available" in reason, reason
    need = int(re.search(r"use >= (\d+) GPUs", reason).group(1))
    assert any(s.feasible for s in suggest(LLAMA_70B, need, global_batch=need, seq_len=SEQ))
    assert not any(s.feasible for s in suggest(LLAMA_70B, need - 8, global_batch=need - 8,
                                               seq_len=SEQ))


# ------------------------------------------------------------------- memory of the applied plan

def _debug_llama() -> Transformer:
    with torch.device("meta"):
        return Transformer(config("debug", vocab_size=500))  # dim 64, 8 heads, 4 kv heads


@pytest.fixture
def fake_world():
    """One process as rank 0 of 8, on the fake backend (collectives return nothing real)."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        yield 8
    finally:
        dist.destroy_process_group()


def _model_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    size = lambda t: local(t).numel() * local(t).element_size()  # noqa: E731
    return (sum(size(p) + size(p.grad) for p in model.parameters())
            + sum(size(v) for st in opt.state.values() for k, v in st.items()
                  if torch.is_tensor(v) and k != "step"))


def test_a_checkpointing_suggestion_applies_in_two_lines(fake_world):
    """A suggestion with every block checkpointed: ``kwargs()`` passes it on and
    ``auto_parallelize`` wraps each block; a training step runs."""
    s = suggest(_debug_llama(), fake_world, device="cpu-gloo", global_batch=8, seq_len=32,
                dtype="fp32", activation_checkpointing="block")[0]
    assert s.feasible and s.checkpoint_blocks == s.blocks == 2, s
    kw = s.kwargs()
    assert kw["activation_checkpointing"] == "block", kw
    model = tpcompile.auto_parallelize(_debug_llama(), s.device_mesh("cpu"), **kw)
    wrapped = [n for n, m in model.named_modules()
               if getattr(m.__dict__.get("forward"), "_tpcompile_checkpointed", False)]
    assert wrapped == ["layers.0", "layers.1"], wrapped
    ids = torch.randint(0, 500, (4, 32))
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    assert all(p.grad is not None for p in model.parameters())

def test_model_state_equals_the_applied_plans_local_shards(fake_world):
    """On a (dp 2, tp 4) mesh: parameters, gradients and AdamW states summed over this
    rank's local shards after a real step, against the prediction, with and without the
    suggestion's own plan (which keeps the 500-row embedding replicated)."""
    found = suggest(_debug_llama(), fake_world, device="cpu-gloo", global_batch=8, seq_len=32,
                    dtype="fp32", activation_checkpointing="none")
    s = next(x for x in found if x.mesh_shape == (2, 4) and x.sequence_parallel)
    assert s.replicate == ["tok_embeddings"] and "tok_embeddings" not in s.plan
    facts = facts_for(_debug_llama(), "debug", 4, 24, "fp32")
    setup = Setup(8, 8, 8, 32, "fp32", 2, PRESETS["cpu-gloo"])
    plain = price(facts, Candidate(2, 4, True, 0, 4), setup)
    for kwargs, want in ((s.kwargs(), s), ({"sequence_parallel": True}, plain)):
        model = tpcompile.auto_parallelize(_debug_llama(), s.device_mesh("cpu"), **kwargs)
        opt = torch.optim.AdamW(model.parameters())
        ids = torch.randint(0, 500, (4, 32))
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
        m = want.memory
        assert _model_state(model, opt) == pytest.approx(m.params + m.grads + m.optimizer, rel=0.01)
    with pytest.raises(tpcompile.TPCompileError, match="for 16 ranks"):
        next(x for x in suggest(_debug_llama(), 16, device="cpu-gloo", global_batch=16,
                                seq_len=32, dtype="fp32")).device_mesh("cpu")


def test_sizes_derived_at_a_smaller_tp_equal_planning_there():
    """Facts planned at tp 4 and priced at tp 2 give the numbers planning at tp 2 gives."""
    model = _debug_llama()
    setup = Setup(8, 8, 16, 48, "bf16", 2, PRESETS["h100-80gb"])
    for sp in (False, True):
        cand = Candidate(4, 2, sp, 0, 2)
        a = price(facts_for(model, "debug", 4, 24, "bf16"), cand, setup)
        b = price(facts_for(model, "debug", 2, 24, "bf16"), cand, setup)
        assert a.memory == b.memory
        assert a.time.tp_comm == pytest.approx(b.time.tp_comm, rel=1e-9)
        assert a.step_time_s == pytest.approx(b.step_time_s, rel=1e-9)


# ------------------------------------------------------------------- choices from cost

def test_a_gpt_position_embedding_stays_replicated():
    """nanoGPT's 1024-row position table is vocab-parallel in the detected plan; sharding
    it saves 1.5 MiB and costs a collective each way: the suggestions keep it replicated
    (its token embedding, tied to the head, is not a candidate)."""
    from models.nanogpt import CONFIGS, GPT
    with torch.device("meta"):
        gpt = GPT(CONFIGS["gpt2"])
    out = suggest(gpt, 8, global_batch=64, seq_len=1024)
    sharded = [s for s in out if s.feasible and s.tp > 1]
    assert sharded and all(s.replicate == ["transformer.wpe"] for s in sharded)
    refused = [s for s in out if s.tp == 8]  # 12 heads: tp 8 is refused, saying why
    assert len(refused) == 1 and "tp 8 cannot be planned" in refused[0].reason
    kw = sharded[0].kwargs()
    assert "transformer.wpe" not in kw["plan"].modules[0].styles
    assert "transformer.wte" in kw["plan"].modules[0].styles


# ------------------------------------------------------------------- presets and calibration

def test_presets_load_save_and_price_collectives(tmp_path):
    h100 = load_device("H100-80GB")
    assert h100.usable_bytes < 80 * 2**30 and set(PRESETS) >= {"a100-80gb", "b200", "cpu-gloo"}
    with pytest.raises(DeviceError, match="unknown device 'tpu'.*h100-80gb"):
        load_device("tpu")
    for suffix in ("json", "yaml"):
        assert load_device(save_device(h100, tmp_path / f"h.{suffix}")) == h100
    (tmp_path / "bad.json").write_text('{"name": 1}')
    with pytest.raises(DeviceError, match="not a device preset"):
        load_device(tmp_path / "bad.json")
    gb = 2**30
    # ring formulas: all-reduce moves twice an all-gather's bytes; across nodes a group
    # with more ranks per node runs more rings side by side
    assert h100.collective_seconds("all_reduce", "intra", 8, gb) == pytest.approx(
        2 * h100.collective_seconds("all_gather", "intra", 8, gb), rel=0.01)
    assert h100.collective_seconds("all_gather", "inter", 32, gb, per_node=8) < \
        h100.collective_seconds("all_gather", "inter", 32, gb, per_node=1) / 7
    # a measured fit wins over the ring (gloo's reduce-scatter costs an all-reduce)
    fitted = h100.model_copy(update={"fits": [
        CollectiveFit(kind="reduce_scatter", level="intra", group=4, alpha=1e-3, beta=2e-9)]})
    assert fitted.collective_seconds("reduce_scatter", "intra", 4, gb) == pytest.approx(1e-3 + 2e-9 * gb)


def test_calibrate_one_process(tmp_path):
    preset = calibrate(tmp_path / "here.json", repeats=2)
    assert isinstance(preset, DevicePreset) and preset.peak_flops["fp32"] > 1e8
    assert preset.memory_bandwidth > 1e8 and preset.op_overhead > 0 and preset.fits == []
    assert load_device(tmp_path / "here.json") == preset
    out = suggest(_debug_llama(), 4, gpus_per_node=4, device=tmp_path / "here.json",
                  global_batch=4, seq_len=32, dtype="fp32")
    assert out[0].feasible and out[0].device == "calibrated"


# ------------------------------------------------------------------- CLI and explain

def test_cli_suggest_and_explain(tmp_path, capsys):
    from tpcompile.cli.main import main
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA_70B))
    assert main(["suggest", str(cfg), "--gpus", "256", "--per-node", "8", "--batch", "256",
                 "--seq", "8192", "--checkpointing", "none"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n\s+1\s+32 x 8\s+on\s+none", out), out
    assert main(["suggest", str(cfg), "--gpus", "8", "--batch", "8", "--seq", "8192",
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and not any(r["feasible"] for r in rows)
    assert main(["suggest", str(cfg), "--gpus", "8", "--batch", "8", "--seq", "8192",
                 "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
    assert main(["explain", "models/llama2.py", "--config", "debug", "--tp", "2", "--dp", "2",
                 "--seq", "64"]) == 0
    out = capsys.readouterr().out
    assert "Predicted on h100-80gb" in out and "step time" in out and "optimizer" in out


def test_explain_predicts_with_checkpointing(capsys):
    """``explain --checkpointing``: the same mesh with every block, one, or none
    checkpointed; activations fall and the recompute shows in the step time. A bad value
    is a usage error."""
    from tpcompile.cli.main import main
    seen = {}
    for c in ("none", "1", "block"):
        assert main(["explain", "models/llama2.py", "--config", "debug", "--tp", "2", "--seq", "256",
                     "--batch", "4", "--checkpointing", c, "--format", "json"]) == 0
        seen[c] = json.loads(capsys.readouterr().out)["predicted"]
    acts = [seen[c]["memory"]["activations"] for c in ("none", "1", "block")]
    # 2 blocks: with either one checkpointed the peak is one block's activations being
    # used (the other's released or not yet rebuilt) plus the kept inputs
    assert acts[0] > acts[1] >= acts[2], acts
    recompute = [seen[c]["time"]["recompute"] for c in ("none", "1", "block")]
    assert recompute[0] == 0 < recompute[1] < recompute[2], recompute
    assert [seen[c]["checkpoint_blocks"] for c in ("none", "1", "block")] == [0, 1, 2]
    assert main(["explain", "models/llama2.py", "--config", "debug", "--tp", "2", "--seq", "64",
                 "--checkpointing", "block"]) == 0
    assert "every block checkpointed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["explain", "models/llama2.py", "--checkpointing", "all"])
    assert "use none, block or a number" in capsys.readouterr().err
