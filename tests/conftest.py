import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

# 'ci': derandomised so CI is reproducible; 'dev': fresh examples each run.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
# 'gpu': a lent machine's minutes are scarce: fewer examples and no shrinking (a failure is
# reported as drawn, with its blob to replay).
settings.register_profile(
    "gpu",
    deadline=None,
    derandomize=True,
    max_examples=30,
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Tests run on CUDA when SPARSED_TEST_DEVICE=cuda (the H100 run), else CPU."""
    return torch.device(os.environ.get("SPARSED_TEST_DEVICE", "cpu"))
