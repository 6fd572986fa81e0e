"""Per-token log-probabilities log π(y_t | x, y_<t) without materialising [tokens × vocab].

Every DAA quantity (Eq. 4's implicit rewards, the KL that the over-optimization
curves are plotted against, the SFT loss) is a sum of per-token log-probs. The
naive way,

    logits = hidden @ weight.T                              # [N, V]
    logp = logits.log_softmax(-1).gather(1, targets[:, None])  # another [N, V]

makes autograd keep [N, V] tensors for backward and allocate more in it: the
naive forward + backward peaks at three [N, V] float32 copies. With N = 8192
tokens and Pythia's V = 50304, one copy is 8192 × 50304 × 4 B = 1.6 GB.

This kernel never holds more than one chunk of C tokens' logits:

  forward   for each chunk of C tokens:  z = h_c Wᵀ                  [C, V], fp32
                                         log p = log_softmax(z)[target]
                                         lse = logsumexp(z) = z[target] − log p
            save hidden, weight, targets and lse: O(N) beyond the inputs.
  backward  for each chunk, recompute    z = h_c Wᵀ
            and, in the same buffer,     dz = g · (onehot(target) − softmax(z)),
                                         softmax(z) = exp(z − lse)  (no second reduction)
                                         dH_c  = dz W               [C, D]
                                         dW   += dzᵀ h_c            [V, D], in place

FLOPs. Forward 2NDV (one matmul). Backward 6NDV: 2NDV to recompute the logits,
2NDV for dH and 2NDV for dW. Naive autograd does 2NDV + 4NDV: the kernel does 4/3
of its matmul work, the price of not storing the logits. The elementwise work is
O(NV), cheap next to O(NDV) once D is in the hundreds, and the kernel makes fewer
passes over memory than the naive path, which allocates and fills fresh [N, V]
tensors.

Memory. Beyond its inputs, any backward must produce dH [N, D] and dW [V, D]; dW
accumulates in fp32 (4VD bytes): that is the floor. The kernel adds one [C, V]
fp32 buffer, reused by every chunk (matmuls write into it with `out=`; softmax,
the scaling by g and the onehot are applied in place), and O(N) for lse. The
forward uses a second buffer for log_softmax; it does not raise the peak, as dW
does not exist yet.
Default chunk: C = max(D // 2, 2**22 // V) tokens, at most N. The first term
makes the buffer (4CV = 2VD bytes) half the fp32 dW, so the peak stays 1.5× the
floor whatever N is; the second keeps a chunk at least 16 MiB, so a small model
or vocabulary does not pay Python overhead on many tiny chunks. Pythia-1b (D =
2048): C = 1024 tokens, a 206 MB buffer against 1.6 GB per naive copy at N = 8192.
bench/logprobs.py measures both on CPU.

Precision. Float32, bfloat16 and float16 inputs compute in fp32 (the weight is
upcast once per pass, a hidden chunk as it is used) and return fp32 log-probs;
gradients come back in the inputs' dtypes. Autocast is switched off inside both
passes, so the matmuls are fp32 under a bf16 autocast by design. Float64 inputs
compute and return float64, so torch.autograd.gradcheck can check the
hand-written backward.

On a GPU. Same algorithm, same memory. It is matmul-bound: expect about 4/3 of
the naive time once C is in the hundreds, as each chunk is a [C, D] × [D, V]
GEMM large enough to fill the GPU. The matmuls are fp32; training.py allows TF32
(`torch.backends.cuda.matmul.allow_tf32 = True`) to run them on tensor cores. That
does round: the hidden states arrive in fp32 (the final LayerNorm runs in fp32
under autocast) and the master weight is fp32, and TF32 keeps 10 of their 23
mantissa bits (a unit roundoff of 2^-11 ≈ 4.9e-4 per input, against bf16's
2^-8 ≈ 3.9e-3): an error of the order of a bf16 forward's, 8× smaller. sample.py
turns TF32 off, as its KL is a small difference of large sums; bench/gpu.py
measures the error. A Triton kernel that fused the softmax into the matmul
(Liger's fused linear cross-entropy) would skip the passes over the [C, V]
buffer; this file stays plain PyTorch that runs anywhere.
"""
import torch
from torch.autograd.function import once_differentiable

IGNORE = -100  # target of prompt and padding positions: log-prob 0, no gradient


