"""One Fisher product on real architectures, against a training step, in one run per model.

Models, all in train mode (dropout in the model, off in every linearization): torchvision's
ResNet-18 layout (``benchmarks/zoo.py``; 32×32 images, batch 32, batch statistics), a
nanoGPT-style LM (4 layers, d 128, 4 heads, 16×64 tokens), Hugging Face GPT-2 and ViT at the
same width (random weights, small configs) and torch.nn's ``TransformerEncoder``. Per model, one
group:

(a) a training step: forward + cross-entropy + backward (the baseline);
(b) one engine product ``vjp(jvp(v))`` on a built linearization (goal ≤ 1.5× (a));
(c) ``torch.func`` jvp + vjp without caching (two forwards per product; the math attention
    backend and no running-statistics update, which its forward mode needs);
(d) the autograd backend's product (whole-model double backward);
(e) building the linearization, and (f) building it from the record of the step's forward
    (what NGD does; goal ≤ 0.3× (a) on attention models).

Ratios as in ``bench_engine_cpu.py`` (``ratio_to_train_step``, ``ratio_interleaved``); on the
CPU the interleaved ratio is taken in process CPU time. Run: ``pytest benchmarks/bench_models.py``
(a few minutes on 2 cores); on a shared machine add ``--benchmark-timer=time.process_time``.
"""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel
from zoo import NanoGPT, ResNet18  # benchmarks/ is on the path under pytest

from ngtriton.linearize import ForwardRecord, linearize
from ngtriton.linearize.autograd import AutogradLinearization

ROUNDS = 10
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKEND = "triton" if DEVICE.type == "cuda" else "torch"
_MEDIANS: dict[tuple[str, str], float] = {}


class _Logits(nn.Module):
    """A Hugging Face model's logits (the model's own ``ModelOutput`` otherwise)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def _hugging_face(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    if name.startswith("hf-gpt2"):
        cfg = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=65,
                                      n_positions=64, bos_token_id=0, eos_token_id=0)
        return _Logits(transformers.GPT2LMHeadModel(cfg))
    cfg = transformers.ViTConfig(num_hidden_layers=4, hidden_size=128, num_attention_heads=4,
                                 intermediate_size=512, image_size=32, patch_size=4,
                                 num_labels=10)
    return _Logits(transformers.ViTForImageClassification(cfg))


class _Encoder(nn.Module):
    """torch.nn's own transformer: ``nn.TransformerEncoder`` (pre-norm) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(128, 4, 512, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _problem(name: str):
    torch.manual_seed(0)
    tokens = torch.randint(0, 65, (16, 64)), torch.randint(0, 65, (16, 64))
    images = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    if name.startswith("resnet18"):
        model, (x, y) = ResNet18(), images
    elif name.startswith("nanogpt"):
        model, (x, y) = NanoGPT(), tokens
    elif name.startswith("hf-gpt2"):
        model, (x, y) = _hugging_face(name), tokens
    elif name.startswith("hf-vit"):
        model, (x, y) = _hugging_face(name), images
    else:
        model, x, y = _Encoder(), torch.randn(16, 64, 128), torch.randint(0, 10, (16, 64))
    model, x, y = model.train().to(DEVICE), x.to(DEVICE), y.to(DEVICE)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()

    return model, x, step


MODELS = ["resnet18-32px-b32", "nanogpt-4x128-16x64", "hf-gpt2-4x128-16x64",
          "hf-vit-4x128-32px-b32", "torch-encoder-4x128-16x64"]


@pytest.fixture(scope="module", params=MODELS)
def problem(request):
    return request.param, *_problem(request.param)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _clock() -> float:
    """Wall time on CUDA; on the CPU this process's CPU time, which other processes on a shared
    machine do not inflate."""
    return time.perf_counter() if DEVICE.type == "cuda" else time.process_time()


def _interleaved_ratio(fn, ref, pairs: int = 6) -> float:
    ratios = []
    for _ in range(pairs):
        t0 = _clock()
        fn()
        _sync()
        t1 = _clock()
        ref()
        _sync()
        t2 = _clock()
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


def _bench(benchmark, group: str, name: str, fn, ref, **info):
    benchmark.group = group
    benchmark.extra_info.update(info)

    def timed():
        fn()
        _sync()

    for _ in range(2):
        timed()
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    _MEDIANS[(group, name)] = median
    base = _MEDIANS.get((group, "train_step"))
    if base is not None:
        inter = _interleaved_ratio(fn, ref) if fn is not ref else 1.0
        benchmark.extra_info["ratio_to_train_step"] = median / base
        benchmark.extra_info["ratio_interleaved"] = inter
        print(f"\n[{group}] {name}: {median * 1e3:.1f} ms = {median / base:.2f}x train step "
              f"(interleaved {inter:.2f}x)")


def test_a_train_step(benchmark, problem):
    group, _model, _x, step = problem
    _bench(benchmark, group, "train_step", step, step, baseline=True)


def test_b_engine_product(benchmark, problem):
    group, model, x, step = problem
    lin = linearize(model, (x,), backend=BACKEND)
    assert lin.fallbacks == [], lin.fallbacks
    v = [torch.randn_like(p) for p in lin.params]
    _bench(benchmark, group, "engine_product", lambda: lin.vjp(lin.jvp(v)), step)


def _func_twin(model: nn.Module) -> nn.Module:
    """The same function for torch.func: batch norm without running statistics (train mode
    normalises by the batch alone), whose in-place update functorch refuses."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return twin


def test_c_torch_func_jvp_vjp_uncached(benchmark, problem):
    group, model, x, step = problem
    twin = _func_twin(model)
    names = [n for n, _ in twin.named_parameters()]
    params = tuple(p.detach() for p in twin.parameters())
    v = tuple(torch.randn_like(p) for p in params)

    def f(*ps):
        return functional_call(twin, dict(zip(names, ps)), (x,))

    def product():
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no forward mode
            _z, jv = jvp(f, params, v)
            return vjp(f, *params)[1](jv)

    _bench(benchmark, group, "torch_func_jvp_vjp", product, step)


def test_d_autograd_backend_product(benchmark, problem):
    group, model, x, step = problem
    lin = AutogradLinearization(model, (x,))
    v = [torch.randn_like(p) for p in lin.params]
    _bench(benchmark, group, "autograd_backend_product", lambda: lin.vjp(lin.jvp(v)), step)


def test_e_engine_build(benchmark, problem):
    group, model, x, step = problem
    _bench(benchmark, group, "engine_build",
           lambda: linearize(model, (x,), backend=BACKEND), step)


def test_f_engine_build_from_record(benchmark, problem):
    group, model, x, step = problem
    with ForwardRecord(model) as record:
        step()
    _bench(benchmark, group, "engine_build_from_record",
           lambda: linearize(model, (x,), backend=BACKEND, record=record), step)
