"""Shared benchmark plumbing: failure-recording timing, environment stamp, result files.

How times and memory are measured lives in `sparsed_backend.timing`, which says which method
each results file uses.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch

from sparsed_backend.timing import kernel_ms

RESULTS = Path(__file__).resolve().parent / "results"


def bench(fn, device: torch.device, warmup_ms: float = 50, rep_ms: float = 300) -> tuple[float, str | None]:
    """(`sparsed_backend.timing.kernel_ms` of ``fn``, None). A configuration that raises gives
    (NaN, "ErrorType: first line"), for the results table to record why."""
    try:
        return kernel_ms(fn, device, warmup_ms, rep_ms), None
    except Exception as err:  # a failing config is recorded with its error and the run goes on
        failure = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        print(f"    ! {failure}", file=sys.stderr)
        return math.nan, failure


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "command": " ".join(sys.argv),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    return env


def write_results(name: str, env: dict, rows: list[dict], table: str, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    (out_dir / f"{name}.md").write_text(f"# {name}\n\n{header}\n\n{table}\n")
    return out_dir


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def add_shipped_model_arguments(p, *, name: str, seed: int, cuda: bool) -> None:
    """The flags every fidelity benchmark on the shipped model shares: model, dtype, prompt seed,
    output name and directory, re-rendering a saved run, and the progress bar."""
    p.add_argument(
        "--model", default=None, help="model directory (default: the shipped one; --keys > 1: the multi-key one)"
    )
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--seed", type=int, default=seed, help="prompts of length n use seed + n")
    p.add_argument("--name", default=name if cuda else f"{name}_cpu_smoke")
    p.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    p.add_argument("--render", default=None, help="only re-render the tables and plot of this results JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (also SPARSED_NO_PROGRESS=1)")


def load_shipped_model(args, device: torch.device):
    """(model directory, the model in eval mode on ``device``) with the "sparsed" attention."""
    from transformers import AutoModel

    from sparsed_backend.demo import model_path

    path = args.model or model_path(getattr(args, "keys", 1))  # --keys > 1: the multi-key fine-tune
    model = AutoModel.from_pretrained(path, attn_implementation="sparsed", dtype=getattr(torch, args.dtype))
    return path, model.to(device).eval()


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (saying so) when matplotlib is
    not installed: the tables are written either way."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    return plt
