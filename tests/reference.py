"""An independent, slow, per-token reference of the MoE layer's semantics (issue 2).

Written from the issue text, not from epar's routing or dispatch code: Python loops over
tokens and experts, selection decided on Python floats, and every number that carries a
gradient computed with plain torch ops on one token at a time. It only reads the layer's
parameters (through `layer_params`), so gradients come from autograd through this file.

Decisions the reference follows (the issue leaves them open; epar documents them):
- token choice: ties in `scores + expert_bias` break toward the lower expert index;
- token_drop "probs": within an expert, slots ranked by the unbiased score scores[t, e]
  (not the normalised weight), ties lower token index first;
- token_drop "position": slots ranked by (choice rank j, token index t);
- expert_choice: expert e ranks tokens by scores[t, e] + expert_bias[e], ties lower token
  index; weight = unbiased scores[t, e]; dropped_slots = 0; no load-balancing aux term;
- capacity C = ceil(capacity_factor * T * top_k / E), min(T, C) for expert_choice;
- group-limited routing: experts 0..E-1 in num_expert_groups groups of consecutive ids;
  a group scores the sum of its two highest `scores + expert_bias` (its only one for
  groups of one expert); a token keeps its topk_groups best groups, ties lower group index;
- routed_scaling_factor multiplies the weighted sum of the routed experts, not the shared;
- aux_loss_scope "sequence": the balancing term per sequence (x [..., S, D]; a 2-D x is one
  sequence), averaged over sequences; "global" without a group is "micro_batch".

Meant for eval mode (no jitter, no noise) and float64 inputs: selection compares Python
floats (doubles), which matches the layer exactly only when the router runs in float64.
"""

from __future__ import annotations

import math

import torch

PARAM_NAMES = ("router.weight", "experts.w_in", "experts.w_out",
               "shared_expert.w_in", "shared_expert.w_out", "shared_expert.gate")


def layer_params(layer, requires_grad: bool = True) -> dict:
    """Detached clones of the layer's parameters (by their public names), plus the bias."""
    own = dict(layer.named_parameters())
    params = {}
    for name in PARAM_NAMES:
        if name in own:
            params[name] = own[name].detach().clone().requires_grad_(requires_grad)
    params["router.expert_bias"] = layer.router.expert_bias.detach().clone()
    return params


def _act(h: torch.Tensor, activation: str, d_ff: int) -> torch.Tensor:
    """One token's hidden vector h [n_in] -> activated [d_ff]."""
    if activation == "swiglu":
        gate, up = h[:d_ff], h[d_ff:]
        return gate * torch.sigmoid(gate) * up  # silu(g) * u
    if activation == "gelu":
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact (erf) GELU
    if activation == "relu":
        return torch.where(h > 0, h, torch.zeros_like(h))
    raise AssertionError(activation)


def _ffn(x_D: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, activation: str, d_ff: int):
    h = torch.mv(w_in.t(), x_D)  # x @ W_in
    return torch.mv(w_out.t(), _act(h, activation, d_ff))  # act(.) @ W_out


def _capacity(cfg, T: int) -> int:
    c = math.ceil(cfg.capacity_factor * T * cfg.top_k / cfg.num_experts)
    return min(T, c) if cfg.strategy == "expert_choice" else c


