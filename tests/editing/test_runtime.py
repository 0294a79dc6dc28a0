"""The runtime: device, dtypes and threads chosen per machine, validated, and applied."""

from __future__ import annotations

import os

import pytest
import torch

from editing.runtime import Runtime, available_cpus
from flows.settings import RunSettings


def test_defaults_follow_the_machine():
    runtime = Runtime()
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.torch_device.type == expected_device
    assert runtime.model_dtype == (torch.bfloat16 if expected_device == "cuda" else torch.float32)
    assert runtime.solve_torch_dtype == torch.float64
    assert Runtime(device="cpu").autocast_dtype is None  # no autocast on the CPU
    assert Runtime(device="cpu", dtype="bfloat16").model_dtype == torch.bfloat16


def test_threads_default_to_the_cpus_this_process_may_use():
    before = torch.get_num_threads()
    try:
        assert Runtime().apply_threads() == available_cpus() == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == available_cpus()
        assert Runtime(threads=1).apply_threads() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("field, value, message", [("dtype", "int8", "runtime.dtype"),
                                                   ("solve_dtype", "bfloat16", "runtime.solve_dtype"),
                                                   ("threads", 0, "runtime.threads")])
def test_bad_runtime_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        Runtime(**{field: value})


def test_run_settings_carry_the_runtime_through_json():
    settings = RunSettings(runtime=Runtime(device="cpu", dtype="float32", threads=2))
    again = RunSettings.from_dict(settings.to_dict())
    assert again.runtime == settings.runtime
    assert RunSettings.from_dict({"runtime": {"solve_dtype": "float32"}}).runtime.solve_dtype == "float32"
