"""NemotronH mixers: Mamba-2, GQA attention (no positional embeddings), squared-ReLU MLP, MoE.

Every mixer maps hidden states [T, hidden] of a flat token batch to [T, hidden]. Parameter names
follow the Hugging Face checkpoints (`backbone.layers.N.mixer.*`), except that routed experts are
stacked into one [E, ...] tensor per projection (the loader stacks them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agentrt.kernels import cpu as cpu_kernels
from agentrt.kernels import use_triton
from agentrt.kernels.mamba import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    gated_rmsnorm_ref,
    selective_state_update,
    ssd_scan,
)
from agentrt.kernels.moe import moe_experts, relu2_fresh

from .config import ModelConfig
from .state import StateView


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in fp32: on CPU one pass in C where no gradient is
        # wanted, else torch's rms_norm (the same bits as the five operators it stands for)
        if x.dtype == self.weight.dtype == torch.float32:
            if cpu_kernels.rms_norm_fits(x, self.weight):
                return cpu_kernels.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint names) that on CPU, in float32 and where no
    gradient is wanted, multiplies in C from a copy of its weight packed for that kernel: at decode
    sizes about twice torch's speed (docs/kernels.md). The copy is made at first use and again
    whenever the weight changes (a load, an optimizer step, a move; after a write through `.data`,
    which torch does not version, call `drop_packed`). `relu2=True` returns relu(.)^2 of the output,
    in the same pass on the C path."""

    _packed: cpu_kernels.PackedLinear | None = None

    def forward(self, x: torch.Tensor, relu2: bool = False) -> torch.Tensor:
        if cpu_kernels.linear_fits(x, self.weight):
            if self._packed is None or self._packed.stale(self.weight, self.bias):
                self._packed = cpu_kernels.PackedLinear(self.weight, self.bias)
            return cpu_kernels.linear(x, self._packed, relu2)
        y = F.linear(x, self.weight, self.bias)
        return relu2_fresh(y) if relu2 else y


def drop_packed(module: nn.Module) -> int:
    """Forget the packed weight copies of every layer under `module` (they are rebuilt at next use);
    returns how many were dropped. Writes through the version counter (`copy_` under `no_grad`,
    `load_state_dict`, an optimizer step) are noticed on their own; writes through `.data` are not."""
    dropped = 0
    for m in module.modules():
        for name in [n for n in vars(m) if n.startswith("_packed")]:
            dropped += getattr(m, name) is not None
            delattr(m, name)
    return dropped


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).square()


ACTIVATIONS = {"relu2": relu2, "silu": F.silu}
CPU_SCAN_CHUNK = 32  # the scan's result does not depend on the chunk length; short ones pad less on CPU


class MLP(nn.Module):
    """down(act(up(x))) — no gate (NemotronH MLPs and shared experts are not gated)."""

    def __init__(self, config: ModelConfig, intermediate: int):
        super().__init__()
        self.up_proj = Linear(config.hidden_size, intermediate, bias=config.mlp_bias)
        self.down_proj = Linear(intermediate, config.hidden_size, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.mlp_hidden_act]

    def forward(self, x: torch.Tensor, view: StateView | None = None) -> torch.Tensor:
        if self.act is relu2:
            return self.down_proj(self.up_proj(x, relu2=True))
        return self.down_proj(self.act(self.up_proj(x)))


