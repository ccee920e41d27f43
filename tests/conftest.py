import pytest
import torch

from tests.helpers import TinyCNN


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture
def probe() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 3, (40,), generator=g)
