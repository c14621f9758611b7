"""The next-token loss of a batch of blocks, for training (mean) and eval (sum in float64).

Every block of T tokens predicts T - 1 of them: token t+1 from tokens 0..t.

Document-aware attention (--train.doc_attention=within): blocks pack several documents separated by EOS.
Position ids restart at 0 after each EOS; transformers then sees a packed batch (positions that do not
increase by 1 start a new sequence, masking_utils.find_packed_sequence_indices) and builds a block-diagonal
causal mask, so a token attends only to its own document, at the positions it would have alone. The EOS
closes the document before it; the token after it is predicted from that document alone.

Masked folders (chat / prompt_completion, blocks.py version 2) carry per-token flags (B, T): LOSS marks a label,
START a sample's first token. Positions restart at each START (attention stays within a sample, whatever tokens
it holds: a template may put EOS inside a sample), and the loss is a sum over labels only, scaled by the caller:

    loss of a step = sum over the global batch's labels of NLL / number of labels in the global batch
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_positions(x: torch.Tensor, eos: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) positions within each document of each block, restarting after every EOS."""
    idx = torch.arange(x.size(1), device=x.device).expand_as(x)  # (B, T)
    starts = torch.zeros_like(x, dtype=torch.bool)
    starts[:, 1:] = x[:, :-1] == eos  # a document starts right after an EOS
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values  # its first index
    return idx - first


IGNORE = -100  # a target that is not a label (transformers' ignore_index)
LOSS, START = 1, 2  # the flag bits of a masked block (data/blocks.py)


def segment_positions(flags: torch.Tensor) -> torch.Tensor:
    """(B, T) flags -> (B, T) positions within each sample, restarting at every START token."""
    idx = torch.arange(flags.size(1), device=flags.device).expand(flags.shape)  # (B, T)
    starts = (flags & START) != 0
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - first


