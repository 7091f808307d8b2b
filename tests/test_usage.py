"""What an actor reports of its use: the denoiser's FLOPs for the MFU, and its memory."""

import torch

from actors.usage import PEAK_BF16_FLOPS, FlopMeter, memory_bytes, peak_flops


def test_flops_are_counted_once_per_shape_and_a_training_forward_counts_twice():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    meter = FlopMeter(model)
    x = torch.randn(3, 8)
    per_call = 2 * 3 * (8 * 16 + 16 * 4)  # a multiply and an add per weight and row
    with torch.no_grad():
        model(x)
        assert meter.total == per_call and len(meter.per_shape) == 1
        model(x)  # the same shape: added from the count, not counted again
        assert meter.total == 2 * per_call and len(meter.per_shape) == 1
        model(torch.randn(5, 8))
    assert meter.total == 2 * per_call + 5 / 3 * per_call and len(meter.per_shape) == 2
    model(x).sum().backward()  # with gradients: the forward and the backward to the inputs
    assert meter.total == 4 * per_call + 5 / 3 * per_call


def test_a_forward_that_raises_stops_the_count_it_began():
    model = torch.nn.Linear(8, 4)
    meter = FlopMeter(model)
    try:
        model(torch.randn(2, 7))
    except RuntimeError:
        pass
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert meter.total == 2 * 2 * 8 * 4


def test_no_mfu_peak_on_a_cpu_and_the_memory_is_this_process():
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert list(PEAK_BF16_FLOPS)[:2] == ["H100 PCIe", "H100"]  # the more specific name first
    usage = memory_bytes()
    assert usage["rss_bytes"] > 50 * 2**20 and usage["gpu_bytes"] == usage["gpu_peak_bytes"] == 0
