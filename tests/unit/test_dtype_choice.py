"""``--dtype auto`` on a CPU and the codec's dtype: decided from the capability string and CPU flags alone."""

from __future__ import annotations

import pytest

from csmserve.engine.loading import choose_cpu_dtype, cpu_bf16_native, cpu_features, keep_codec_float32

AVX512_BF16 = {"avx2", "avx512_f", "avx512_bw", "avx512_bf16"}
SAPPHIRE_RAPIDS = {"avx2", "avx512_f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
SKYLAKE_X = {"avx2", "avx512_f", "avx512_bw", "avx512_vnni"}
HASWELL = {"avx2", "fma3"}


@pytest.mark.parametrize(
    ("capability", "flags", "dtype"),
    [
        ("AVX512", AVX512_BF16, "bfloat16"),  # AMD Zen 4, Intel Cooper Lake
        ("AVX512", SAPPHIRE_RAPIDS, "bfloat16"),  # AMX
        ("AVX512", SKYLAKE_X, "float32"),  # AVX-512 without BF16: emulated
        ("AVX2", HASWELL, "float32"),
        ("AVX2", AVX512_BF16, "float32"),  # ATEN_CPU_CAPABILITY=avx2 on a bf16 CPU: ATen's kernels emulate
        ("DEFAULT", set(), "float32"),
        ("SVE256", {"bf16"}, "float32"),
    ],
)
def test_auto_picks_bfloat16_only_where_the_cpu_runs_it_natively(capability, flags, dtype):
    """bfloat16 needs AVX-512 kernels and AVX512_BF16 or AMX; everything else gets float32."""
    choice = choose_cpu_dtype(capability, flags)
    assert choice.dtype == dtype
    assert cpu_bf16_native(capability, flags) is (dtype == "bfloat16")


def test_the_reason_names_what_was_found():
    """The start-up log can say why: the capability and the bf16 feature, or that bf16 would be emulated."""
    native = choose_cpu_dtype("AVX512", SAPPHIRE_RAPIDS).reason
    assert "AVX512" in native and "avx512_bf16" in native and "amx_bf16" in native
    emulated = choose_cpu_dtype("AVX2", HASWELL).reason
    assert "AVX2" in emulated and "emulated" in emulated


@pytest.mark.parametrize(
    ("device", "dtype", "native", "float32_codec"),
    [
        ("cpu", "bfloat16", False, True),  # reference kernels: 2-3x float32's time per frame
        ("cpu", "bfloat16", True, False),  # native kernels: the codec stays bfloat16
        ("cpu", "float16", True, True),  # no CPU here runs float16 natively
        ("cpu", "float32", False, False),
        ("cuda", "bfloat16", False, False),
        ("cuda", "float16", False, False),
    ],
)
def test_codec_stays_float32_on_a_cpu_exactly_when_bf16_is_not_native(device, dtype, native, float32_codec):
    """The codec rule applies the same test as --dtype auto."""
    assert keep_codec_float32(device, dtype, native) is float32_codec


def test_this_machine_reports_a_capability_and_flags():
    """cpu_features reads torch's capability string and a non-empty set of CPU flags on x86."""
    capability, flags = cpu_features()
    assert capability in {"DEFAULT", "NO AVX", "AVX2", "AVX512", "VSX", "Z VECTOR", "SVE256"}
    assert capability == "DEFAULT" or flags
