"""The golden inputs are re-drawn from seeds (tests/golden/torch_randn.py): check that generator."""
import numpy as np
import pytest

from tests.conftest import golden_cases
from tests.golden.torch_randn import TorchCPUGenerator


@pytest.mark.parametrize("case", golden_cases())
def test_golden_inputs_are_redrawn_exactly(case, load_golden):
    # load_golden re-draws q, k, v and dout and raises unless each matches its pinned sha256.
    gold = load_golden(case)
    assert gold["q"].shape[:-2] == gold["out"].shape[:-2] and gold["q"].dtype == np.float32


@pytest.mark.parametrize("shapes", [[(16,)], [(3, 7)] * 3, [(1, 300, 4, 32), (5, 5), (17,)],
                                    [(2, 517, 2, 64)]])
def test_generator_equals_pytorch(shapes):
    torch = pytest.importorskip("torch", reason="PyTorch is the reference for this generator")
    torch.manual_seed(1234)
    generator = TorchCPUGenerator(1234)
    for shape in shapes:
        expected = torch.randn(*shape, dtype=torch.float64).numpy()
        np.testing.assert_array_equal(generator.randn(*shape), expected)


def test_generator_refuses_what_it_does_not_reproduce():
    with pytest.raises(ValueError, match="fewer than 16"):
        TorchCPUGenerator(0).randn(3, 5)
