import pytest
import torch

from sanitizer import device
from sanitizer.errors import UsageError


@pytest.mark.parametrize(("bf16_hardware", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_autocast_is_bf16_only_on_bf16_hardware(monkeypatch, bf16_hardware, dtype):
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: bf16_hardware)
    cpu = torch.device("cpu")
    with device.autocast(cpu):
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == dtype
    assert device.precision(cpu) == ("bf16" if bf16_hardware else "fp32")


def test_an_unknown_or_missing_device_is_a_usage_error():
    with pytest.raises(UsageError, match="must be auto, cpu or cuda, not 'tpu'"):
        device.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device is visible"):
            device.resolve_device("cuda")
