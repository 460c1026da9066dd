import os
import sys
from pathlib import Path

# Qt must never try to reach a display in tests (CI has none).
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see quantscope/__init__.py
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL = SHARED / "fixtures" / "real"


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    if not REAL.is_dir():
        pytest.skip("../shared/fixtures/real is not beside the checkout")
    return REAL


@pytest.fixture(params=["compiled", "numpy"])
def kernel_path(request, monkeypatch):
    """Run a decoder test through the numba kernels and through the vectorised numpy fallback."""
    from quantscope.backend.formats import fast
    if request.param == "numpy":
        monkeypatch.setattr(fast, "AVAILABLE", False)
    elif not fast.AVAILABLE:
        pytest.skip("numba is not installed")
    return request.param
