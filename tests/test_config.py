import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsed_backend import SparseDConfig, SparseDState
from sparsed_backend.attention.config import AUTO_BLOCK_SIZES, auto_block_size

OFFSET = r"prompt_end_offset must be None, 'middle' or an int in \[0, block_size=128\), "


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"skip": -0.1}, ValueError, r"skip must be in \[0, 1\], got -0.1"),
        ({"skip": 1.5}, ValueError, r"skip must be in \[0, 1\], got 1.5"),
        ({"skip": "0.2"}, TypeError, r"skip must be a float, got str"),
        ({"select": 0.0}, ValueError, r"select must be in \(0, 1\], got 0.0"),
        ({"select": 1.01}, ValueError, r"select must be in \(0, 1\], got 1.01"),
        ({"select": float("nan")}, ValueError, r"select must be finite, got nan"),
        ({"select": True}, TypeError, r"select must be a float, got bool"),
        ({"block_size": 24}, ValueError, r"block_size must be 'auto' or a positive multiple of 16, got 24"),
        ({"block_size": 0}, ValueError, r"block_size must be 'auto' or a positive multiple of 16, got 0"),
        ({"block_size": "big"}, ValueError, r"block_size must be 'auto' or a positive multiple of 16, got 'big'"),
        ({"block_size": 64.0}, TypeError, r"block_size must be an int, got float"),
        ({"pattern": "rand"}, ValueError, r"pattern must be 'topk', 'local' or 'random', got 'rand'"),
        ({"keep_diagonal": 1}, TypeError, r"keep_diagonal must be a bool, got int"),
        ({"min_sparse_len": -1}, ValueError, r"min_sparse_len must be >= 0 or None, got -1"),
        ({"generation_share": 1}, TypeError, r"generation_share must be a bool, got int"),
        ({"reselect": "yes"}, TypeError, r"reselect must be a bool, got str"),
        ({"rule": "anchor"}, ValueError, r"rule must be one of 'paper', .*, 'sink', got 'anchor'"),
        ({"rule": None}, ValueError, r"rule must be one of 'paper', 'prompt_end', 'prompt_end_gen', 'sink', got None"),
        ({"prompt_end_offset": 128, "block_size": 128}, ValueError, OFFSET + r"got 128"),
        ({"prompt_end_offset": -1, "block_size": 128}, ValueError, OFFSET + r"got -1"),
        ({"prompt_end_offset": "half", "block_size": 128}, ValueError, OFFSET + r"got 'half'"),
        ({"prompt_end_offset": 128}, ValueError, OFFSET + r"got 128"),  # "auto" checks against 128
        ({"prompt_end_offset": 6.0}, TypeError, r"prompt_end_offset must be an int, got float"),
        (
            {"rule": "prompt_end", "pattern": "local"},
            ValueError,
            r"rule='prompt_end' changes SparseD's top-k selection, so it needs pattern='topk', got pattern='local'",
        ),
    ],
)
def test_bad_config_values_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparseDConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "gen_start", "front"),
    [
        ({"block_size": 128}, 2048, 64),  # the moved grid: the prompt ends in the middle of a 128-token block
        ({"block_size": 128}, 2047, 65),
        ({"block_size": 128}, 1000, 88),
        ({"block_size": 32}, 100, 12),  # "middle" follows the block size
        ({}, 1000, 0),  # auto: 16-token blocks for ~1k tokens; 1000 already ends 8 tokens into one
        ({}, 1001, 15),
        ({}, 4000, 32),  # auto: 128-token blocks from 2,897 tokens on
        ({"prompt_end_offset": 0, "block_size": 128}, 1000, 24),
        ({"prompt_end_offset": 0}, 1000, 24),  # auto at an int offset: the paper's 128
        ({"prompt_end_offset": None}, 1000, 0),  # the reference's grid
        ({}, None, 0),  # no generation region: nothing to move
    ],
)
def test_grid_front_puts_the_prompt_end_at_the_offset(kwargs, gen_start, front):
    cfg = SparseDConfig(**kwargs).for_length((gen_start or 0) + 32)
    assert cfg.grid_front(gen_start) == front
    if gen_start and cfg.grid_offset is not None:
        assert (gen_start + front) % cfg.block_size == cfg.grid_offset


