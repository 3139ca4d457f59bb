import math

import pytest
import torch
from torch import nn

from detectors.signals import LayerTap, channel_means, default_layers, logit_margin


def test_logit_margin_closed_form_and_saturation():
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [1000.0, 0.0, 0.0]])
    m = logit_margin(z)
    assert m.dtype == torch.float64
    assert m[0].item() == pytest.approx(2.0 - math.log(2.0), abs=1e-12)
    assert m[1].item() == pytest.approx(3.0 - math.log(1.0 + math.exp(1.0)), abs=1e-12)
    # p_max rounds to 1 here, the margin keeps ranking: log(p / (1 - p)) = 1000 - log 2
    assert m[2].item() == pytest.approx(1000.0 - math.log(2.0), abs=1e-9)
    p = torch.softmax(z[:2].double(), dim=1).amax(dim=1)
    torch.testing.assert_close(m[:2], torch.log(p / (1 - p)), atol=1e-12, rtol=0)


def test_logit_margin_rejects_non_logits():
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        logit_margin(torch.zeros(3))


def test_channel_means_any_rank():
    x4 = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert channel_means(x4).tolist() == [[1.5, 5.5, 9.5], [13.5, 17.5, 21.5]]
    x3 = torch.tensor([[[1.0, 3.0], [2.0, 6.0]]])  # series [B, C, T]
    assert channel_means(x3).tolist() == [[2.0, 4.0]]
    x2 = torch.tensor([[1.0, -2.0]])
    assert channel_means(x2).tolist() == [[1.0, -2.0]]
    assert channel_means(x2).dtype == torch.float64


class _Series(nn.Module):
    """[B, 2, 4] series -> conv -> mean -> linear logits (3 classes)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean(dim=2))


def test_layer_tap_records_channel_means_of_named_layers():
    torch.manual_seed(0)
    model = _Series().eval()
    x = torch.randn(5, 2, 4)
    with LayerTap(model, ["conv", "act"]) as tap:
        model(x)
    feats = tap.features(5)
    with torch.no_grad():
        conv = model.conv(x)
    torch.testing.assert_close(feats["conv"], conv.mean(dim=2).double())
    torch.testing.assert_close(feats["act"], torch.relu(conv).mean(dim=2).double())
    # the hooks are gone after the block
    assert not model.conv._forward_hooks and not model.act._forward_hooks


def test_layer_tap_keeps_the_first_rows_and_refuses_unknown_layers():
    model = _Series().eval()
    with LayerTap(model, ["act"]) as tap:
        model(torch.randn(6, 2, 4))
    assert tap.features(2)["act"].shape == (2, 4)
    with pytest.raises(ValueError, match="not submodules"):
        LayerTap(model, ["nope"])


def test_default_layers_leave_out_the_logit_head_wherever_it_is_declared():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)  # declared first, called last
            self.body = nn.Linear(2, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.head(self.act(self.body(x)))

    assert default_layers(HeadFirst(), torch.zeros(1, 2)) == ["body", "act"]
    assert default_layers(_Series(), torch.zeros(1, 2, 4)) == ["conv", "act"]
