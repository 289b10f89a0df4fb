"""Tensor parallelism: the TP plans, the head-count check, and 2 CPU processes (gloo) that load
the tiny LLaDA and Dream with transformers' TP and must sample the tokens one process samples,
dense and sparsed, each rank selecting blocks for its own heads only."""

from __future__ import annotations

import os
import re
import socket
import traceback
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sparsed_backend  # noqa: F401  (registers "sparsed" and the models)
from sparsed_backend.attention.config import SparseDConfig
from sparsed_backend.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM
from sparsed_backend.sampling.generation import dream_generate, llada_generate
from sparsed_backend.sampling.tensor_parallel import tensor_parallel_group
from tiny_models import TINY, tiny_model, write_checkpoint

WORLD = 2
GENERATE = {"llada": llada_generate, "dream": dream_generate}
SPARSED = SparseDConfig(skip=0.25, select=0.4, block_size=16, min_sparse_len=0)
MODELS = {"llada": (LLaDAConfig, LLaDAModelLM), "dream": (DreamConfig, DreamModel)}


def _args(kind: str, **overrides) -> dict:
    if kind == "llada":
        base = {"steps": 8, "gen_length": 32, "block_length": 16}
    else:  # a deterministic algorithm at temperature 0 ("origin" always draws random numbers)
        base = {"steps": 8, "max_new_tokens": 32, "alg": "entropy"}
    return {**base, **overrides}


# Sampling settings that draw random numbers at every step (Gumbel noise, random remasking,
# multinomial tokens, Gumbel top-k over positions).
RANDOM = {
    "llada": {"temperature": 0.7, "remasking": "random"},
    "dream": {"alg": "maskgit_plus", "temperature": 0.7, "alg_temp": 0.5},
}


def _prompts():
    """(2, 16) ids, the second row left padded to 10 real tokens, and its mask."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 127, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    ids[1, :6], mask[1, :6] = 1, 0
    return ids, mask


# ------------------------------------------------------------------------------ the plans


def _generic(name: str) -> str:
    return re.sub(r"\.\d+(\.|$)", r".*\1", name)


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_plan_names_every_matrix_and_only_existing_modules(kind):
    config_class, model_class = MODELS[kind]
    with torch.device("meta"):
        model = model_class(config_class(**TINY[kind]))
    plan = model.tp_plan  # base_model_tp_plan under the base model's prefix, plus the LM head rule
    modules = {_generic(n): m for n, m in model.named_modules()}
    assert set(plan) <= set(modules), set(plan) - set(modules)
    big = {n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert big == set(plan)  # nothing large stays replicated
    for name, style in plan.items():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(modules[name], nn.Embedding):
            assert style == "embedding_rowwise"
        elif modules[name] is model.get_output_embeddings():
            assert style == "colwise_gather_output"
        elif leaf in ("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj", "gate_proj"):
            assert style == "colwise", name
        else:
            assert leaf in ("attn_out", "o_proj", "ff_out", "down_proj") and style == "rowwise", name


@pytest.mark.parametrize(
    ("kind", "heads", "tp", "ok"),
    [
        ("llada", {"n_heads": 4, "n_kv_heads": 2}, 2, True),
        ("llada", {"n_heads": 4, "n_kv_heads": 2}, 4, False),  # a kv head would be split
        ("llada", {"n_heads": 4, "n_kv_heads": 1}, 2, False),
        ("dream", {"num_attention_heads": 4, "num_key_value_heads": 2}, 2, True),
        ("dream", {"num_attention_heads": 4, "num_key_value_heads": 2}, 4, False),
        ("dream", {"num_attention_heads": 6, "num_key_value_heads": 2}, 3, False),
        ("dream", {"num_attention_heads": 4, "num_key_value_heads": 4}, 4, True),
    ],
)
def test_heads_must_divide_by_the_tp_size(kind, heads, tp, ok):
    config_class, model_class = MODELS[kind]
    d = {"llada": "d_model", "dream": "hidden_size"}[kind]
    config = config_class(**{**TINY[kind], **heads, d: 96 if tp == 3 else 64})
    # What from_pretrained(distributed_config=...) leaves on the config before building the model.
    config.distributed_config = SimpleNamespace(tp_size=tp)
    with torch.device("meta"):
        if ok:
            model_class(config)
        else:
            with pytest.raises(ValueError, match=rf"divide by the TP size \(distributed_config.tp_size={tp}\)"):
                model_class(config)


def test_a_model_on_one_device_has_no_tp_group():
    assert tensor_parallel_group(tiny_model("llada")) is None


# ----------------------------------------------------------------- 2 processes, gloo, CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_rank(rank: int, port: int, paths: dict, queue) -> None:
    """One TP rank: load both tiny models sharded over 2 processes, sample, report to the parent."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from transformers import AutoModel, DistributedConfig

        import sparsed_backend  # noqa: F401

        out: dict = {"rank": rank}
        ids, mask = _prompts()
        for kind in ("llada", "dream"):
            model = AutoModel.from_pretrained(
                paths[kind], attn_implementation="sparsed", distributed_config=DistributedConfig(tp_plan="auto")
            ).eval()
            fn = GENERATE[kind]
            out[kind, "sharded"] = type(model.get_output_embeddings().weight).__name__
            out[kind, "dense"] = fn(model, ids, mask, **_args(kind)).tolist()
            res = fn(model, ids, mask, sparsed=SPARSED, return_dict_in_generate=True, **_args(kind))
            out[kind, "sparsed"] = res.sequences.tolist()
            out[kind, "tables"] = {i: s.table.tolist() for i, s in res.sparsed_state.layers.items()}
            # Each rank seeds its own generator differently: the first rank's draws must win.
            g = torch.Generator().manual_seed(100 + rank)
            out[kind, "random"] = fn(model, ids, mask, generator=g, **_args(kind, **RANDOM[kind])).tolist()
            try:  # every rank must pass the same prompt batch (here the second rank swaps the rows)
                fn(model, ids.roll(rank, dims=0), mask, **_args(kind))
            except ValueError as err:
                out[kind, "different_prompts"] = str(err)
        try:
            AutoModel.from_pretrained(paths["bad"], distributed_config=DistributedConfig(tp_plan="auto"))
        except ValueError as err:
            out["bad_heads"] = str(err)
        queue.put(out)
    except BaseException:
        queue.put({"rank": rank, "error": traceback.format_exc()})
    finally:
        dist.destroy_process_group()


