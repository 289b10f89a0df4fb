import pytest

from sparsed_backend import SparseDConfig, SparseDState

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
        ({"block_size": 24}, ValueError, r"block_size must be a positive multiple of 16, got 24"),
        ({"block_size": 0}, ValueError, r"block_size must be a positive multiple of 16, got 0"),
        ({"block_size": 64.0}, TypeError, r"block_size must be an int, got float"),
        ({"pattern": "rand"}, ValueError, r"pattern must be 'topk', 'local' or 'random', got 'rand'"),
        ({"keep_diagonal": 1}, TypeError, r"keep_diagonal must be a bool, got int"),
        ({"min_sparse_len": -1}, ValueError, r"min_sparse_len must be >= 0 or None, got -1"),
        ({"generation_share": 1}, TypeError, r"generation_share must be a bool, got int"),
        ({"reselect": "yes"}, TypeError, r"reselect must be a bool, got str"),
        ({"rule": "anchor"}, ValueError, r"rule must be one of 'paper', .*, 'sink', got 'anchor'"),
        ({"rule": None}, ValueError, r"rule must be one of 'paper', 'prompt_end', 'prompt_end_gen', 'sink', got None"),
        ({"prompt_end_offset": 128}, ValueError, OFFSET + r"got 128"),
        ({"prompt_end_offset": -1}, ValueError, OFFSET + r"got -1"),
        ({"prompt_end_offset": "half"}, ValueError, OFFSET + r"got 'half'"),
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
        ({}, 2048, 64),  # the default grid: the prompt ends in the middle of a 128-token block
        ({}, 2047, 65),
        ({}, 1000, 88),
        ({"block_size": 32}, 100, 12),  # "middle" follows the block size
        ({"prompt_end_offset": 0}, 1000, 24),
        ({"prompt_end_offset": None}, 1000, 0),  # the reference's grid
        ({}, None, 0),  # no generation region: nothing to move
    ],
)
def test_grid_front_puts_the_prompt_end_at_the_offset(kwargs, gen_start, front):
    cfg = SparseDConfig(**kwargs)
    assert cfg.grid_front(gen_start) == front
    if gen_start and cfg.grid_offset is not None:
        assert (gen_start + front) % cfg.block_size == cfg.grid_offset


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