@pytest.mark.parametrize(
    ("seq_len", "size"),
    [(1, 16), (1000, 16), (1448, 16), (1449, 64), (2048, 64), (2896, 64), (2897, 128), (4096, 128), (131072, 128)],
)
def test_auto_block_size_takes_the_size_measured_at_the_nearest_base_length(seq_len, size):
    assert auto_block_size(seq_len) == size
    assert SparseDConfig().for_length(seq_len).block_size == size


def test_auto_block_size_is_the_papers_128_off_the_middle_grid_and_set_sizes_stay():
    assert SparseDConfig(prompt_end_offset=None).for_length(1000).block_size == 128
    assert SparseDConfig(prompt_end_offset=64).for_length(1000).block_size == 128
    cfg = SparseDConfig(block_size=64)
    assert cfg.for_length(100_000) is cfg


def test_an_unresolved_auto_block_size_refuses_grid_arithmetic():
    with pytest.raises(ValueError, match=r"block_size='auto' is resolved per sequence: call config.for_length"):
        SparseDConfig().grid_front(1000)


def test_the_state_resolves_the_block_size_once_per_length():
    state = SparseDState(SparseDConfig(), steps=10)
    assert state.config_for(1000).block_size == 16
    assert state.config_for(1000) is state.config_for(1000)
    assert state.config_for(4096).block_size == 128
    assert state.config.block_size == "auto"  # the user's config is left as given


def test_config_is_frozen():
    cfg = SparseDConfig()
    with pytest.raises(AttributeError):
        cfg.select = 0.5


@pytest.mark.parametrize(
    ("steps", "skip", "switch"), [(256, 0.2, 51), (128, 0.2, 25), (10, 0.0, 0), (10, 1.0, 10), (1, 0.5, 0)]
)
def test_switch_step(steps, skip, switch):
    assert SparseDConfig(skip=skip).switch_step(steps) == switch


@pytest.mark.parametrize(("select", "n", "k"), [(1.0, 7, 7), (0.3, 10, 3), (0.3, 11, 4), (0.01, 5, 1), (0.5, 1, 1)])
def test_blocks_kept_is_ceil_with_one_minimum(select, n, k):
    assert SparseDConfig(select=select).blocks_kept(n) == k


def test_state_schedule_and_step_past_the_end():
    state = SparseDState(SparseDConfig(skip=0.5), steps=4)
    modes = []
    for _ in range(4):
        modes.append(state.mode)
        state.advance()
    assert modes == ["dense", "dense", "switch", "sparse"]
    with pytest.raises(ValueError, match=r"step counter past the schedule: step 4 of a 4-step generation"):
        _ = state.mode
    state.reset()
    assert state.mode == "dense"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, r"steps must be a positive int, got 0"),
        ({"steps": 2.0}, TypeError, r"steps must be an int, got float"),
        ({"steps": 4, "gen_start": -1}, ValueError, r"gen_start must be >= 0, got -1"),
        ({"steps": 4, "gen_start": 1.5}, TypeError, r"gen_start must be an int or None, got 1.5"),
    ],
)
def test_bad_state_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparseDState(SparseDConfig(), **kwargs)


def test_state_needs_a_config():
    with pytest.raises(TypeError, match=r"config must be a SparseDConfig, got dict"):
        SparseDState({"select": 0.3}, steps=4)


@given(st.integers(1, 1 << 20), st.integers(1, 1 << 20))
def test_auto_block_size_grows_with_the_length_through_the_measured_sizes(a, b):
    lo, hi = sorted((a, b))
    assert auto_block_size(lo) <= auto_block_size(hi)
    assert auto_block_size(hi) in [size for _, size in AUTO_BLOCK_SIZES]
    for base, size in AUTO_BLOCK_SIZES:  # within a factor sqrt(2) of a base: that base's size
        if base / 2**0.5 < hi < base * 2**0.5:
            assert auto_block_size(hi) == size
    assert SparseDConfig().for_length(hi).block_size == auto_block_size(hi)
