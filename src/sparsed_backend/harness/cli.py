"""``sparsed-eval``: lm-eval's command line with the ``sparsed-dlm`` model and our tasks.

    sparsed-eval --model sparsed-dlm --model_args pretrained=PATH,attn=sparsed --tasks sparsed_retrieval

Every lm-eval option works as with ``lm-eval`` (``run``, ``ls``, ``validate``; ``--model hf``
too). Unless ``--include_path`` is given, the package's task directory (the retrieval task) is
added to the command, so ``--tasks sparsed_retrieval`` resolves offline (lm-eval 0.4.13 takes a
single include path: with your own, ours is left out and a note says so).
"""

from __future__ import annotations

import sys

from . import tasks_dir


def _with_tasks(argv: list[str]) -> list[str]:
    """``argv`` (without the program name) plus ``--include_path <our tasks>`` where it applies."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        print(
            "sparsed-eval: --include_path given, so the package's tasks (sparsed_retrieval) are not added; "
            f"they live in {tasks_dir()}",
            file=sys.stderr,
        )
        return argv
    if not argv or argv[0] in ("-h", "--help"):
        return argv
    return [*argv, "--include_path", str(tasks_dir())]


def main(argv: list[str] | None = None) -> None:
    """Register ``sparsed-dlm`` (after lm-eval's own models) and run lm-eval's CLI."""
    from lm_eval.__main__ import cli_evaluate

    from .model import ModelArgError  # imports lm_eval.models, then registers sparsed-dlm

    args = sys.argv[1:] if argv is None else argv
    # lm-eval's parser reads sys.argv itself.
    sys.argv = [sys.argv[0] if sys.argv else "sparsed-eval", *_with_tasks(list(args))]
    try:
        cli_evaluate()
    except ModelArgError as err:  # a user error in --model_args: one line, no traceback
        print(f"sparsed-eval: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