def reference_forward(cfg, x: torch.Tensor, params: dict, trace: dict | None = None):
    """Returns (y, aux_loss, tokens_per_expert list[int], dropped_slots int). A `trace`
    dict receives the routing: "choice" (token choice: each token's experts in rank
    order, else None) and "kept" ((token, expert, weight) in the order they were kept)."""
    D, E, k = cfg.d_model, cfg.num_experts, cfg.top_k
    lead = x.shape[:-1]
    xs = x.reshape(-1, D)
    T = xs.shape[0]
    dtype = torch.promote_types(x.dtype, torch.float32)
    W_r = params["router.weight"].to(dtype)
    bias = [float(b) for b in params["router.expert_bias"].tolist()]

    # ---- router, one token at a time --------------------------------------------
    logits, scores = [], []
    for t in range(T):
        lt = torch.stack([torch.dot(xs[t].to(dtype), W_r[e]) for e in range(E)])
        if cfg.score_func == "softmax":
            ex = torch.exp(lt - lt.max().detach())
            st = ex / ex.sum()
        else:
            st = 1.0 / (1.0 + torch.exp(-lt))
        logits.append(lt)
        scores.append(st)
    s_val = [[float(v) for v in st.tolist()] for st in scores]  # plain numbers for selection

    # ---- routing: a list of kept (token, expert, weight) --------------------------
    kept: list[tuple[int, int, torch.Tensor]] = []
    dropped = 0
    if cfg.strategy in ("dropless", "token_drop"):
        choice = []  # choice[t] = experts in rank order
        G = cfg.num_expert_groups
        kept_groups = G if cfg.topk_groups is None else cfg.topk_groups
        n = E // G
        for t in range(T):
            allowed = list(range(E))
            if kept_groups < G:
                group_score = []
                for g in range(G):
                    members = sorted((s_val[t][e] + bias[e] for e in range(g * n, (g + 1) * n)),
                                     reverse=True)
                    group_score.append(sum(members[:2]))
                best = sorted(range(G), key=lambda g: (-group_score[g], g))[:kept_groups]
                allowed = [e for e in range(E) if e // n in best]
            ranked = sorted(allowed, key=lambda e: (-(s_val[t][e] + bias[e]), e))
            choice.append(ranked[:k])

        def weight(t, e):
            w = scores[t][e]
            if cfg.normalize_topk:
                w = w / sum(scores[t][c] for c in choice[t])
            return w

        if cfg.strategy == "dropless":
            kept = [(t, e, weight(t, e)) for t in range(T) for e in choice[t]]
        else:
            C = _capacity(cfg, T)
            for e in range(E):
                slots = [(t, j) for t in range(T) for j in range(k) if choice[t][j] == e]
                if cfg.drop_policy == "probs":
                    slots.sort(key=lambda tj: (-s_val[tj[0]][e], tj[0]))
                else:  # position
                    slots.sort(key=lambda tj: (tj[1], tj[0]))
                for t, _ in slots[:C]:
                    kept.append((t, e, weight(t, e)))
                dropped += max(0, len(slots) - C)
    else:  # expert_choice
        C = _capacity(cfg, T)
        for e in range(E):
            ranked = sorted(range(T), key=lambda t: (-(s_val[t][e] + bias[e]), t))
            for t in ranked[:C]:
                kept.append((t, e, scores[t][e]))

    if trace is not None:
        trace.update(choice=choice if cfg.strategy != "expert_choice" else None, kept=kept)
    tokens_per_expert = [0] * E
    for _, e, _ in kept:
        tokens_per_expert[e] += 1

    # ---- experts and combine, per token --------------------------------------------
    acc = dtype
    act, F_ = cfg.activation, cfg.d_ff
    w_in, w_out = params["experts.w_in"], params["experts.w_out"]
    ys = []
    for t in range(T):
        x_t = xs[t]
        y_t = torch.zeros(D, dtype=acc)
        for tt, e, w in kept:
            if tt != t:
                continue
            out = _ffn(x_t, w_in[e].to(x.dtype), w_out[e].to(x.dtype), act, F_)
            y_t = y_t + w.to(acc) * out.to(acc)
        y_t = cfg.routed_scaling_factor * y_t
        if "shared_expert.w_in" in params:
            sh = _ffn(x_t, params["shared_expert.w_in"].to(x.dtype),
                      params["shared_expert.w_out"].to(x.dtype), act, cfg.shared_expert_d_ff)
            if "shared_expert.gate" in params:
                g = torch.dot(x_t, params["shared_expert.gate"].to(x.dtype))
                sh = sh * (1.0 / (1.0 + torch.exp(-g)))
            y_t = y_t + sh.to(acc)
        ys.append(y_t)
    y = (torch.stack(ys) if ys else xs.new_zeros(0, D, dtype=acc)).to(x.dtype).reshape(*lead, D)

    # ---- aux loss -------------------------------------------------------------------
    aux = (W_r * 0.0).sum()  # a zero that depends on the router weight
    if T > 0:
        if cfg.aux_loss_coef > 0 and cfg.strategy != "expert_choice":
            # One sequence of all T tokens, unless the scope is "sequence".
            S = T
            if cfg.aux_loss_scope == "sequence" and x.dim() >= 3:
                S = x.shape[-2]
            seq_terms = []
            for first in range(0, T, S):
                toks = range(first, first + S)
                term = 0.0
                for e in range(E):
                    f_e = sum(1 for t in toks if e in choice[t]) / (S * k)
                    P_e = sum(scores[t][e] / scores[t].sum() for t in toks) / S
                    term = term + f_e * P_e
                seq_terms.append(term)
            aux = aux + cfg.aux_loss_coef * E * sum(seq_terms) / len(seq_terms)
        if cfg.z_loss_coef > 0:
            z = 0.0
            for t in range(T):
                m = logits[t].max().detach()
                lse = m + torch.log(torch.exp(logits[t] - m).sum())
                z = z + lse * lse
            aux = aux + cfg.z_loss_coef * z / T
    return y, aux, tokens_per_expert, dropped
