"""LiveTensorBytes counts exactly the bytes of live tensor storages (views once, frees, resizes)."""
from __future__ import annotations

import torch

from megasora.train.memory_probe import LiveTensorBytes


def test_counts_storages_views_and_frees_exactly():
    probe = LiveTensorBytes()
    with probe:
        a = torch.randn(1000)                        # 4000 B
        b = a * 2                                    # + 4000
        view = b[10:].view(-1, 10)                   # a view: no new storage
        del a                                        # - 4000
        c = torch.empty(500, dtype=torch.float64)    # + 4000
        assert probe.mark("first") == 8000 and probe.current_bytes == 8000
        c.resize_(1000).add_(1)                      # the in-place output shows the new size: + 4000
    assert probe.current_bytes == 12000 and probe.peak_bytes == 12000 and probe.marks == {"first": 8000}
    del b
    assert probe.current_bytes == 12000              # `view` keeps b's storage alive
    del view, c
    assert probe.current_bytes == 0


def test_tracks_preexisting_tensors_and_autograd_saved_activations():
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    probe = LiveTensorBytes(device="cpu")
    probe.track([linear.weight, linear.bias, x])
    static = (64 * 32 + 32 + 8 * 64) * 4
    assert probe.current_bytes == static
    with probe:
        y = torch.nn.functional.gelu(linear(x))      # keeps the linear output (gelu's input) and y
        assert probe.current_bytes == static + 2 * 8 * 32 * 4
        y.sum().backward()                            # grads of weight, bias, x are new storages
    del y                                             # frees y and (with the graph) the saved input
    assert probe.current_bytes == 2 * static
    assert probe.peak_bytes >= 2 * static