def default_chunk_size(n, d, v):
    """Tokens per chunk: a logits buffer half the size of the fp32 weight gradient, at least 16 MiB."""
    return max(1, min(n, max(d // 2, 2**22 // v)))


class _TokenLogprobs(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 by design, not because out= escapes autocast
            return _TokenLogprobs._forward(ctx, hidden, weight, targets, chunk_size)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk_size):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n, v = hidden.shape[0], weight.shape[0]
        w = weight.to(acc)  # no copy for fp32
        valid = targets != IGNORE
        tgt = targets.masked_fill(~valid, 0)  # any valid index: masked rows are zeroed at the end
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        buf = torch.empty(2, min(chunk_size, n), v, dtype=acc, device=hidden.device)  # reused by every chunk
        for i in range(0, n, chunk_size):
            h = hidden[i:i + chunk_size].to(acc)
            t = tgt[i:i + chunk_size, None]
            z, logp_z = buf[0, :len(h)], buf[1, :len(h)]
            torch.mm(h, w.T, out=z)  # this chunk's logits
            torch.log_softmax(z, 1, out=logp_z)  # one fused pass, row by row
            logp[i:i + chunk_size] = logp_z.gather(1, t).squeeze(1)
            lse[i:i + chunk_size] = z.gather(1, t).squeeze(1) - logp[i:i + chunk_size]
        ctx.save_for_backward(hidden, weight, targets, lse)  # no [N, V] tensor survives the forward
        ctx.chunk_size = chunk_size
        return logp.masked_fill_(~valid, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        with torch.autocast(grad_logp.device.type, enabled=False):
            return _TokenLogprobs._backward(ctx, grad_logp)

    @staticmethod
    def _backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        c, acc = ctx.chunk_size, lse.dtype
        (n, d), v = hidden.shape, weight.shape[0]
        w = weight.to(acc)
        valid = targets != IGNORE
        tgt = targets.masked_fill(~valid, 0)
        g = grad_logp.to(acc) * valid  # masked targets get no gradient
        dH = torch.empty(n, d, dtype=acc, device=hidden.device)
        dW = torch.zeros(v, d, dtype=acc, device=hidden.device)  # fp32 accumulator: the memory floor
        buf = torch.empty(min(c, n), v, dtype=acc, device=hidden.device)  # the only [C, V]
        for i in range(0, n, c):
            h = hidden[i:i + c].to(acc)
            g_c = g[i:i + c, None]
            z = buf[:len(h)]
            torch.mm(h, w.T, out=z)  # recompute the logits rather than having stored them
            z.sub_(lse[i:i + c, None]).exp_().mul_(-g_c)  # −g · softmax
            z.scatter_add_(1, tgt[i:i + c, None], g_c)  # + g · onehot  =  dz
            torch.mm(z, w, out=dH[i:i + c])  # dH_c = dz W
            dW.addmm_(z.T, h)  # dW += dzᵀ h_c, with no [V, D] temporary
        return dH.to(hidden.dtype), dW.to(weight.dtype), None, None


def token_logprobs(hidden, weight, targets, chunk_size=None):
    """log softmax(hidden @ weight.T)[targets] per token, chunked: [N, D], [V, D], [N] -> [N].

    Targets equal to -100 give 0 and no gradient. The result is float32 (float64
    for float64 inputs), differentiable in `hidden` and `weight`, and attached to
    the graph even when every target is masked, so DDP still sees a gradient
    (of zeros) for the weight on every rank.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs needs hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"token_logprobs needs targets [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    n, d = hidden.shape
    return _TokenLogprobs.apply(hidden, weight, targets, chunk_size or default_chunk_size(n, d, weight.shape[0]))


def scored_tokens(labels):
    """Where sequence_logps reads its log-probs: one [4, N] tensor of (row, position, sequence,
    target) per scored token, position t of `row` predicting `target` for `sequence` (the row,
    or row · K + k for labels [B, K, T]). Batch builders call it on the CPU, before the copy to
    the device: on a CUDA tensor, nonzero waits for the GPU (its output size depends on the data).
    """
    targets = labels[..., 1:]
    scored = targets != IGNORE
    where = scored.nonzero(as_tuple=True)  # (row, [response,] position)
    seq = where[0] if labels.dim() == 2 else where[0] * labels.shape[1] + where[1]
    return torch.stack((where[0], where[-1], seq, targets[scored]))


def sequence_logps(model, input_ids, labels, attention_mask=None, return_hidden=False, position_ids=None,
                   scored=None):
    """Σ_t log π(y_t | x, y_<t) over each response's tokens: [B, T] ids and labels -> [B] float32.
    With `return_hidden`, also the final-norm hidden states [B, T, D] it computed on the way
    (sample.py reads other statistics from them without a second forward). `scored`: labels'
    scored_tokens, when the batch builder has them (else computed here).

    Labels are the ids with -100 on prompt and padding; position t's output predicts
    labels[:, t + 1]. Labels [B, K, T] score K responses packed in one row (daa.py's
    prefix-shared pairs) and give [B, K]: position t's output predicts labels[:, k, t + 1]
    for response k, so one position (the prompt's last) may score the first token of
    several responses. Only positions that predict a response token reach the
    unembedding: a TL;DR prompt is several times longer than its summary, and its
    logits would be computed only to be masked.
    """
    hidden = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, return_hidden=True)
    # Read the weight after the call: DDP keeps the model in .module, and FSDP gathers the
    # root's sharded weights (embed_out's among them) in its forward.
    weight = getattr(model, "module", model).embed_out.weight
    row, position, seq, target = scored_tokens(labels) if scored is None else scored
    logp = token_logprobs(hidden[row, position], weight, target)
    logps = torch.zeros(labels.shape[:-1].numel(), dtype=logp.dtype, device=logp.device).index_add(0, seq, logp)
    logps = logps.view(labels.shape[:-1])
    return (logps, hidden) if return_hidden else logps
