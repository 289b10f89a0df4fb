"""The package's layers (attention/, sampling/) and the old import paths that still work."""

from __future__ import annotations

import importlib

import pytest

import sparsed_backend

# Old public path -> new home: each old path re-exports the names users imported from it.
MOVED = {
    "generation": "sampling.generation",
    "kv_cache": "sampling.kv_cache",
    "block_diffusion": "sampling.block_diffusion",
    "block_cache": "sampling.block_cache",
    "tensor_parallel": "sampling.tensor_parallel",
    "prefix_selection": "attention.prefix_selection",
    "config": "attention.config",
    "state": "attention.state",
}
# Names the old modules offered (their __all__ plus constants imported elsewhere, e.g. the harness).
OLD_NAMES = {
    "generation": {
        "DREAM_ALGS",
        "LLADA_REMASKING",
        "DiffusionGenerationOutput",
        "check_cache_with_sparsed",
        "dream_generate",
        "llada_generate",
        "llada_transfer_schedule",
    },
    "kv_cache": {"KV_CACHE_KINDS", "KV_CACHE_MODES", "BlockKVCache", "check_kv_cache", "window_attention_mask"},
    "block_diffusion": {"BLOCKDIFF_REMASKING", "blockdiff_generate", "block_causal_mask"},
    "block_cache": {"BlockDiffusionKVCache", "CACHE_MODES", "FORWARD_KINDS", "cache_keyword"},
    "tensor_parallel": {"RankSync", "rank_sync", "tensor_parallel_group"},
    "prefix_selection": {
        "PrefixSparseConfig",
        "PrefixSparseState",
        "PrefixSelection",
        "prefix_block_mass",
        "prefix_sparse_attention",
        "select_prefix_blocks",
    },
    "config": {"RULES", "SparseDConfig"},
    "state": {"LayerSelection", "SparseDState", "Mode"},
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_public_path_re_exports_the_objects_of_the_new_home(old):
    shim = importlib.import_module(f"sparsed_backend.{old}")
    home = importlib.import_module(f"sparsed_backend.{MOVED[old]}")
    assert OLD_NAMES[old] <= set(shim.__all__)
    for name in shim.__all__:
        assert getattr(shim, name) is getattr(home, name), f"sparsed_backend.{old}.{name}"


def test_attention_package_keeps_the_old_attention_module_names():
    from sparsed_backend.attention import backend

    attention = importlib.import_module("sparsed_backend.attention")
    for name in backend.__all__:
        assert getattr(attention, name) is getattr(backend, name)
    for name in ("SparseDConfig", "SparseDState", "LayerSelection", "PrefixSparseConfig", "PrefixSparseState"):
        assert name in attention.__all__


def test_sampling_package_exports_the_samplers():
    from sparsed_backend import sampling
    from sparsed_backend.sampling import block_diffusion, generation

    assert sampling.llada_generate is generation.llada_generate
    assert sampling.dream_generate is generation.dream_generate
    assert sampling.blockdiff_generate is block_diffusion.blockdiff_generate


@pytest.mark.parametrize(
    "internal",
    [
        "switch_step",
        "masks",
        "scoring",
        "selection",
        "dense",
        "policy",
        "kernels",
        "_sampling",
        "_threshold",
        "_ranking",
    ],
)
def test_internal_modules_have_no_old_path(internal):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"sparsed_backend.{internal}")


def test_top_level_names_come_from_the_attention_layer():
    from sparsed_backend.attention import SparseDConfig, SparseDState, sparsed_attention_forward

    assert sparsed_backend.SparseDConfig is SparseDConfig
    assert sparsed_backend.SparseDState is SparseDState
    assert sparsed_backend.sparsed_attention_forward is sparsed_attention_forward
