"""A model's own init code with every random draw served: equal, bit for bit, to the same code run locally with
each random call given the contract's generator (issue 19).

The reference (tests/own_init_reference.py) is written independently of the SDK's record-and-replay: it runs
the init code once, locally, each random call given the contract's generator.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import initserve
from tests.conftest import ServerProcess, same_bytes
from tests.own_init_reference import per_call_generators

BASE = 20261203


def reset_all(model: nn.Module) -> None:
    """Each submodule's reset_parameters (or _reset_parameters), children first, as construction ran them."""
    for module in reversed(list(_pre_order(model))):
        reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
        if callable(reset):
            reset()


def _pre_order(module: nn.Module) -> Iterator[nn.Module]:
    yield module
    for child in module.children():
        yield from _pre_order(child)


def local(model: nn.Module, code: Callable[[nn.Module], None], base: int = BASE) -> nn.Module:
    with per_call_generators(model, base):
        code(model)
    return model


def assert_same_state(actual: nn.Module, expected: nn.Module) -> int:
    got, want = actual.state_dict(), expected.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert same_bytes(got[name], want[name]), name
    return len(want)


# --- models -------------------------------------------------------------------------------------------------------


class ScaledLinear(nn.Linear):
    """A subclass that overrides reset_parameters: it must get its own init, not Linear's."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Custom(nn.Module):
    """Repeat draws on one tensor, in-place arithmetic, indexing writes, .data, and every nn.init random function."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.empty(6, 4))
        self.v = nn.Parameter(torch.empty(5, 3))
        self.t = nn.Parameter(torch.empty(7))
        self.s = nn.Parameter(torch.empty(8, 4))
        self.k = nn.Parameter(torch.empty(3, 4, 2))
        self.register_buffer("running", torch.empty(4))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.q, gain=2.0)
        self.q.data.mul_(0.5)
        self.v.data.normal_(0.0, 0.1)  # k = 0
        self.v.data.uniform_(-1.0, 1.0)  # k = 1
        with torch.no_grad():
            self.v[0].fill_(3.0)
            self.v[:, 1] *= 2
        nn.init.trunc_normal_(self.t, std=0.5, a=-0.6, b=0.6)
        nn.init.sparse_(self.s, sparsity=0.5)
        nn.init.xavier_normal_(self.k, gain=1.5)
        nn.init.kaiming_normal_(self.k, mode="fan_out", nonlinearity="relu")  # k = 1
        nn.init.xavier_uniform_(self.k)  # k = 2
        self.running.fill_(1.0)


def every_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "linear": nn.Linear(8, 16),
            "scaled": ScaledLinear(16, 4),
            "bilinear": nn.Bilinear(3, 4, 5),
            "conv1": nn.Conv1d(2, 3, 3),
            "conv2": nn.Conv2d(2, 4, 3, groups=2),
            "conv3": nn.Conv3d(1, 2, 2),
            "deconv1": nn.ConvTranspose1d(2, 3, 3),
            "deconv2": nn.ConvTranspose2d(2, 2, 3),
            "deconv3": nn.ConvTranspose3d(1, 2, 2),
            "embed": nn.Embedding(20, 8, padding_idx=1),
            "bag": nn.EmbeddingBag(10, 4, padding_idx=0),
            "layer_norm": nn.LayerNorm(4),
            "group_norm": nn.GroupNorm(2, 4),
            "rms_norm": nn.RMSNorm(4),
            "batch_norm": nn.BatchNorm1d(4),
            "batch_norm2": nn.BatchNorm2d(3),
            "batch_norm3": nn.BatchNorm3d(2),
            "sync_batch_norm": nn.SyncBatchNorm(3),
            "instance_norm1": nn.InstanceNorm1d(3, affine=True),
            "instance_norm": nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
            "instance_norm3": nn.InstanceNorm3d(2, affine=True),
            "attention": nn.MultiheadAttention(8, 2, add_bias_kv=True, kdim=6, vdim=5),
            "encoder": nn.TransformerEncoderLayer(8, 2, dim_feedforward=16),
            "lstm": nn.LSTM(4, 3, num_layers=2, bidirectional=True),
            "gru": nn.GRU(4, 3),
            "rnn": nn.RNN(3, 2, nonlinearity="relu"),
            "rnn_cell": nn.RNNCell(3, 2),
            "lstm_cell": nn.LSTMCell(3, 2),
            "gru_cell": nn.GRUCell(3, 2),
            "transformer": nn.Transformer(8, 2, 1, 1, dim_feedforward=16, batch_first=True),
            "adaptive_softmax": nn.AdaptiveLogSoftmaxWithLoss(8, 10, cutoffs=[4]),
            "prelu": nn.PReLU(3, init=0.3),
            "custom": Custom(),
        }
    )


