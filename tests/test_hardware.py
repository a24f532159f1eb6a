"""Hardware facts the tile rules and the kernel benchmark read."""

from __future__ import annotations

from types import SimpleNamespace

from cotune import hardware


def test_shared_memory_comes_from_the_device_properties():
    assert hardware.device_shared_memory(SimpleNamespace(shared_memory_per_block_optin=232448), 0) == 232448


def test_shared_memory_of_a_fingerprint_is_the_smallest_gpus_and_none_on_cpu():
    fp = {"hardware": {"gpus": [{"shared_memory_bytes": 232448}, {"shared_memory_bytes": 101376}]}}
    assert hardware.shared_memory_bytes(fp, "cuda") == 101376
    assert hardware.shared_memory_bytes(fp, "cpu") is None
    assert hardware.shared_memory_bytes({"hardware": {"gpus": [{"name": "old probe"}]}}, "cuda") is None


def test_datasheet_bandwidth_by_the_longest_matching_name():
    assert hardware.datasheet_bandwidth("NVIDIA H100 PCIe") == (2.0e12, "datasheet: H100 PCIe")
    assert hardware.datasheet_bandwidth("NVIDIA H200") == (4.8e12, "datasheet: H200")
    assert hardware.datasheet_bandwidth("Some CPU") is None
