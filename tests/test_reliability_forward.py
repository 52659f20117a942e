"""The forward pass under hostile arguments (residual inputs, hooks): a clear error, nothing changed."""

import pytest
import torch

from _reliability import tiny_llama


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64])
def test_a_residual_of_another_dtype_is_refused_by_name(dtype):
    """It failed deep inside the first block with a bare matmul dtype error."""
    model = tiny_llama()
    resid = torch.randn(2, 3, model.cfg.d_model).to(dtype)
    with pytest.raises(ValueError, match=rf"the residual must have the model's dtype torch.float32, got {dtype}"):
        model(resid, start_at_layer=1)
    assert model.n_hooks() == 0
    torch.testing.assert_close(model(resid.float(), start_at_layer=1),
                               model.run_with_hooks(resid.float(), start_at_layer=1))
