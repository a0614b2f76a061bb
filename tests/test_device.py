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


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "units"),
    [(True, True, "AMX"), (False, True, "AVX512-BF16"), (False, False, None)],
)
def test_bf16_units_name_the_cpus_bf16_kernels_amx_first(monkeypatch, amx, avx512_bf16, units):
    """A CPU with AMX has AVX512-BF16 too; oneDNN's bf16 kernels use AMX there (session 41: results
    differ between the two). No unit: no bf16 hardware, so fp32."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    device.bf16_units.cache_clear()
    try:
        assert device.bf16_units() == units
        assert device.cpu_has_bf16() == (units is not None)
    finally:
        device.bf16_units.cache_clear()
