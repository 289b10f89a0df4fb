"""What `import sparsed_backend` registers with transformers, and the opt-out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

import sparsed_backend
from sparsed_backend.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM

SRC = Path(__file__).resolve().parent.parent / "src"
PROBE = (
    "import sparsed_backend\n"
    "from transformers import AttentionInterface\n"
    "from transformers.masking_utils import AttentionMaskInterface\n"
    "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
    "print('sparsed' in AttentionInterface._global_mapping, 'sparsed' in AttentionMaskInterface._global_mapping,\n"
    "      'llada' in CONFIG_MAPPING, 'Dream' in CONFIG_MAPPING)\n"
    "from sparsed_backend.demo import model_path\n"
    "from sparsed_backend.models import LLaDAModelLM, register_models\n"
    "model = LLaDAModelLM.from_pretrained(model_path(), attn_implementation='sparsed')\n"
    "print(type(model).__name__, model.config._attn_implementation)\n"
    "register_models()\n"
    "print('llada' in CONFIG_MAPPING, 'Dream' in CONFIG_MAPPING)\n"
)


def test_import_registers_the_attention_and_both_models():
    assert AttentionInterface._global_mapping["sparsed"] is sparsed_backend.sparsed_attention_forward
    assert AttentionMaskInterface._global_mapping["sparsed"] is sparsed_backend.sparsed_mask
    assert CONFIG_MAPPING["llada"] is LLaDAConfig and CONFIG_MAPPING["Dream"] is DreamConfig
    for mapping in (MODEL_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING):
        assert mapping[LLaDAConfig] is LLaDAModelLM and mapping[DreamConfig] is DreamModel


def test_opt_out_keeps_the_attention_and_leaves_the_auto_classes_alone():
    """SPARSED_REGISTER_MODELS=0: "sparsed" is registered, LLaDA/Dream are not (until asked), and
    the ports still load explicitly, as the README says."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "SPARSED_REGISTER_MODELS": "0"}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["True True False False", "LLaDAModelLM sparsed", "True True"]
