"""Shared fixtures: real photos; the suite refuses to start without the Fashion-MNIST package."""
from __future__ import annotations

import numpy as np
import pytest

from support import FASHION_MNIST


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """scikit-image's bundled RGB photos (uint8 HxWx3)."""
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(), "rocket": data.rocket()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not FASHION_MNIST.is_dir():
        raise pytest.UsageError(
            f"{FASHION_MNIST} is missing: install Debian's dataset-fashion-mnist (scripts/setup.sh does this)"
        )
