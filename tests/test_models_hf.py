"""Hugging Face models as they come (tiny configs, random weights, no downloads): ModelOutput,
padding attention masks, ignore_index labels, dropout in train mode. Oracle: dense float64
torch.func of the same model in eval mode (dropout off), GGN of the same torch loss module."""

from __future__ import annotations

import warnings

import pytest
import torch
from loss_oracles import ggn_oracle
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ngtriton import FisherOperator, natural_gradient

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

F64 = torch.float64


def operator(*args, **kwargs):
    with warnings.catch_warnings():  # fx cannot trace them; the ATen capture must
        warnings.filterwarnings("error", ".*falling back to whole-model autograd")
        return FisherOperator(*args, **kwargs)


def check(model, inputs, loss, targets, select, flat=False, probes=3):
    """Two builds in train mode agree with each other and with the eval-mode oracle."""
    model.train()
    ops = [operator(model, inputs, loss=loss, targets=targets) for _ in range(2)]
    model.eval()

    def loss_of_z(z):
        return loss(z.reshape(-1, z.shape[-1]) if flat else z, targets)

    with sdpa_kernel([SDPBackend.MATH]):  # vmap batches its backward (the fused one loops)
        G, g, value = ggn_oracle(model, inputs, loss_of_z, select)
    model.train()
    V = torch.randn(G.shape[0], probes, dtype=F64, generator=torch.Generator().manual_seed(0))
    got = [torch.stack([op @ v for v in V.unbind(1)], 1) for op in ops]
    torch.testing.assert_close(got[0], got[1], rtol=0, atol=0)
    torch.testing.assert_close(got[0], G @ V, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ops[0].gradient(), g, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ops[0].loss(), value, rtol=1e-10, atol=0)
    return ops[0]


def test_gpt2_lm_with_padding_and_ignore_index():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)  # dropouts 0.1 by default
    model = transformers.GPT2LMHeadModel(cfg).to(F64)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0  # right padding
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)  # next token; last: none
    labels[mask == 0] = -100
    loss = nn.CrossEntropyLoss()  # the closure's loss(logits.view(-1, V), labels.view(-1))
    op = check(model, (ids, None, mask), loss, labels.reshape(-1), lambda o: o.logits,
               flat=True)
    assert op.num_examples == int((labels != -100).sum())


def test_bert_classification_with_padding_mask():
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=13, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=12,
                                  max_position_embeddings=8, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).to(F64)
    ids = torch.randint(1, 13, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    y = torch.tensor([0, 2, 1])
    for loss in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum",
                                                            label_smoothing=0.1)):
        check(model, (ids, mask), loss, y, lambda o: o.logits)


def test_natural_gradient_and_an_output_selector_on_a_model_output():
    torch.manual_seed(2)
    cfg = transformers.BertConfig(vocab_size=13, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=12,
                                  max_position_embeddings=8, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg).to(F64).train()
    ids, y = torch.randint(1, 13, (4, 5)), torch.tensor([0, 1, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = natural_gradient(model, ids, y, loss=nn.CrossEntropyLoss(), damping=1e-3)
        b = natural_gradient(model, ids, y, loss=nn.CrossEntropyLoss(), damping=1e-3,
                             output=lambda o: o["logits"])
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t, rtol=0, atol=0)
