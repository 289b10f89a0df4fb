"""The `sparsed` command line: one-line user errors, help without torch, progress switches."""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsed_backend
from sparsed_backend._validate import ArgumentTypeError, ArgumentValueError
from sparsed_backend.attention.prefix_selection import PrefixSparseConfig
from sparsed_backend.cli import LIBRARY_FLAGS, UsageError, _flags
from sparsed_backend.demo import model_path
from sparsed_cli import build_parser, main
from sparsed_cli.flags import DeviceName, Float, GridOffset, Int, ModelDir, PngOut
from tiny_models import write_blockdiff_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = str(model_path())
# A generate run that costs well under a second once the model is loaded (dense SDPA, no compile).
QUICK = ["--model", SHIPPED, "--prompt", "\u4e00\u4e01?", "--steps", "2", "--gen-length", "2", "--attn", "sdpa",
         "--dtype", "float32", "--device", "cpu"]  # fmt: skip
# A tiny block-diffusion (Qwen3, SDAR layout) checkpoint, written per test at {qwen3}: dense, quick.
BLOCKDIFF = ["--model", "{qwen3}", "--prompt", "\u4e00\u4e01?", "--gen-length", "8", "--attn", "sdpa",
             "--dtype", "float32", "--device", "cpu"]  # fmt: skip
# QUICK with threshold decoding in place of --steps: append the threshold.
QUICK_THRESHOLD = [*QUICK[:4], *QUICK[6:], "--threshold"]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) -> (exit status, stdout, stderr); argparse's SystemExit counts as a status."""
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, message: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    # Flags, never internal names: no snake_case word outside paths and quoted values.
    words = [w for w in err.split() if "/" not in w and "'" not in w]
    assert not [w for w in words if re.search(r"\b[a-z]+_[a-z_]+\b", w)], err


def _dream_checkpoint(path: Path) -> str:
    from tiny_models import write_checkpoint

    write_checkpoint(path, "dream")
    return str(path)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")