# --- tests --------------------------------------------------------------------------------------------------------


def test_every_layer_covers_every_torch_nn_class_with_reset_parameters() -> None:
    """A torch release that adds a layer with its own reset_parameters fails here until the layer is in the model.
    Lazy layers become their eager classes once materialized; RNNBase and RNNCellBase are bases."""
    with_reset = {
        name
        for name, cls in vars(nn).items()
        if isinstance(cls, type) and issubclass(cls, nn.Module)
        and (hasattr(cls, "reset_parameters") or hasattr(cls, "_reset_parameters"))
        and not name.startswith("Lazy") and name not in ("RNNBase", "RNNCellBase")
    }  # fmt: skip
    covered = {type(module).__name__ for module in every_layer().modules()}
    assert with_reset <= covered, sorted(with_reset - covered)


def test_every_layer_equals_its_own_init_code_run_locally_with_the_contracts_generators(
    client: initserve.Client,
) -> None:
    served = client.init_module(every_layer(), seed=BASE)
    compared = assert_same_state(served, local(every_layer(), reset_all))
    assert compared == len(every_layer().state_dict())
    scaled = served["scaled"].weight
    assert scaled.std() < 0.05  # its own normal(0, 0.02), not Linear's kaiming_uniform
    assert torch.count_nonzero(served["embed"].weight[1]) == 0  # Embedding's padding row, zeroed after the draw
    assert served["custom"].v[0].tolist() == [3.0, 6.0, 3.0]  # filled, then its column doubled, in that order


def test_a_meta_built_copy_through_materialize_equals_it(client: initserve.Client) -> None:
    with torch.device("meta"):
        meta = every_layer()
    materialized = client.materialize(meta, seed=BASE)
    assert all(not t.is_meta for t in materialized.state_dict().values())
    assert_same_state(materialized, local(every_layer(), reset_all))


def test_renaming_a_submodule_changes_only_its_tensors(client: initserve.Client) -> None:
    def model(name: str) -> nn.Module:
        return nn.ModuleDict({"a": nn.Linear(4, 4), name: nn.Linear(4, 4), "c": nn.Conv1d(2, 2, 3)})

    before = client.init_module(model("b"), seed=3).state_dict()
    after = client.init_module(model("renamed"), seed=3).state_dict()
    for name in ("a.weight", "a.bias", "c.weight", "c.bias"):
        assert same_bytes(before[name], after[name]), name
    assert not torch.equal(before["b.weight"], after["renamed.weight"])


