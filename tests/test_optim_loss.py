"""NGD(model, loss=...): the step is the damped natural step of exactly the closure's loss,
against a dense float64 GGN of that loss (torch.func.hessian in the outputs, jacrev for J)."""

from __future__ import annotations

import pytest
import torch
from loss_oracles import ggn_oracle
from torch import nn

from ngtriton.optim import NGD


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class TinyLM(nn.Module):
    """Tokens (B, T) → logits (B·T, V), as language models flatten them for the loss."""

    def __init__(self, vocab: int = 5, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(idx))).reshape(-1, self.head.out_features)


def _step_and_oracle(model, x, y, loss, lam=0.3, **kw):
    H, g, _ = ggn_oracle(model, (x,), lambda z: loss(z, y))
    expected = flat(model) - torch.linalg.solve(H + lam * torch.eye(len(g), dtype=H.dtype), g)
    opt = NGD(model, loss=loss, damping=lam, adaptive_damping=False, reject_steps=False,
              method="cg", tol=1e-13, maxiter=500, **kw)

    def closure():
        opt.zero_grad()
        value = loss(model(x), y)
        value.backward()
        return value
    opt.step(closure)
    return expected, opt


@pytest.mark.parametrize("loss", [
    nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum"),
    nn.CrossEntropyLoss(ignore_index=2), nn.CrossEntropyLoss(label_smoothing=0.1)],
    ids=["mean", "sum", "ignore_index", "label_smoothing"])
def test_sequence_cross_entropy_step_matches_the_dense_ggn(loss):
    torch.manual_seed(0)
    model = TinyLM().double()
    x = torch.randint(0, 5, (3, 4))
    y = torch.randint(0, 5, (12,))
    expected, _ = _step_and_oracle(model, x, y, loss)
    torch.testing.assert_close(flat(model), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("loss", [nn.MSELoss(), nn.MSELoss(reduction="sum"),
                                  nn.BCEWithLogitsLoss(), nn.BCEWithLogitsLoss(reduction="sum")],
                         ids=["mse-mean", "mse-sum", "bce-mean", "bce-sum"])
def test_elementwise_losses_step_matches_the_dense_ggn(loss):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.rand(6, 2, dtype=torch.float64)
    expected, _ = _step_and_oracle(model, x, y, loss)
    torch.testing.assert_close(flat(model), expected, rtol=1e-8, atol=1e-10)


def test_the_subsample_keeps_targets_aligned_with_sequence_rows():
    """curvature_fraction on (B·T, V) logits with (B·T,) targets: whole sequences are drawn,
    targets and inputs alike, so the operator's loss is the loss of those sequences."""
    torch.manual_seed(2)
    model = TinyLM().double()
    x = torch.randint(0, 5, (8, 3))
    y = torch.randint(0, 5, (24,))
    loss = nn.CrossEntropyLoss()
    opt = NGD(model, loss=loss, curvature_fraction=0.5, reject_steps=False)
    opt._batch_rows = 24
    (sub,), _, sub_y = opt._curvature_inputs((x,), {}, y)
    assert sub.shape == (4, 3) and sub_y.shape == (12,)
    rows = [int(torch.nonzero((x == r).all(1))[0]) for r in sub]
    torch.testing.assert_close(sub_y, y.reshape(8, 3)[rows].reshape(-1))


def test_loss_arguments_are_checked():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="loss"):
        NGD(model, loss=nn.CrossEntropyLoss(), likelihood="gaussian")
    with pytest.raises(ValueError, match="loss"):
        NGD(model, loss=nn.CrossEntropyLoss(weight=torch.ones(2)))
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    loss = nn.CrossEntropyLoss()
    opt = NGD(model, loss=loss)

    def shifted():  # the loss does not read the model's output as it is
        opt.zero_grad()
        value = loss(model(x)[:, [1, 0]], y)
        value.backward()
        return value
    before = flat(model)
    with pytest.raises(ValueError, match="loss: its input is not the model's output"):
        opt.step(shifted)

    def twice():
        opt.zero_grad()
        value = loss(model(x), y) + loss(model(x), y)
        value.backward()
        return value
    with pytest.raises(ValueError, match="loss: the closure called it 2 times"):
        opt.step(twice)
    assert torch.equal(flat(model), before) and opt.steps == 0
    assert not model._forward_hooks and not loss._forward_pre_hooks


def test_ngd_on_a_hugging_face_gpt2_with_padding():
    """GPT-2 from a tiny config (random weights): NGD with loss= on its ModelOutput's logits,
    padding rows ignored, dropout on; one step equals the dense natural step of the same loss
    with dropout off, and the training loss falls over a few steps."""
    import warnings

    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    ids = torch.randint(0, 11, (3, 5))
    labels = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], 1)
    labels[2, 3:] = -100
    loss = nn.CrossEntropyLoss()
    model.eval()
    with sdpa_kernel([SDPBackend.MATH]):
        H, g, _ = ggn_oracle(model, (ids,), lambda z: loss(z.reshape(-1, 11), labels.reshape(-1)),
                             lambda o: o.logits)
    expected = flat(model) - torch.linalg.solve(H + 0.5 * torch.eye(len(g), dtype=H.dtype), g)
    model.train()
    opt = NGD(model, loss=loss, damping=0.5, adaptive_damping=False, reject_steps=False,
              method="cg", tol=1e-12, maxiter=1000)

    def closure():
        opt.zero_grad()
        model.eval()  # the gradient without dropout, as the oracle's; the Fisher drops it anyway
        value = loss(model(ids).logits.view(-1, 11), labels.view(-1))
        model.train()
        value.backward()
        return value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fx cannot trace GPT-2: the fallback's
        opt.step(closure)
    torch.testing.assert_close(flat(model), expected, rtol=1e-7, atol=1e-9)