BAD_INPUTS = [
    # generate
    (["generate", "--model", "/nonexistent/model", "--prompt", "hi"],
     r"^sparsed generate: error: --model must be a model directory holding config\.json, "
     r"got /nonexistent/model \(no such directory\)$"),
    (["generate", "--model", "{file}", "--prompt", "hi"], r"--model must be a model directory .*\(a file\)"),
    (["generate", "--model", "{empty}", "--prompt", "hi"], r"--model must be .*\(no config\.json in it\)"),
    pytest.param(["generate", *QUICK, "--device", "cuda"],
                 r"--device must be auto, cpu or an available CUDA device, got 'cuda' \(", marks=NO_CUDA),
    (["generate", *QUICK, "--device", "tpu"], r"--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["generate", *QUICK, "--steps", "0"], r"--steps must be >= 1, got 0"),
    (["generate", *QUICK, "--gen-length", "0"], r"--gen-length must be >= 1, got 0"),
    (["generate", *QUICK, "--gen-length", "6", "--block-length", "4"],
     r"--gen-length must be divisible by --block-length, got --gen-length=6, --block-length=4$"),
    (["generate", *QUICK, "--gen-length", "4", "--block-length", "2", "--steps", "3"],
     r"--steps must be divisible by the number of blocks --gen-length/--block-length = 2, got --steps=3$"),
    (["generate", *QUICK, "--temperature", "-1"], r"--temperature must be >= 0\.0, got -1\.0"),
    (["generate", *QUICK, "--attn", "sparsed", "--select", "2"], r"--select must be in \(0, 1\], got 2\.0"),
    (["generate", *QUICK, "--attn", "sparsed", "--skip", "1.5"], r"--skip must be in \[0, 1\], got 1\.5"),
    (["generate", *QUICK, "--attn", "sparsed", "--block-size", "10"],
     r"--block-size must be 'auto' or a positive multiple of 16, got 10"),
    (["generate", *QUICK, "--attn", "sparsed", "--prompt-end-offset", "half"],
     r"--prompt-end-offset must be none, middle or an int, got 'half'$"),
    (["generate", *QUICK, "--attn", "sparsed", "--prompt-end-offset", "128"],
     r"--prompt-end-offset must be None, 'middle' or an int in \[0, --block-size=128\), got 128$"),
    (["generate", *QUICK, "--prompt", "\u4e00" * 5272, "--gen-length", "128", "--steps", "128"],
     r"--prompt \(5,273 tokens\) and --gen-length \(128\) make 5,401 tokens, "
     r"more than the model's maximum of 4,206 positions \(no RoPE scaling\)$"),
    (["generate", *QUICK, "--rope-scaling", "yarn"],
     r"^sparsed generate: error: --rope-scaling must be none or TYPE:FACTOR with TYPE linear, dynamic or yarn and "
     r"FACTOR a number >= 1 \(e\.g\. yarn:4\), got 'yarn'$"),
    (["generate", *QUICK, "--rope-scaling", "linear:0.5"],
     r"--rope-scaling must be none or TYPE:FACTOR .*got 'linear:0\.5'$"),
    (["generate", *QUICK, "--rope-scaling", "ntk:2"], r"--rope-scaling must be none or TYPE:FACTOR .*got 'ntk:2'$"),
    (["generate", *QUICK, "--rope-scaling", "longrope:4"],
     r"--rope-scaling must be TYPE:FACTOR with TYPE linear, dynamic or yarn \(longrope takes per-dimension factors, "
     r"which only a config\.json can give\), got 'longrope:4'$"),
    (["generate", *QUICK, "--rope-scaling", "linear:2", "--prompt", "\u4e00" * 8400, "--gen-length", "128",
      "--steps", "128"],
     r"--prompt \(8,401 tokens\) and --gen-length \(128\) make 8,529 tokens, more than the model's maximum of "
     r"8,412 positions \(4,206 original positions x linear RoPE scaling factor 2\)$"),
    (["generate", *QUICK, "--prompt", "Hello, world"],
     r"--prompt must be text the model's tokenizer can encode, got 12 of 13 tokens unknown \(<\|unk\|>\)"),
    (["generate", *QUICK, "--prompt", "  "], r"--prompt must hold some text, got an empty prompt$"),
    (["generate", *QUICK, "--threshold", "0.5"],
     r"--steps and --threshold exclude each other: .* got --steps 2 and --threshold 0.5$"),
    (["generate", *QUICK_THRESHOLD, "0"], r"--threshold must be in \(0, 1\], got 0.0$"),
    (["generate", *QUICK, "--factor", "1"],
     r"--steps and --factor exclude each other: factor decoding takes as many steps as each block needs, got "
     r"--steps 2 and --factor 1.0$"),
    (["generate", *QUICK_THRESHOLD, "0.5", "--factor", "1"],
     r"--threshold and --factor are two parallel decoding rules: give one, got --threshold 0.5 and --factor 1.0$"),
    (["generate", *QUICK_THRESHOLD[:-1], "--factor", "0"], r"--factor must be > 0, got 0.0$"),
    (["generate", *QUICK_THRESHOLD, "0.5", "--kv-cache", "dual", "--attn", "flex_attention"],
     r"--kv-cache dual runs with --attn sparsed, sdpa or eager, got --attn 'flex_attention'$"),
    (["generate", "--model", "{dream}", "--prompt", "hi", "--kv-cache", "prefix"],
     r"--kv-cache='prefix' needs --block-length: without blocks Dream decodes the whole generation at once"),
    (["generate", "--model", "{config_only}", "--prompt", "hi", "--device", "cpu"],
     r"--model: no tokenizer could be loaded from "),
    (["generate", "--model", "{no_weights}", "--prompt", "\u4e00\u4e01?", "--device", "cpu"],
     r"--model must hold the weights \(\*\.safetensors\), got none in .*no_weights$"),
    (["generate", "--model", "{corrupt_weights}", "--prompt", "\u4e00\u4e01?", "--device", "cpu"],
     r"--model: cannot load the weights in .*corrupt_weights: Error while deserializing header"),
    (["generate", "--model", SHIPPED, "--prompt", "hi", "--attn", "flash"],
     r"^sparsed generate: error: argument --attn: invalid choice: 'flash'"),
    # generate: the flags of one sampler family refused for the other
    (["generate", *QUICK, "--denoising-steps", "2"],
     r"^sparsed generate: error: --denoising-steps applies only to block-diffusion \(Qwen3\) checkpoints, got "
     r"--denoising-steps 2 with a 'llada' checkpoint$"),
    (["generate", *QUICK, "--remasking", "sequential"], r"^sparsed generate: error: --remasking applies only to "),
    (["generate", *QUICK, "--prefix-budget", "8"], r"^sparsed generate: error: --prefix-budget applies only to "),
    (["generate", *BLOCKDIFF, "--steps", "4"],
     r"^sparsed generate: error: --steps applies only to LLaDA and Dream checkpoints, got --steps 4 with a 'qwen3' "
     r"checkpoint$"),
    (["generate", *BLOCKDIFF, "--kv-cache", "dual"], r"--kv-cache applies only to LLaDA and Dream checkpoints"),
    (["generate", *BLOCKDIFF, "--factor", "1"], r"--factor applies only to LLaDA and Dream checkpoints"),
    (["generate", *BLOCKDIFF, "--skip", "0.5"], r"--skip applies only to LLaDA and Dream checkpoints"),
    (["generate", *BLOCKDIFF, "--prompt-end-offset", "none"], r"--prompt-end-offset applies only to LLaDA and Dream"),
    (["generate", *BLOCKDIFF, "--rope-scaling", "yarn:2"], r"--rope-scaling applies only to LLaDA and Dream"),
    (["generate", *BLOCKDIFF, "--attn", "flex_attention"],
     r"--attn must be one of sdpa, eager, sparsed for a block-diffusion checkpoint .*, got --attn 'flex_attention'$"),
    # generate with a block-diffusion checkpoint: PrefixSparseConfig's and blockdiff_generate's rules
    (["generate", *BLOCKDIFF, "--attn", "sparsed", "--select", "0.3", "--prefix-budget", "8"],
     r"give exactly one of --select and --prefix-budget, got --select=0.3, --prefix-budget=8$"),
    (["generate", *BLOCKDIFF, "--attn", "sparsed", "--select", "1.5"], r"--select must be in \(0, 1\], got 1.5$"),
    (["generate", *BLOCKDIFF, "--attn", "sparsed", "--block-size", "auto"],
     r"--block-size auto is SparseD's \(LLaDA / Dream\); a block-diffusion checkpoint takes an int .*, got "
     r"--block-size auto$"),
    (["generate", *BLOCKDIFF, "--prefix-budget", "8"],
     r"--prefix-budget is a setting of the sparse prefix selection: it needs --attn sparsed, got --attn sdpa$"),
    (["generate", *BLOCKDIFF, "--select-every", "2"],
     r"^sparsed generate: error: --select-every is a setting of the sparse prefix selection: it needs --attn "),
    (["generate", *BLOCKDIFF, "--attn", "sparsed", "--select-every", "0"], r"--select-every must be >= 1, got 0$"),
    (["generate", *BLOCKDIFF, "--attn", "sparsed", "--scorer", "best"],
     r"^sparsed generate: error: argument --scorer: invalid choice: 'best'"),
    (["generate", *BLOCKDIFF, "--attn", "sparsed", "--scorer", "fused"],
     r"^sparsed generate: error: --scorer='fused' needs the block-sparse decode kernel, but "),
    (["generate", *QUICK, "--select-every", "2"], r"^sparsed generate: error: --select-every applies only to "),
    (["generate", *QUICK, "--scorer", "fused"], r"^sparsed generate: error: --scorer applies only to "),
    (["generate", *QUICK, "--sparse-commit"], r"^sparsed generate: error: --sparse-commit applies only to "),
    (["generate", *BLOCKDIFF, "--sparse-commit"],
     r"^sparsed generate: error: --sparse-commit is a setting of the sparse prefix selection: it needs --attn "),
    (["generate", *BLOCKDIFF, "--remasking", "low_confidence_dynamic"],
     r"--remasking='low_confidence_dynamic' needs a --threshold in \[0, 1\]"),
    (["generate", *BLOCKDIFF, "--threshold", "0.9", "--remasking", "sequential"],
     r"--threshold is only used by --remasking='low_confidence_dynamic', got --remasking='sequential'$"),
    (["generate", *BLOCKDIFF, "--denoising-steps", "0"], r"--denoising-steps must be >= 1, got 0$"),
    (["generate", *BLOCKDIFF, "--cuda-graphs"], r"--cuda-graphs needs the model on a CUDA device, got it on cpu$"),
    (["generate", *BLOCKDIFF, "--cuda-graphs", "whole"],
     r"--cuda-graphs needs the model on a CUDA device, got it on cpu$"),
    (["generate", *BLOCKDIFF, "--cuda-graphs", "all"],
     r"^sparsed generate: error: argument --cuda-graphs: invalid choice: 'all' \(choose from 'piecewise', 'whole'\)"),
    (["generate", *QUICK, "--cuda-graphs"],
     r"^sparsed generate: error: --cuda-graphs applies only to block-diffusion "),
    (["generate", *BLOCKDIFF, "--prompt", "Hello, world"],
     r"--prompt must be text the model's tokenizer can encode, got 12 of 13 tokens unknown"),
    # bench
    (["bench", "--length", "0"], r"^sparsed bench: error: --length must be >= 1, got 0$"),
    (["bench", "--heads", "0"], r"^sparsed bench: error: --heads must be >= 1, got 0$"),
    (["bench", "--head-dim", "0"], r"--head-dim must be >= 1, got 0"),
    (["bench", "--repeats", "0"], r"^sparsed bench: error: --repeats must be >= 1, got 0$"),
    (["bench", "--select", "0"], r"--select must be in \(0, 1\], got 0\.0"),
    (["bench", "--block-size", "10"], r"--block-size must be 'auto' or a positive multiple of 16, got 10"),
    pytest.param(["bench", "--device", "cuda"], r"--device must be auto, cpu or an available CUDA device",
                 marks=NO_CUDA),
    # demo
    (["demo", "--steps", "0"], r"^sparsed demo: error: --steps must be in \[1, 5\], got 0$"),
    (["demo", "--steps", "6"], r"--steps must be in \[1, 5\], got 6"),
    (["demo", "--prompts", "0"], r"^sparsed demo: error: --prompts must be >= 1, got 0$"),
    (["demo", "--batch", "0"], r"--batch must be >= 1, got 0"),
    (["demo", "--block-size", "big"], r"^sparsed demo: error: --block-size must be auto or an int, got 'big'$"),
    (["demo", "--block-size", "24"], r"--block-size must be 'auto' or a positive multiple of 16, got 24$"),
    (["demo", "--records", "0"], r"--records must be in \[1, 512\], got 0"),
    (["demo", "--length", "10"], r"--length must be in \[387, 4201\], got 10 \(64 records need 387 tokens"),
    (["demo", "--length", "5000"],
     r"--length must be in \[387, 4201\], got 5000 .*the model's 4,206 positions hold at most 4,201 prompt tokens"),
    (["demo", "--layer", "6"], r"--layer must be in \[0, 5\], got 6"),
    (["demo", "--select", "0"], r"--select must be in \(0, 1\], got 0\.0"),
    (["demo", "--out", "/nonexistent/dir/blocks.png"],
     r"--out must be a file path in an existing directory, got /nonexistent/dir/blocks\.png"),
    (["demo", "--model", "/nonexistent/model"], r"--model must be a model directory holding config\.json"),
    (["demo", "--out", "blocks.xyz"], r"^sparsed demo: error: --out must name a \.png file, got blocks\.xyz$"),
    (["demo", "--out", "blocks"], r"--out must name a \.png file, got blocks$"),
    (["demo", "--prompts", "x"], r"^sparsed demo: error: argument --prompts: invalid int value: 'x'$"),
    (["demo", "--bogus"], r"^sparsed: error: unrecognized arguments: --bogus$"),
    (["demo", "--seed", "-1"], r"^sparsed demo: error: --seed must be in \[0, 18446744073709551615\], got -1$"),
    (["demo", "--prompt-end-offset", "1.5"], r"--prompt-end-offset must be none, middle or an int, got '1\.5'$"),
    (["generate", *QUICK, "--device", "cuda:x"], r"--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'$"),
    (["generate", *QUICK, "--temperature", "nan"], r"--temperature must be >= 0\.0, got nan$"),
    (["generate", *QUICK_THRESHOLD, "1.5"], r"--threshold must be in \(0, 1\], got 1\.5$"),
    (["generate", *QUICK, "--seed", str(2**64)], r"--seed must be in \[0, 18446744073709551615\], got 18446"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BAD_INPUTS)
def test_bad_input_is_one_line_and_status_2(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((Path(SHIPPED) / "config.json").read_text())
    paths = {"file": str(tmp_path / "file"), "empty": str(tmp_path / "empty"),
             "config_only": str(tmp_path / "config_only")}  # fmt: skip
    if "{dream}" in argv:
        paths["dream"] = _dream_checkpoint(tmp_path / "dream")
    if "{qwen3}" in argv:
        write_blockdiff_checkpoint(tmp_path / "qwen3")
        paths["qwen3"] = str(tmp_path / "qwen3")
    for name in ("no_weights", "corrupt_weights"):  # the shipped checkpoint without readable weights
        if "{" + name + "}" in argv:
            shutil.copytree(SHIPPED, tmp_path / name)
            weights = tmp_path / name / "model.safetensors"
            if name == "no_weights":
                weights.unlink()
            else:
                weights.write_bytes(weights.read_bytes()[:1000])
            paths[name] = str(tmp_path / name)
    argv = [a.format(**paths) if a.startswith("{") else a for a in argv]
    status, out, err = run_main(argv, capsys)
    assert_one_line_error(status, err, message)
    assert out == ""


def test_the_shipped_entry_point_prints_one_line_too():
    """The same through a real process: stderr is exactly one line, exit status 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "sparsed_cli", "bench", "--repeats", "0"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == "sparsed bench: error: --repeats must be >= 1, got 0\n"
    assert proc.stdout == ""


def test_flags_renames_argument_errors_and_passes_bugs_through():
    renamed = r"^--block-size must be a positive multiple of 16, got 10$"
    with pytest.raises(UsageError, match=renamed), _flags("block_size"):
        raise ArgumentValueError("block_size", "block_size must be a positive multiple of 16, got 10")
    names = ("steps", "gen_length", "block_length")
    renamed = r"^--steps must .* --gen-length/--block-length = 2, got --steps=3$"
    with pytest.raises(UsageError, match=renamed), _flags(*names):
        raise ArgumentValueError("steps", "steps must be divisible by gen_length/block_length = 2, got steps=3")
    # The argument decides, not the wording: a reworded message stays a one-line user error.
    with pytest.raises(UsageError, match=r"^the step count --steps=3 does not divide"), _flags(*names):
        raise ArgumentValueError("steps", "the step count steps=3 does not divide gen_length")
    # Whole words only, and a flag already in the message stays as it is.
    flagged = r"^--steps \(not --steps\) and steps_per_block: --gen-length$"
    with pytest.raises(UsageError, match=flagged), _flags(*names):
        raise ArgumentValueError("steps", "steps (not --steps) and steps_per_block: gen_length\nmore")
    with pytest.raises(UsageError, match=r"^--prompts must be >= 1, got 0$"), _flags():
        raise ArgumentTypeError("--prompts", "--prompts must be >= 1, got 0")
    with pytest.raises(ArgumentValueError, match="top_p must"), _flags(*names):
        raise ArgumentValueError("top_p", "top_p must be in (0, 1]")  # an argument the CLI never passes: a bug
    with pytest.raises(ArgumentValueError, match="skip must"), _flags(*names):
        raise ArgumentValueError("skip", "skip must be in [0, 1]")  # in the table, but not fed at this call site
    with pytest.raises(ValueError, match="steps must be"), _flags(*names):
        raise ValueError("steps must be >= 1")  # not an argument error: a bug, whatever it says
    with pytest.raises(RuntimeError), _flags(*names):
        raise RuntimeError("steps must be >= 1")
    with pytest.raises(AssertionError, match="top_p"), _flags("top_p"):  # every argument must be in the table
        pass


def test_library_flags_table_names_real_flags():
    """Every flag the table maps a library argument to is a flag of some command."""
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices.values()
    flags = {opt for command in commands for action in command._actions for opt in action.option_strings}
    assert set(LIBRARY_FLAGS.values()) <= flags, set(LIBRARY_FLAGS.values()) - flags


def _fails(check, text: str) -> str:
    """The one-line message a bound ``type=`` check gives for ``text``."""
    with pytest.raises(argparse.ArgumentError) as err:
        check(text)
    assert err.value.argument_name is None  # printed as it is, no "argument --flag:" prefix
    return str(err.value)


def test_int_and_float_flag_types():
    steps = Int(1).named("--steps")
    assert steps("3") == 3 and isinstance(steps("3"), int)
    assert _fails(steps, "0") == "--steps must be >= 1, got 0"
    assert _fails(Int(1, 5).named("--steps"), "6") == "--steps must be in [1, 5], got 6"
    assert _fails(Int(None, 5).named("--n"), "6") == "--n must be <= 5, got 6"
    with pytest.raises(ValueError):  # not a number: argparse words it ("invalid int value: 'x'")
        steps("x")
    assert steps.__name__ == "int" and Float(0.0).__name__ == "float"
    temperature = Float(0.0).named("--temperature")
    assert temperature("0") == 0.0 and temperature("0.7") == 0.7
    assert _fails(temperature, "-1") == "--temperature must be >= 0.0, got -1.0"
    for bad in ("nan", "inf"):
        assert _fails(temperature, bad) == f"--temperature must be >= 0.0, got {bad}"
    threshold = Float(0, 1, open_low=True).named("--threshold")
    assert threshold("1") == 1.0
    assert _fails(threshold, "0") == "--threshold must be in (0, 1], got 0.0"
    assert _fails(threshold, "1.01") == "--threshold must be in (0, 1], got 1.01"
    assert _fails(Int(1), "0") == "the value must be >= 1, got 0"  # not bound to a flag (outside the parser)


def test_text_flag_types(tmp_path):
    offset = GridOffset().named("--prompt-end-offset")
    assert offset("none") is None and offset("MIDDLE") == "middle" and offset("-3") == -3
    assert _fails(offset, "half") == "--prompt-end-offset must be none, middle or an int, got 'half'"
    device = DeviceName().named("--device")
    assert [device(d) for d in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    for bad in ("tpu", "cuda:", "cuda:-1", "cpu:x", ""):
        assert _fails(device, bad) == f"--device must be auto, cpu, cuda or cuda:N, got {bad!r}"
    model = ModelDir().named("--model")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert model(str(tmp_path / "m")) == tmp_path / "m"
    assert _fails(model, str(tmp_path)).endswith("(no config.json in it)")
    assert _fails(model, str(tmp_path / "m" / "config.json")).endswith("(a file)")
    assert _fails(model, str(tmp_path / "nope")).endswith("(no such directory)")
    out = PngOut().named("--out")
    assert out(str(tmp_path / "a.PNG")) == tmp_path / "a.PNG"
    assert _fails(out, str(tmp_path / "a.jpg")) == f"--out must name a .png file, got {tmp_path / 'a.jpg'}"
    assert "existing directory" in _fails(out, str(tmp_path / "no" / "a.png"))
    (tmp_path / "d.png").mkdir()
    assert _fails(out, str(tmp_path / "d.png")).endswith("(a directory or read-only)")


def test_the_parser_binds_each_check_to_its_flag():
    """``type=`` checks name the flag they were added under, and defaults given as text pass them."""
    args = build_parser().parse_args(["demo"])
    assert args.prompt_end_offset == "middle" and args.out == Path("sparsed_demo_blocks.png")
    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
    assert actions["block_length"].type.flag == "--block-length"
    assert actions["seed"].type.flag == "--seed"


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """An error that is not about a flag propagates out of main (so the user sees a traceback)."""
    import sparsed_backend.sampling.generation as generation

    def broken(*args, **kwargs):
        raise ValueError("index 7 is out of bounds")

    monkeypatch.setattr(generation, "llada_generate", broken)
    with pytest.raises(ValueError, match="index 7 is out of bounds"):
        main(["generate", *QUICK, "--no-progress"])


def test_rope_scaling_flag_reaches_the_loaded_model(monkeypatch, capsys):
    import sparsed_backend.sampling.generation as generation

    seen = {}
    real = generation.llada_generate

    def spy(model, *args, **kwargs):
        rotary = model.model.rotary_emb
        seen.update(scaling=model.config.rope_scaling, rope_type=rotary.rope_type, factor=rotary.attention_scaling)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(generation, "llada_generate", spy)
    assert main(["generate", *QUICK, "--no-progress", "--rope-scaling", "yarn:2"]) == 0
    assert seen["scaling"] == {"rope_type": "yarn", "factor": 2, "original_max_position_embeddings": 4206}
    assert seen["rope_type"] == "yarn" and seen["factor"] > 1.0
    assert main(["generate", *QUICK, "--no-progress", "--rope-scaling", "none"]) == 0
    assert seen["scaling"] is None and seen["rope_type"] == "default"
    assert len(capsys.readouterr().out.splitlines()) == 2  # one answer per run


def test_generate_prints_the_answer_and_progress_can_be_turned_off(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    # Redraw on every update: tqdm's update() then returns True, which would replace the model's
    # output if a forward hook passed it on.
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    outputs = {}
    for name, extra, env in [("bar", [], None), ("flag", ["--no-progress"], None), ("env", [], "1")]:
        if env is None:
            monkeypatch.delenv("SPARSED_NO_PROGRESS", raising=False)
        else:
            monkeypatch.setenv("SPARSED_NO_PROGRESS", env)
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(["generate", *QUICK, *extra]) == 0
        outputs[name] = (capsys.readouterr().out, terminal.getvalue())
    out, err = outputs["bar"]
    assert "denoising" in err  # the bar, on a terminal
    assert len(out.splitlines()) == 1  # the answer, one line, and nothing else on stdout
    for name in ("flag", "env"):
        assert outputs[name] == (out, ""), name


def test_generate_with_threshold_decoding_and_a_cache(capsys, monkeypatch):
    """The shipped LLaDA model: threshold decoding, and the factor rule, with each cache run and
    print one line (the samplers are tested in test_threshold.py; this checks the flags reach
    them)."""
    from sparsed_backend.sampling import generation

    seen = []
    real = generation.llada_generate
    monkeypatch.setattr(generation, "llada_generate", lambda *a, **k: seen.append(k) or real(*a, **k))
    for cache, rule in (
        ("none", ["--threshold", "0.9"]),
        ("dual", ["--threshold", "0.9"]),
        ("dual", ["--factor", "1"]),
    ):
        argv = ["generate", "--model", SHIPPED, "--prompt", "\u4e00\u4e01?", "--gen-length", "8", "--block-length", "4",
                *rule, "--kv-cache", cache, "--dtype", "float32", "--device", "cpu", "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        assert len(capsys.readouterr().out.splitlines()) == 1
    assert [(k["threshold"], k["factor"], k["steps"]) for k in seen] == [(0.9, None, None)] * 2 + [(None, 1.0, None)]


def test_block_divisibility_is_the_samplers_rule_reported_by_flag_before_loading(monkeypatch, capsys):
    """--gen-length / --block-length / --steps divisibility has one home, the samplers' argument
    rules: the CLI calls them with the bad values before the weights load and reports their error
    by flag."""
    import sparsed_backend.cli as cli
    import sparsed_backend.sampling.arguments as arguments

    calls = []
    real = arguments.check_llada_arguments
    monkeypatch.setattr(arguments, "check_llada_arguments", lambda **kw: calls.append(kw) or real(**kw))
    monkeypatch.setattr(cli, "_load_weights", lambda *a, **kw: pytest.fail("the weights loaded before the check"))
    for extra, flag in [(["--gen-length", "6", "--block-length", "4"], "--gen-length"),
                        (["--gen-length", "4", "--block-length", "2", "--steps", "3"], "--steps")]:  # fmt: skip
        status, _, err = run_main(["generate", *QUICK, "--no-progress", *extra], capsys)
        assert_one_line_error(status, err, f"^sparsed generate: error: {flag} must be divisible by ")
    assert [(kw["gen_length"], kw["block_length"], kw["steps"]) for kw in calls] == [(6, 4, 2), (4, 2, 3)]


def test_generate_runs_a_block_diffusion_checkpoint_with_its_flags(tmp_path, monkeypatch, capsys):
    """A Qwen3 checkpoint with mask_token_id and block_size runs blockdiff_generate: the family's
    flags reach it (block length from the config unless given), sparse prefix selection with
    --attn sparsed, and the answer is one line on stdout."""
    import sparsed_backend.cli_blockdiff as cli_blockdiff

    write_blockdiff_checkpoint(tmp_path / "qwen3", block_size=4)
    calls = []
    real = cli_blockdiff.blockdiff_generate

    def spy(model, ids, **kw):
        calls.append((type(model).__name__, model.config._attn_implementation, kw))
        return real(model, ids, **kw)

    monkeypatch.setattr(cli_blockdiff, "blockdiff_generate", spy)
    argv = [a.format(qwen3=tmp_path / "qwen3") for a in BLOCKDIFF]
    assert main(["generate", *argv, "--no-progress"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    name, attn, kw = calls[-1]
    assert (name, attn, kw["block_length"], kw["denoising_steps"], kw["remasking"], kw["threshold"]) == (
        "Qwen3ForCausalLM", "sdpa", 4, 4, "low_confidence_static", None
    )  # fmt: skip
    assert kw["sparsed"] is None and kw["gen_length"] == 8
    extra = ["--attn", "sparsed", "--block-length", "2", "--denoising-steps", "1", "--threshold", "0.9",
             "--prefix-budget", "8", "--block-size", "4", "--select-every", "3", "--scorer", "separate",
             "--sparse-commit", "--no-progress"]  # fmt: skip
    assert main(["generate", *argv, *extra]) == 0
    name, attn, kw = calls[-1]
    assert (attn, kw["block_length"], kw["denoising_steps"], kw["remasking"], kw["threshold"]) == (
        "sparsed", 2, 1, "low_confidence_dynamic", 0.9
    )  # fmt: skip
    assert kw["sparsed"] == PrefixSparseConfig(select=None, budget=8, block_size=4, select_every=3, sparse_commit=True)
    assert main(["generate", *argv, "--attn", "sparsed", "--no-progress"]) == 0
    assert calls[-1][2]["sparsed"] == PrefixSparseConfig()  # select 0.3, its default


def test_generate_help_lists_the_block_diffusion_flags(capsys):
    from sparsed_backend.attention.prefix_selection import PREFIX_SCORERS
    from sparsed_backend.sampling.block_diffusion import BLOCKDIFF_REMASKING

    status, out, _ = run_main(["generate", "--help"], capsys)
    assert status == 0
    flags = ("--denoising-steps", "--remasking", "--prefix-budget", "--select", "--block-size", "--threshold",
             "--select-every", "--scorer", "--sparse-commit")  # fmt: skip
    for flag in flags:
        assert re.search(rf"^  {flag} ", out, re.M), flag
    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
    assert tuple(actions["remasking"].choices) == BLOCKDIFF_REMASKING  # the parser's copy of the sampler's rules
    assert tuple(actions["scorer"].choices) == PREFIX_SCORERS  # and of PrefixSparseConfig's scorers


def test_help_shows_defaults_and_version(capsys):
    status, out, _ = run_main(["demo", "--help"], capsys)
    assert status == 0
    assert re.search(r"--prompts PROMPTS\s+fresh prompts to answer \(default: 8\)", out)
    assert "(default: 2048)" in out and "--no-progress" in out
    status, out, _ = run_main(["bench", "--help"], capsys)
    assert status == 0 and "(default: 10)" in out and "8192 on CUDA, 1024 on CPU" in out
    status, out, _ = run_main(["--version"], capsys)
    assert status == 0 and out == f"sparsed {sparsed_backend.__version__}\n"


def _run_light(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` from the source tree in a fresh interpreter; it must succeed without having
    imported torch, transformers or sparsed_backend itself."""
    heavy = "('torch', 'transformers', 'sparsed_backend')"
    loaded = f"print(sorted(m for m in {heavy} if m in sys.modules), file=sys.stderr)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}{loaded}\n"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]"
    return proc


def test_help_and_version_do_not_import_torch():
    """Parsing --help / --version never loads torch, transformers or sparsed_backend itself."""
    proc = _run_light(
        "from sparsed_cli import main\n"
        "for argv in (['--help'], ['demo', '--help'], ['generate', '--help'], ['bench', '--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == 0, (argv, stop.code)\n"
    )
    assert "usage: sparsed" in proc.stdout


def test_version_without_package_metadata_reads_the_source_without_importing_torch():
    """A checkout run from source (PYTHONPATH=src, never pip-installed) has no metadata for the
    distribution; --version must still answer, from sparsed_backend/_version.py, torch-free."""
    proc = _run_light(
        "from importlib import metadata\n"
        "real_version = metadata.version\n"
        "def no_metadata(name):\n"  # only ours is missing; transformers checks its own dependencies
        "    if name == 'sparsed_backend':\n"
        "        raise metadata.PackageNotFoundError(name)\n"
        "    return real_version(name)\n"
        "metadata.version = no_metadata\n"
        "from sparsed_cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, stop.code\n"
    )
    assert proc.stdout == f"sparsed {sparsed_backend.__version__}\n"


def test_version_has_one_value_in_the_source_and_in_pyproject():
    project = (ROOT / "pyproject.toml").read_text().split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^version = "([^"]+)"$', project, re.M).group(1) == sparsed_backend.__version__
    assert sparsed_backend.__version__ == sparsed_backend._version.__version__


def test_console_script_is_the_light_parser():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^sparsed = "sparsed_cli:main"$', text, re.M)


def test_the_library_never_imports_the_cli_package():
    """sparsed_cli imports sparsed_backend (lazily, to run a command), never the reverse."""
    code = (
        "import sys\nimport sparsed_backend, sparsed_backend.cli, sparsed_backend.timing\n"
        "print('sparsed_cli' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