# The 2 spawned processes import torch and transformers and compile FlexAttention each:
# 35-75 s on 2 busy CPU cores, once for all the tests below.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    pytest.importorskip("accelerate", reason="transformers' tensor parallel loading needs accelerate")
    root = tmp_path_factory.mktemp("tp")
    paths = {kind: str(root / kind) for kind in ("llada", "dream")}
    for kind in ("llada", "dream"):
        write_checkpoint(root / kind, kind)
    paths["bad"] = str(root / "bad")
    write_checkpoint(root / "bad", "dream", {**TINY["dream"], "num_key_value_heads": 1})

    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_run_rank, args=(r, port, paths, queue)) for r in range(WORLD)]
    # CPU ranks even on a GPU machine: transformers shards onto the accelerator it detects, and
    # the gloo group here is a CPU one. The children inherit the environment at start.
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        for p in procs:
            p.start()
    finally:
        if hidden is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    try:
        results = [queue.get(timeout=240) for _ in range(WORLD)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    return sorted(results, key=lambda r: r["rank"])


def _one_process(kind: str, **kwargs):
    model = tiny_model(kind)
    model.set_attn_implementation("sparsed")
    ids, mask = _prompts()
    return GENERATE[kind](model, ids, mask, **_args(kind, **kwargs))


@slow
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_tp_loads_sharded(tp_results, kind):
    assert all(r[kind, "sharded"] == "DTensor" for r in tp_results)


@slow
@pytest.mark.parametrize("kind", ["llada", "dream"])
@pytest.mark.parametrize("mode", ["dense", "sparsed"])
def test_tp_tokens_equal_one_process(tp_results, kind, mode):
    kwargs = {"sparsed": SPARSED} if mode == "sparsed" else {}
    want = _one_process(kind, **kwargs).tolist()
    for r in tp_results:
        assert r[kind, mode] == want, f"rank {r['rank']}"


@slow
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_each_rank_selects_blocks_for_its_own_heads(tp_results, kind):
    """A rank's block tables are the one-process tables of its heads: selection is per head,
    so it needs nothing from the other rank."""
    model = tiny_model(kind)
    model.set_attn_implementation("sparsed")
    ids, mask = _prompts()
    full = GENERATE[kind](model, ids, mask, sparsed=SPARSED, return_dict_in_generate=True, **_args(kind))
    heads = model.config.num_attention_heads // WORLD
    assert sorted(full.sparsed_state.layers) == [0, 1]
    for r in tp_results:
        tables = r[kind, "tables"]
        assert sorted(tables) == [0, 1]
        for layer, sel in full.sparsed_state.layers.items():
            local = torch.tensor(tables[layer])
            assert local.shape[1] == heads
            assert torch.equal(local, sel.table[:, r["rank"] * heads : (r["rank"] + 1) * heads])
    # The selection really drops blocks (a test of sparse steps, not of dense ones).
    assert full.sparsed_state.density() < 1.0


@slow
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_random_sampling_follows_the_first_rank(tp_results, kind):
    """Ranks seeded differently still agree, on what the first rank's generator draws."""
    want = _one_process(kind, generator=torch.Generator().manual_seed(100), **RANDOM[kind]).tolist()
    other = _one_process(kind, generator=torch.Generator().manual_seed(101), **RANDOM[kind]).tolist()
    assert want != other  # the two seeds do draw differently
    for r in tp_results:
        assert r[kind, "random"] == want, f"rank {r['rank']}"


@slow
@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_different_prompts_on_ranks_raise(tp_results, kind):
    for r in tp_results:
        assert "input_ids differs between the tensor-parallel ranks" in r.get((kind, "different_prompts"), "")


@slow
def test_kv_heads_that_do_not_divide_raise_at_load(tp_results):
    for r in tp_results:
        assert "got 4 attention heads and 1 key/value heads" in r.get("bad_heads", "")