def test_a_per_module_init_fn_with_tied_weights_and_a_scaled_projection(client: initserve.Client) -> None:
    """nanoGPT's ``_init_weights``, applied to every module: normal(0.02), the residual projections scaled by
    1/sqrt(2 * n_layer), zero biases, the token embedding tied to the head (drawn twice: k = 0, then k = 1)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 64)
            self.proj = nn.Linear(64, 16)
            self.proj.SCALE_INIT = 1

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(50, 16)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.wte.weight

        def _init_weights(self, module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                std = 0.02 * ((2 * 2) ** -0.5 if hasattr(module, "SCALE_INIT") else 1.0)
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                module.weight.data.normal_(mean=0.0, std=0.02)

    model = GPT()
    served = client.init_module(model, seed=BASE, init_fn=model._init_weights)
    assert served.head.weight is served.wte.weight
    expected = GPT()
    local(expected, lambda m: m.apply(m._init_weights))
    assert_same_state(served, expected)


def test_a_zero_argument_init_fn_on_a_meta_built_model(client: initserve.Client) -> None:
    """torchtitan's pattern: build on meta, allocate, run the model's ``init_weights()``."""

    class Titan(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(32, 8)
            self.layers = nn.ModuleList([nn.Linear(8, 8, bias=False) for _ in range(3)])
            self.norm = nn.RMSNorm(8)
            self.out = nn.Linear(8, 32, bias=False)
            self.register_buffer("freqs", torch.empty(4), persistent=False)

        def init_weights(self) -> None:
            nn.init.normal_(self.tok.weight)
            for depth, layer in enumerate(self.layers):
                nn.init.trunc_normal_(layer.weight, mean=0.0, std=0.02 / (2 * (depth + 1)) ** 0.5)
            self.norm.reset_parameters()
            final = self.out.in_features**-0.5
            nn.init.trunc_normal_(self.out.weight, std=final, a=-3 * final, b=3 * final)
            with torch.no_grad():
                self.freqs.copy_(1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)))

    with torch.device("meta"):
        meta = Titan()
    served = client.materialize(meta, seed=BASE, init_fn=meta.init_weights)
    expected = Titan()
    local(expected, lambda m: m.init_weights())
    assert_same_state(served, expected)
    assert same_bytes(served.freqs, expected.freqs)


def test_the_dry_run_changes_no_value_and_no_attribute(client: initserve.Client) -> None:
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))
            self.calls = 0

        def reset_parameters(self) -> None:
            self.calls += 1
            self.w.data.mul_(2.0)  # applied to the value before: once, not twice
            self.w._flag = True

    model = Counting()
    client.init_module(model, seed=1)
    assert model.calls == 1
    assert model.w.tolist() == [2.0, 2.0, 2.0]
    assert model.w._flag is True


def test_every_draw_of_a_model_is_one_init_many_call(client: initserve.Client, monkeypatch) -> None:
    calls = []
    original = client.fetch_many
    monkeypatch.setattr(client, "fetch_many", lambda specs, **kw: calls.append(len(specs)) or original(specs, **kw))
    client.init_module(every_layer(), seed=BASE)
    assert len(calls) == 1 and calls[0] > 40


def test_a_random_call_on_a_temporary_tensor_is_refused_or_run_with_a_derived_generator(
    client: initserve.Client,
) -> None:
    class FromTemporary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(4, 4))

        def reset_parameters(self) -> None:
            with torch.no_grad():
                self.w.copy_(torch.randn(4, 4) * 0.1)

    with pytest.raises(ValueError, match=r"init code called .*randn on .*not a whole parameter or buffer"):
        client.init_module(FromTemporary(), seed=1)
    served = client.init_module(FromTemporary(), seed=1, local_draws=True)
    generator = torch.Generator().manual_seed(initserve.derive_seed(1, "@local#0"))
    assert same_bytes(served.w, torch.randn(4, 4, generator=generator) * 0.1)


def test_unserved_random_methods_and_views_are_refused(client: initserve.Client) -> None:
    class Bernoulli(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mask = nn.Parameter(torch.empty(3, 3))

        def reset_parameters(self) -> None:
            self.mask.data.bernoulli_(0.5)

    class View(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(3, 3))

        def reset_parameters(self) -> None:
            self.w.data[0].normal_()

    with pytest.raises(ValueError, match=r"bernoulli_ on part of 'mask'"):
        client.init_module(Bernoulli(), seed=1)
    with pytest.raises(ValueError, match=r"normal_ on part of 'w'"):
        client.init_module(View(), seed=1)


def test_a_draw_in_a_dtype_the_service_does_not_serve_names_the_call(client: initserve.Client) -> None:
    class Integers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("codes", torch.empty(4, dtype=torch.float8_e4m3fn))
            self.w = nn.Parameter(torch.empty(2))

        def reset_parameters(self) -> None:
            nn.init.zeros_(self.w)
            nn.init.uniform_(self.codes)

    with pytest.raises(ValueError, match=r"^init code called torch.nn.init.uniform_ on 'codes': dtype torch.float8"):
        client.init_module(Integers(), seed=1)


def test_draws_on_channels_last_weights_are_refused_not_served_in_the_wrong_order(client: initserve.Client) -> None:
    """torch fills a strided tensor in memory order; the service's bytes are in logical order. A draw on such a
    weight is refused by the dry run, before anything is written. (torch 2.13's Conv layers init a contiguous
    temporary and copy it in, which is a random call on a temporary: refused too, or run with local_draws.)"""

    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(8, 4, 3, 3).to(memory_format=torch.channels_last))

        def reset_parameters(self) -> None:
            nn.init.normal_(self.weight, std=0.02)

    model = Direct()
    before = model.weight.detach().clone()
    with pytest.raises(
        NotImplementedError, match=r"'weight', whose layout is not contiguous \(strides \(36, 1, 12, 4\)"
    ):
        client.init_module(model, seed=1)
    assert same_bytes(model.weight.detach(), before)
    conv = nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"kaiming_uniform_ on a \(8, 4, 3, 3\) float32 tensor, which is not a whole"):
        client.init_module(conv, seed=1)


def test_parameters_no_code_writes_are_an_error(client: initserve.Client) -> None:
    class NoReset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(2, 2)
            self.loose = nn.Parameter(torch.randn(3))

    with pytest.raises(ValueError, match=r"no init code wrote loose"):
        client.init_module(NoReset(), seed=1)
    model = NoReset()
    kept = model.loose.detach().clone()
    client.init_module(model, seed=1, leave_unwritten=True)
    assert same_bytes(model.loose.detach(), kept)


def test_rules_still_choose_schemes_by_table(client: initserve.Client) -> None:
    model = client.init_module(nn.Linear(4, 4), seed=2, rules=[initserve.Rule("zeros", name="*")])
    assert not model.weight.any() and not model.bias.any()
    with pytest.raises(ValueError, match="not both"):
        client.init_module(nn.Linear(4, 4), seed=2, rules=[initserve.Rule("zeros", name="*")], init_fn=lambda m: None)


def test_the_models_init_survives_copies(client: initserve.Client) -> None:
    model = every_layer()
    copied = copy.deepcopy(model)
    assert_same_state(client.init_module(model, seed=9), client.init_module(copied, seed=9))


def test_the_asyncio_client_runs_the_same_code(server: ServerProcess) -> None:
    import asyncio

    import initserve.aio

    async def run() -> nn.Module:
        async with initserve.aio.Client(server.target) as client:
            return await client.init_module(every_layer(), seed=BASE)

    assert_same_state(asyncio.run(asyncio.wait_for(run(), 120)), local(every_layer(), reset_all))


# --- Hugging Face transformers models, built from small configs (no download) ---------------------------------------


def hugging_face(kind: str) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    if kind == "gpt2":
        gpt2 = {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 16, "bos_token_id": 0, "eos_token_id": 0}
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, **gpt2))
    sizes = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
    sizes |= {"max_position_embeddings": 16, "vocab_size": 97}
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **sizes))
    return transformers.BertForMaskedLM(transformers.BertConfig(**sizes))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_hugging_face_models_through_their_own_init_weights(client: initserve.Client, kind: str) -> None:
    """``_init_weights`` applied to every module (what ``post_init`` runs), tied embeddings drawn twice; and a copy
    built on meta through ``materialize``, its buffers filled by the same code."""
    model = hugging_face(kind)
    served = client.init_module(model, seed=BASE, init_fn=model._init_weights)
    expected = local(hugging_face(kind), lambda m: m.apply(m._init_weights))
    assert assert_same_state(served, expected) > 20
    with torch.device("meta"):
        meta = hugging_face(kind)
    materialized = client.materialize(meta, seed=BASE, init_fn=meta._init_weights)
    assert_same_state(materialized, expected)
