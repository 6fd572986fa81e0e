import pytest
import torch

from logprobs import default_chunk_size, sequence_logps, token_logprobs
from model import Config, GPTNeoX, left_padding


def naive(hidden, weight, targets):
    """The reference: full [N, V] logits, log_softmax, gather; -100 -> 0."""
    valid = targets != -100
    logp = (hidden @ weight.T).log_softmax(-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return logp * valid


def inputs(n, d, v, dtype=torch.float32, masked=(), scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * scale / d ** 0.5  # logits of std `scale`
    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(masked)] = -100
    return hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_(), targets


def test_gradcheck_float64():
    hidden, weight, targets = inputs(7, 5, 11, torch.float64, masked=[2, 5])
    out = token_logprobs(hidden, weight, targets, chunk_size=3)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda h, w: token_logprobs(h, w, targets, chunk_size=3), (hidden, weight))


@pytest.mark.parametrize("n, chunk_size", [(37, 8), (37, 5), (5, 16), (37, None)])
def test_equals_naive(n, chunk_size):
    """Values and gradients, for chunks that do not divide N, N below the chunk, and the default rule."""
    masked = [0, 3, n - 1]
    hidden, weight, targets = inputs(n, 24, 53, masked=masked)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1))
    ours = token_logprobs(hidden, weight, targets, chunk_size)
    ref = naive(hidden, weight, targets)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours[masked] == 0).all()
    for a, b in zip(torch.autograd.grad(ours, (hidden, weight), grad), torch.autograd.grad(ref, (hidden, weight), grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    dh = torch.autograd.grad(token_logprobs(hidden, weight, targets, chunk_size), hidden, grad)[0]
    assert (dh[masked] == 0).all()  # masked targets get no gradient


def test_all_masked_stays_in_the_graph():
    hidden, weight, targets = inputs(6, 8, 13, masked=range(6))
    out = token_logprobs(hidden, weight, targets, chunk_size=4)
    assert out.requires_grad and out.grad_fn is not None and (out == 0).all()
    out.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))
    empty = token_logprobs(hidden[:0], weight, targets[:0])  # no token at all (sequence_logps of an all-prompt batch)
    assert empty.shape == (0,) and empty.requires_grad
    empty.sum().backward()


def test_saves_no_tokens_by_vocab_tensor():
    """What forward leaves for backward: hidden, weight, targets and one float per token."""
    n, d, v = 64, 16, 101
    hidden, weight, targets = inputs(n, d, v)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        token_logprobs(hidden, weight, targets, chunk_size=16)
    assert sorted(saved) == sorted([n * d, v * d, n, n])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_float64(dtype):
    hidden, weight, targets = inputs(50, 64, 300, dtype, masked=[3], scale=5.0)
    ours = token_logprobs(hidden, weight, targets, chunk_size=16)
    ref = naive(hidden.double(), weight.double(), targets)  # the same bf16/fp16 values, in float64
    assert ours.dtype == torch.float32
    assert (ours.double() - ref).abs().max() < 1e-2
    dh, dw = torch.autograd.grad(ours.sum(), (hidden, weight))
    rh, rw = torch.autograd.grad(ref.sum(), (hidden, weight))
    assert dh.dtype == dw.dtype == dtype
    torch.testing.assert_close(dh.double(), rh.double(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw.double(), rw.double(), rtol=2e-2, atol=2e-2)


def test_default_chunk_size_rule():
    assert default_chunk_size(8192, 2048, 50304) == 1024  # logits buffer = half the fp32 dW
    assert default_chunk_size(8192, 64, 50304) == 2**22 // 50304  # at least 16 MiB of logits
    assert default_chunk_size(100, 2048, 50304) == 100  # never more than N
    assert default_chunk_size(0, 2048, 50304) == 1


def test_rejects_bad_shapes():
    hidden, weight, targets = inputs(4, 8, 10)
    with pytest.raises(ValueError, match="hidden"):
        token_logprobs(hidden, weight[:, :7], targets)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets[:3])


def test_sequence_logps_equals_full_logits():
    torch.manual_seed(0)
    model = GPTNeoX(Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, initializer_range=0.2))
    ids = torch.randint(1, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = labels[1, :5] = -100  # prompts
    labels[2] = -100  # a row with no response token
    visible, pos = left_padding(mask)
    ours = sequence_logps(model, ids, labels, visible, position_ids=pos)
    grads = torch.autograd.grad(ours.sum(), list(model.parameters()))

    logp = model(ids, visible, position_ids=pos)[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    ref = (logp.gather(2, targets.clamp(min=0)[..., None]).squeeze(2) * (targets != -100)).sum(1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours[2] == 0 and ours[0] < 0
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), list(model.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fp32_under_autocast_by_design():
    """Under a bf16 autocast the kernel's values and gradients are exactly those without autocast."""
    hidden, weight, targets = inputs(37, 24, 53, masked=[3])
    grad = torch.randn(37, generator=torch.Generator().manual_seed(1))
    plain = token_logprobs(hidden, weight, targets, 8)
    plain_grads = torch.autograd.grad(plain, (hidden, weight), grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = token_logprobs(hidden, weight, targets, 8)
        auto_grads = torch.autograd.grad(auto, (hidden, weight), grad)
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)
    assert all(torch.equal(a, b) for a, b in zip(auto_grads, plain_grads))


def test_sequence_logps_of_several_responses_per_row():
    """Labels [B, K, T]: response k's targets at labels[:, k, t + 1] for position t, one position may serve two."""
    torch.manual_seed(0)
    model = GPTNeoX(Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, initializer_range=0.2))
    ids = torch.randint(1, 97, (2, 9))
    labels = torch.full((2, 2, 9), -100)
    labels[:, 0, 4:6] = ids[:, 4:6]
    labels[:, 1, 4] = 7  # also predicted by position 3
    labels[:, 1, 7:] = ids[:, 7:]
    ours = sequence_logps(model, ids, labels)
    assert ours.shape == (2, 2)
    logp = model(ids)[:, :-1].log_softmax(-1)
    want = torch.stack([logp[:, 3:5].gather(2, ids[:, 4:6, None]).sum((1, 2)),
                        logp[:, 3, 7] + logp[:, 6:8].gather(2, ids[:, 7:, None]).sum((1, 2))], 1)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
