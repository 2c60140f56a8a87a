"""train.dtype=auto: bf16 on CUDA, and on a CPU only where bf16 is measured faster at the run's shapes."""

from __future__ import annotations

import contextlib

import pytest
import torch

from moe_testbed import devices

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_probe_cache():
    devices.cpu_bf16_speedup.cache_clear()
    yield
    devices.cpu_bf16_speedup.cache_clear()


def test_explicit_dtypes_are_obeyed_whatever_the_cpu(monkeypatch):
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: [])
    assert devices.uses_bf16("bfloat16", CPU, (10, 8, 8))
    assert not devices.uses_bf16("float32", CPU, (10, 8, 8))
    assert devices.uses_bf16("auto", torch.device("cuda"))


def test_auto_without_native_bf16_is_fp32_and_times_nothing(monkeypatch):
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: [])
    monkeypatch.setattr(devices.time, "perf_counter", lambda: pytest.fail("timed a matmul on a CPU without bf16"))
    assert devices.cpu_bf16_speedup(4096, 128, 512) == 0.0
    assert not devices.uses_bf16("auto", CPU, (4096, 128, 512))
    assert devices.autocast_for(CPU, "auto", (4096, 128, 512)) is contextlib.nullcontext


def test_auto_without_a_shape_is_fp32_on_cpu():
    assert not devices.uses_bf16("auto", CPU)


@pytest.mark.parametrize("bf16_faster_by, picked", [(2.4, True), (1.1, False), (0.33, False)])
def test_auto_picks_bf16_only_past_the_measured_margin(monkeypatch, bf16_faster_by: float, picked: bool):
    """A fake clock: each timed fp32 matmul takes 1 s, each bf16 one 1/bf16_faster_by s."""
    monkeypatch.setattr(devices, "cpu_bf16_flags", lambda: ["amx_bf16"])
    clock = {"now": 0.0, "calls": 0}

    # median_time times fp32 first (7 repeats, 2 clock reads each), then bf16
    def fake_clock() -> float:
        clock["calls"] += 1
        step = 1.0 if clock["calls"] <= 14 else 1.0 / bf16_faster_by
        if clock["calls"] % 2 == 0:
            clock["now"] += step
        return clock["now"]

    monkeypatch.setattr(devices.time, "perf_counter", fake_clock)
    assert devices.cpu_bf16_speedup(683, 128, 256) == pytest.approx(bf16_faster_by)
    assert devices.uses_bf16("auto", CPU, (683, 128, 256)) is picked  # cached: the clock is not read again


def test_flags_come_from_cpuinfo(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    monkeypatch.setattr(devices, "Path", lambda _: info)
    assert devices.cpu_bf16_flags() == ["avx512_bf16"]
    info.write_text("flags\t\t: fpu sse avx2\n")
    assert devices.cpu_bf16_flags() == []