def masked_labels(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """(B, T) ids and flags -> (B, T) labels: the id where LOSS is set, IGNORE elsewhere."""
    return torch.where((flags & LOSS) != 0, x, torch.full_like(x, IGNORE))


def label_count(flags) -> int:
    """Labels that are predicted in (..., T) flags: LOSS set at positions 1..T-1 (position 0 predicts nothing)."""
    return int(((flags[..., 1:] & LOSS) != 0).sum())


def masked_nll_sum(model, x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Summed NLL over the labels of (B, T) (differentiable when grad is on; float64 under no_grad)."""
    return masked_objective(model, x, flags).nll_sum


def masked_objective(model, x: torch.Tensor, flags: torch.Tensor) -> "FusedOutput":
    """A masked micro-batch (B, T): `nll_sum` over its labels (float64 under no_grad), and `extra`, what the model
    adds to its cross-entropy itself (a router's balancing loss; 0 for a dense model), kept apart because the
    caller scales the label sum by accum x world / N while a model's own term weighs each micro-batch alike."""
    labels = masked_labels(x, flags)
    kwargs = {"input_ids": x, "use_cache": False, "position_ids": segment_positions(flags)}
    if is_fused(model):
        out = model(**kwargs, labels=labels, reduction="sum")
        nll = out.ce if torch.is_grad_enabled() else out.nll_sum
        return FusedOutput(out, nll_sum=nll, extra=out.extra if torch.is_grad_enabled() else 0.0)
    n = label_count(flags)
    # A model adds its auxiliary terms (transformers' switch for them: output_router_logits) only when it computes
    # a loss: given labels (at least one, else its mean is 0/0), extra = its loss - its mean cross-entropy. A dense
    # model is not asked for a loss it would compute in vain.
    adds = bool(getattr(unwrapped(model).config, "output_router_logits", False))
    out = model(**kwargs, labels=labels) if n and adds else model(**kwargs)
    logits = out.logits[:, :-1, :].float()  # (B, T-1, V)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                          reduction="none")
    total = nll.sum() if torch.is_grad_enabled() else nll.double().sum()
    extra = out.loss - nll.sum() / n if n and out.get("loss") is not None else 0.0
    return FusedOutput(out, nll_sum=total, extra=extra if torch.is_grad_enabled() else 0.0)


def inputs(x: torch.Tensor, eos: int | None) -> dict:
    """The model's keyword arguments for a (B, T) batch: `eos` set = document-aware attention."""
    kwargs = {"input_ids": x, "use_cache": False}
    if eos is not None:
        kwargs["position_ids"] = document_positions(x, eos)
    return kwargs


def objective(model, x: torch.Tensor, eos: int | None = None):
    """The model's output given labels: `loss` is its whole training objective (mean next-token cross-entropy
    over the B x (T-1) predicted tokens of (B, T), plus whatever auxiliary term the model adds itself, e.g. a
    router's load-balancing loss), beside `aux_loss` and `router_logits` when the model returns them."""
    return model(**inputs(x, eos), labels=x)


def mean_loss(model, x: torch.Tensor, eos: int | None = None) -> torch.Tensor:
    """The training objective of (B, T) (objective()); the model shifts the labels inside."""
    return objective(model, x, eos).loss


def nll_sum(model, x: torch.Tensor, eos: int | None = None, flags: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token NLL of (B, T) in float64: the sum over B x (T-1) predicted tokens (over the labels only
    when the block's `flags` are given)."""
    if flags is not None:
        return masked_nll_sum(model, x, flags)
    if is_fused(model):
        return model(**inputs(x, eos), labels=x).nll_sum
    logits = model(**inputs(x, eos)).logits[:, :-1, :].float()  # (B, T-1, V)
    # Per-token NLL in float32 (as the model computes it), summed in float64: the sum does not drift with
    # the number of tokens in a batch, so batch size leaves the result unchanged.
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="none")
    return nll.double().sum()


# ---------------------------------------------------------------------------------------------
# Fused linear + cross-entropy: the (tokens x vocab) logits are never materialised


CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32): 333 tokens of a 50,257-token vocabulary
UNSUPPORTED = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_scratch: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> the chunk buffer, reused chunk after chunk


def chunk_tokens(vocab: int) -> int:
    return max(64, min(4096, CHUNK_ELEMENTS // vocab))


def _chunk_logits(h, weight, bias) -> torch.Tensor:
    """A chunk's (c, V) float32 logits, written into one buffer kept across chunks and steps: a fresh 64 MiB
    tensor per chunk costs more in page faults on a CPU than its matmul does (glibc hands large blocks back to
    the OS when freed; measured 150 ms against 81 ms into a kept buffer for 333 x 128 x 50,257)."""
    if weight.dtype != torch.float32 or torch.compiler.is_compiling():  # bf16/fp16: GPU allocators cache anyway;
        return F.linear(h, weight, bias).float()                         # a compiled graph plans its own memory
    key, size = (h.device, weight.dtype), h.size(0) * weight.size(0)
    if key not in _scratch or _scratch[key].numel() < size:
        _scratch[key] = torch.empty(max(size, chunk_tokens(weight.size(0)) * weight.size(0)), dtype=weight.dtype,
                                    device=h.device)
    out = _scratch[key][:size].view(h.size(0), weight.size(0))
    h = h.to(weight.dtype)
    return torch.addmm(bias, h, weight.t(), out=out) if bias is not None else torch.mm(h, weight.t(), out=out)


def _chunk_nll(h, y, weight, bias) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk's per-token NLL (c,) in float32, with exp(logits - max) (c, V) in the logits' own memory and its
    row sums (c,): the softmax is the one divided by the other (one exp pass, no temporary of the logits' size)."""
    z = _chunk_logits(h, weight, bias)
    z.sub_(z.amax(dim=1, keepdim=True))  # stable: the largest logit of each token is now 0
    picked = z.gather(1, y[:, None]).squeeze(1)
    total = z.exp_().sum(dim=1)
    return total.log() - picked, z, total


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, y_i) / N over N tokens (N = `divisor`, default the token count; targets equal to
    IGNORE add nothing and get no gradient), computed a chunk of tokens at a time.

    Forward computes, per chunk, the logits, the loss and the gradients with respect to the hidden states and
    the output weight (and bias), in one reused buffer: peak memory is one chunk's logits instead of N x V
    three times over (logits, softmax, their gradient). The matmuls are the model's own (2NVH forward, 4NVH
    backward), so FLOPs per token and MFU are unchanged.

        d loss / d logits_i = (softmax(logits_i) - onehot(y_i)) / N
        d h_i = (d logits_i) W          d W = sum_i (d logits_i)^T h_i          d b = sum_i d logits_i
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, divisor=None):
        masked = bool((targets == IGNORE).any())
        if divisor is None:  # the mean over the labels
            divisor = int((targets != IGNORE).sum()) if masked else hidden.size(0)
        n, chunk = divisor, chunk_tokens(weight.size(0))
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        gh = torch.empty_like(hidden) if need[0] else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need[2] else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for s in range(0, hidden.size(0), chunk):
            h, y = hidden[s:s + chunk], targets[s:s + chunk]
            keep = y != IGNORE
            y = y.clamp(min=0) if masked else y
            nll, e, sums = _chunk_nll(h, y, weight, bias)
            total += (nll * keep if masked else nll).double().sum()
            g = e.div_(sums[:, None] * n)  # softmax / N, in place
            g[torch.arange(g.size(0), device=g.device), y] -= 1.0 / n
            if masked:
                g.mul_(keep[:, None])  # an ignored target: no gradient
            if gh is not None:
                gh[s:s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if gw is not None:
                gw.addmm_(g.t(), h.float())
            if gb is not None:
                gb += g.sum(0)
        ctx.grads = (gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype))
        return (total / n).float()

    @staticmethod
    def backward(ctx, grad_loss):
        gh, gw, gb = (None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads)
        return gh, gw, gb, None, None


@torch.no_grad()
def chunked_nll_sum(hidden: torch.Tensor, weight, bias, targets: torch.Tensor) -> torch.Tensor:
    """Eval: the float64 sum of per-token (float32) NLL over targets that are not IGNORE, a chunk at a time."""
    chunk, total = chunk_tokens(weight.size(0)), torch.zeros((), dtype=torch.float64, device=hidden.device)
    for s in range(0, hidden.size(0), chunk):
        y = targets[s:s + chunk]
        keep = y != IGNORE
        total += (_chunk_nll(hidden[s:s + chunk], y.clamp(min=0), weight, bias)[0] * keep).double().sum()
    return total


class FusedOutput(dict):
    """The fused forward's output: `loss` (the model's whole objective, differentiable in training), `ce` (its
    cross-entropy part, as reduced), `extra` (loss - ce: what the model adds itself), `nll_sum` (float64
    cross-entropy sum, eval), and what the model returned beside them (`aux_loss`, `router_logits`)."""

    def __getattr__(self, name):
        return self.get(name)


def unsupported(hf) -> str | None:
    """Why the fused path cannot stand in for this model's own loss (None: it can)."""
    head = hf.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        return "no output embedding layer"
    scaled = [k for k in UNSUPPORTED if getattr(hf.config.get_text_config(), k, None) not in (None, 1, 1.0)]
    return f"its logits are rescaled ({', '.join(scaled)})" if scaled else None


def install(model, enabled: bool) -> str:
    """Route the loss of `model` (a causal LM, or a peft model around one) through the fused path. Given `labels`,
    the model's OWN forward runs with two stand-ins for that call: its output layer passes the hidden states
    through, and its `loss_function` (the hook every transformers causal LM computes its cross-entropy with) is
    the chunked one. Whatever else the model adds to that cross-entropy (a router's load-balancing loss times
    router_aux_loss_coef, a z-loss) it adds as it always does: the objective is the model's own, without naming
    any term. Without labels (generation) nothing is replaced. -> which loss is used, in words, for the console."""
    from distclm.lora import base_model

    hf = base_model(model)
    if not enabled:
        return "the model's own (logits materialised; --train.fused_loss=false)"
    why = unsupported(hf)
    if why:
        return f"the model's own: {why}"
    own, head, liger = hf.forward, hf.get_output_embeddings(), _liger()
    own_head, state = head.forward, {"fused": False, "reduction": "mean"}

    def head_forward(hidden, *args, **kwargs):  # (B, T, H) -> itself while the fused loss runs
        return hidden if state["fused"] else own_head(hidden, *args, **kwargs)

    def loss_function(logits, labels, vocab_size=None, **kwargs):  # `logits` are the (B, T, H) hidden states here
        h = logits[:, :-1].reshape(-1, logits.size(-1))  # (B x (T-1), H): every position predicts the next
        y = labels[:, 1:].reshape(-1).to(h.device)
        if not torch.is_grad_enabled():
            state["nll_sum"] = chunked_nll_sum(h, head.weight, head.bias, y)
            state["ce"] = (state["nll_sum"] / (y != IGNORE).sum()).float()
        elif liger is not None and h.is_cuda:
            state["nll_sum"], state["ce"] = None, liger[state["reduction"]](head.weight, h, y, head.bias)
        else:
            divisor = 1 if state["reduction"] == "sum" else None  # sum: the caller scales it (masked folders)
            state["nll_sum"], state["ce"] = None, ChunkedLinearCrossEntropy.apply(h, head.weight, head.bias, y, divisor)
        # A copy to the model: its own terms are added in place (`loss += coef * aux_loss`), which must not reach
        # the cross-entropy kept here.
        return state["ce"].clone()

    def forward(input_ids=None, labels=None, position_ids=None, use_cache=None, reduction="mean", **kwargs):
        """`reduction`: mean over the labels (the model's own), or sum (a masked batch's caller scales it)."""
        if labels is None:
            return own(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache, **kwargs)
        for key in ("nll_sum", "ce"):
            state.pop(key, None)
        state["fused"], state["reduction"] = True, reduction
        try:
            out = own(input_ids=input_ids, labels=labels, position_ids=position_ids, use_cache=False, **kwargs)
        finally:
            state["fused"], state["reduction"] = False, "mean"
        if "ce" not in state:
            raise RuntimeError(f"{type(hf).__name__} computes its loss without `loss_function`: the fused loss "
                               f"cannot stand in for it; train with --train.fused_loss=false")
        return FusedOutput(loss=out.loss, ce=state["ce"], extra=out.loss - state["ce"], nll_sum=state["nll_sum"],
                           aux_loss=getattr(out, "aux_loss", None), router_logits=getattr(out, "router_logits", None))

    head.forward, hf.loss_function = head_forward, loss_function
    hf.forward, hf.distclm_fused_loss = forward, True
    if liger is not None and torch.cuda.is_available():
        return "fused linear + cross-entropy: liger-kernel's (Triton, CUDA)"
    vocab = hf.config.get_text_config().vocab_size
    return f"fused linear + cross-entropy, {chunk_tokens(vocab)}-token chunks (logits never materialised)"


def _liger():
    """liger-kernel's fused linear cross-entropy when it is installed and a GPU is there, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return {r: LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction=r) for r in ("mean", "sum")}


def unwrapped(model):
    """The Hugging Face model under any wrapper (DDP, DeepSpeed, torch.compile, peft)."""
    from distclm.lora import base_model

    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    return base_model(model)


def is_fused(model) -> bool:
    """Whether the model under any wrapper has the fused loss installed."""
    return bool(getattr(unwrapped(model), "distclm_fused_loss", False))
