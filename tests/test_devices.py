"""Device names: what the CLI's --device accepts, and the errors for the rest."""

import pytest
import torch

from medflowad.devices import resolve_device


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(("name", "message"), [("tpu", "unknown device 'tpu'"),
                                               ("meta", "device 'meta' is not supported")])
def test_unknown_or_unsupported_devices_are_named(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(ValueError, match="torch finds no CUDA GPU"):
        resolve_device("cuda")