class Router(nn.Module):
    """Sigmoid router with a score-correction bias and group-limited top-k (DeepSeek-V3 style)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))
        # kept in fp32 whatever the model dtype, as in the reference checkpoints
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.normalize, self.scale = config.norm_topk_prob, config.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, hidden] -> (expert ids [T, k], weights [T, k] fp32)
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias.float()  # the bias steers selection only
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], -torch.inf).view_as(choice)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scale


class Experts(nn.Module):
    """Routed experts, stacked: up_proj [E, I, Din], down_proj [E, Din, I] (Din = latent or hidden).

    On CPU in float32 (no gradient wanted) they run in C from packed copies of the weights, made at
    first use and again when the weights change, as `Linear` does."""

    _packed: cpu_kernels.PackedExperts | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        d_in = config.moe_latent_size or config.hidden_size
        E, inter = config.n_routed_experts, config.moe_intermediate_size
        self.up_proj = nn.Parameter(torch.empty(E, inter, d_in))
        self.down_proj = nn.Parameter(torch.empty(E, d_in, inter))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if use_triton(x.device):
            from agentrt.kernels.triton_moe import moe_experts as moe_experts_triton

            return moe_experts_triton(x, self.up_proj, self.down_proj, ids, weights)
        if cpu_kernels.moe_experts_packed_fits(x, self.up_proj):
            if self._packed is None or self._packed.stale(self.up_proj, self.down_proj):
                self._packed = cpu_kernels.PackedExperts(self.up_proj, self.down_proj)
            return cpu_kernels.moe_experts_packed(x, self._packed, ids, weights)
        return moe_experts(x, self.up_proj, self.down_proj, ids, weights)


class MoE(nn.Module):
    """Routed experts (optionally in a LatentMoE latent space) plus an always-on shared expert."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = MLP(config, config.moe_shared_expert_intermediate_size)
        latent = config.moe_latent_size
        if latent is not None:
            self.fc1_latent_proj = Linear(config.hidden_size, latent, bias=config.mlp_bias)
            self.fc2_latent_proj = Linear(latent, config.hidden_size, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

    def forward(self, x: torch.Tensor, view: StateView | None = None) -> torch.Tensor:
        ids, weights = self.gate(x)
        h = x if self.fc1_latent_proj is None else self.fc1_latent_proj(x)
        h = self.experts(h, ids, weights)
        if self.fc2_latent_proj is not None:
            h = self.fc2_latent_proj(h)
        return h + self.shared_experts(x)


class Attention(nn.Module):
    """Grouped-query attention with no positional embedding; the cache lives behind the view."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.heads * self.head_dim, hidden, bias=False)

    _packed_qkv: cpu_kernels.PackedLinear | None = None

    def forward(self, x: torch.Tensor, view: StateView) -> torch.Tensor:
        T = x.shape[0]
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if cpu_kernels.linear_fits(x, self.q_proj.weight):  # the three in one call
            sources = [p.weight for p in projections] + [p.bias for p in projections]
            if self._packed_qkv is None or self._packed_qkv.stale(*sources):
                self._packed_qkv = cpu_kernels.PackedLinear(sources[:3], sources[3:])
            q, k, v = cpu_kernels.linear(x, self._packed_qkv).split(self._packed_qkv.splits, dim=1)
        else:
            q, k, v = (p(x) for p in projections)
        q = q.view(T, self.heads, self.head_dim)
        k = k.view(T, self.kv_heads, self.head_dim)
        v = v.view(T, self.kv_heads, self.head_dim)
        return self.o_proj(view.attention(self.layer, q, k, v).reshape(T, -1))


class Mamba2Mixer(nn.Module):
    """Mamba-2: in-projection, causal depthwise conv, SSD scan, gated RMSNorm, out-projection."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.head_dim = config.mamba_num_heads, config.mamba_head_dim
        self.groups, self.state_size = config.n_groups, config.ssm_state_size
        self.inner, self.conv_dim = config.mamba_intermediate, config.conv_dim
        self.chunk_size = config.chunk_size
        self.dt_min, self.eps = config.time_step_min, config.layer_norm_epsilon
        self.in_proj = Linear(config.hidden_size, self.inner + self.conv_dim + self.heads, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim, bias=config.use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.ones(self.heads))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = RMSNorm(self.inner, config.layer_norm_epsilon)  # weight only; applied gated, per group
        self.out_proj = Linear(self.inner, config.hidden_size, bias=config.use_bias)

    def forward(self, x: torch.Tensor, view: StateView) -> torch.Tensor:
        # x: [T, hidden]
        zxbcdt = self.in_proj(x)
        pools = view.mamba_pools(self.layer) if hasattr(view, "mamba_pools") else None
        if pools is not None and cpu_kernels.mamba_mix_fits(zxbcdt, pools[0], pools[1]):
            # CPU, states in pool slots: the C kernel, in place (the same arithmetic as below)
            y = cpu_kernels.mamba_mix(
                zxbcdt, view.cu_seqlens, pools[2], pools[0], pools[1], heads=self.heads, groups=self.groups,
                dt_bias=self.dt_bias, A_log=self.A_log, D=self.D, conv_weight_t=self._conv_weight_t(),
                conv_bias=self.conv1d.bias, norm_weight=self.norm.weight, dt_min=self.dt_min, eps=self.eps,
                group_size=self.inner // self.groups)
            return self.out_proj(y.to(x.dtype))
        gate, xBC, dt = zxbcdt.split([self.inner, self.conv_dim, self.heads], dim=-1)
        # dt: softplus(dt + bias), clamped below at time_step_min as the reference prefill does
        dt = F.softplus(dt + self.dt_bias).clamp(min=self.dt_min)
        A = -torch.exp(self.A_log.float())
        if getattr(view, "kernels", False):
            return self.out_proj(self._mix_with_kernels(gate, xBC, dt, A, view))
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        conv, ssm = view.mamba_states(self.layer)  # [B, C, K-1], [B, H, P, N]
        y = torch.empty(x.shape[0], self.heads, self.head_dim, dtype=torch.float32, device=x.device)

        lens = view.seq_lens
        starts = [sum(lens[:i]) for i in range(len(lens))]
        single = [i for i, n in enumerate(lens) if n == 1]
        if single:  # decode: one recurrent step for all one-token sequences at once
            every = len(single) == len(lens)
            rows = None if every else torch.tensor(single, device=x.device)
            tok = torch.tensor([starts[i] for i in single], device=x.device)
            c_rows, s_rows = (conv, ssm) if every else (conv[rows], ssm[rows])
            h = causal_conv1d_update_ref(xBC[tok], c_rows, weight, bias)
            xs, B, C = self._split(h)
            y[tok] = selective_state_update(s_rows, xs, dt[tok], A, B, C, self.D).float()
            if not every:
                conv[rows], ssm[rows] = c_rows, s_rows
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(lens):
            if n > 1:
                by_length.setdefault(n, []).append(i)
        for n, group in by_length.items():  # prefill: equal-length sequences scan together
            idx = torch.tensor(group, device=x.device)
            pos = (torch.tensor([starts[i] for i in group], device=x.device)[:, None]
                   + torch.arange(n, device=x.device)).reshape(-1)
            h, conv[idx] = causal_conv1d_ref(xBC[pos].view(len(group), n, -1), weight, bias, conv[idx])
            xs, B, C = self._split(h.reshape(len(group) * n, -1))
            out, ssm[idx] = ssd_scan(
                xs.view(len(group), n, self.heads, self.head_dim), dt[pos].view(len(group), n, -1), A,
                B.view(len(group), n, self.groups, -1), C.view(len(group), n, self.groups, -1),
                self.D, self.chunk_size if x.is_cuda else min(self.chunk_size, CPU_SCAN_CHUNK), ssm[idx],
            )
            y[pos] = out.reshape(len(group) * n, self.heads, self.head_dim).float()
        view.set_mamba_states(self.layer, conv, ssm)

        y = gated_rmsnorm_ref(y.view(x.shape[0], -1), gate, self.norm.weight, self.inner // self.groups, self.eps)
        return self.out_proj(y)

    def _mix_with_kernels(self, gate: torch.Tensor, xBC: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
                          view) -> torch.Tensor:
        """The Triton path (`KernelView`): states updated in their pool slots. -> [T, inner]"""
        from agentrt.kernels.triton_mamba import (
            causal_conv1d_update_slots,
            causal_conv1d_varlen,
            gated_rmsnorm,
            selective_state_update_slots,
        )
        from agentrt.kernels.triton_ssd import ssd_scan_varlen

        T = xBC.shape[0]
        conv_pool, ssm_pool = view.states.conv[self.layer], view.states.ssm[self.layer]
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        y = torch.empty(T, self.heads, self.head_dim, dtype=xBC.dtype, device=xBC.device)
        if len(view.decode_tok):  # one-token sequences: conv window shift + one recurrent step, in place
            tok = view.decode_tok
            h = causal_conv1d_update_slots(xBC[tok], conv_pool, view.decode_slots, weight, bias)
            xs, B, C = self._split(h)
            y[tok] = selective_state_update_slots(ssm_pool, view.decode_slots, xs[:, None], dt[tok][:, None], A,
                                                  B[:, None], C[:, None], self.D)[:, 0]
        if view.prefill_tok is not None:  # the rest: chunk-aligned varlen conv and scan
            tok = view.prefill_tok
            h = causal_conv1d_varlen(xBC[tok], weight, bias, conv_pool, view.prefill_slots, view.prefill_initial,
                                     view.prefill_cu, max_seqlen=view.prefill_max)
            xs, B, C = self._split(h)
            y[tok] = ssd_scan_varlen(xs, dt[tok], A, B, C, self.D, self.chunk_size, view.prefill_cu, ssm_pool,
                                     view.prefill_slots, view.prefill_initial)
        return gated_rmsnorm(y.view(T, -1), gate, self.norm.weight, self.inner // self.groups, self.eps)

    def _conv_weight_t(self) -> torch.Tensor:
        """The conv weight tap-major ([K, conv_dim], contiguous), as the C kernel reads it; cached."""
        w = self.conv1d.weight
        key = (w.data_ptr(), w._version)
        if getattr(self, "_conv_t_key", None) != key:
            self._conv_t = w.detach()[:, 0].t().contiguous()
            self._conv_t_key = key
        return self._conv_t

    def _split(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # h: [n, conv_dim] -> x [n, H, P], B [n, G, N], C [n, G, N]
        gn = self.groups * self.state_size
        xs, B, C = h.split([self.inner, gn, gn], dim=-1)
        n = h.shape[0]
        return (
            xs.reshape(n, self.heads, self.head_dim),
            B.reshape(n, self.groups, self.state_size),
            C.reshape(n, self.groups, self.state_size),
        )


def make_mixer(config: ModelConfig, layer_type: str, layer: int) -> nn.Module:
    if layer_type == "linear_attention":
        return Mamba2Mixer(config, layer)
    if layer_type == "full_attention":
        return Attention(config, layer)
    if layer_type == "moe":
        return MoE(config)
    return MLP(config, config.intermediate_size)


class Block(nn.Module):
    """Pre-norm residual block around one mixer."""

    def __init__(self, config: ModelConfig, layer_type: str, layer: int):
        super().__init__()
        self.layer_type = layer_type
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = make_mixer(config, layer_type, layer)

    def forward(self, x: torch.Tensor, view: StateView) -> torch.Tensor:
        return x + self.mixer(self.norm(x), view)
