"""The device slots of LoRA adapters, folded into the model's projection weights.

For each fused projection p (q/k/v, o, gate/up, down) and layer l the adapters' A matrices are
extra rows under the base weight W [out, in], so one matmul gives the base output and every
slot's shrink x @ A^T at once:

    fused_w[p][l]: [out + S n_sub R, in]   rows [:out] W (the model's parameter is a view of them),
                                           rows out + s n_sub R + k R + j: row j of slot s's A of
                                           sub-module k (q/k/v or gate/up or one), zero-padded
    fused_b[p]:    [L, S, out, R]          each slot's B (scale folded in) along the output columns

S = max_loras_per_batch, R = max_lora_rank. A smaller rank, a sub-module no adapter targets and an
empty slot stay zero, which adds nothing. The no-adapter path keeps running the model's own
parameter, W's rows alone: a plain matmul, as without LoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.config.engine_config import ModelConfig
from pdserve.worker.lora.adapter import LoraAdapter, module_shapes

Tensor = torch.Tensor


def fused_slices(config: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """pdserve's fused projection -> [(PEFT module, first output column)] inside its output."""
    shapes = module_shapes(config)
    q_size, kv_size = shapes["q_proj"][1], shapes["k_proj"][1]
    inter = config.intermediate_size
    return {
        "qkv_proj": [("q_proj", 0), ("k_proj", q_size), ("v_proj", q_size + kv_size)],
        "o_proj": [("o_proj", 0)],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", inter)],
        "down_proj": [("down_proj", 0)],
    }


def model_linears(model: nn.Module) -> dict[tuple[int, str], nn.Linear]:
    """(layer, fused projection) -> the decoder's linear layer computing it."""
    from pdserve.worker.models.llama import LlamaAttention, LlamaMLP

    found: dict[tuple[int, str], nn.Linear] = {}
    for module in model.modules():
        if isinstance(module, LlamaAttention):
            projs = {"qkv_proj": module.qkv_proj, "o_proj": module.o_proj}
        elif isinstance(module, LlamaMLP):
            projs = {"gate_up_proj": module.gate_up_proj, "down_proj": module.down_proj}
        else:
            continue
        for proj, linear in projs.items():
            if (module.layer_idx, proj) in found:
                raise ValueError(f"two decoders hold layer {module.layer_idx}'s {proj}")
            found[(module.layer_idx, proj)] = linear
    return found


class LoraWeights:
    """Preallocated adapter slots on the device (see the module docstring for the layout).

    With `linears` (the model's, from `model_linears`) each fused weight adopts the base weight
    and bias and the model's parameters become views of its first rows; without, the base rows are
    zero (kernel tests and benchmarks) and `fold` is False.

    fused_a[p][l]: [S, n_sub R, in], a[module][l]: [S, R, in], b[module]: [L, S, out, R] are
    views of the slots' parts. `fold`: batches use the fused matmul (False: the base matmul, then
    a separate shrink and expand, on the same weights).
    """

    def __init__(
        self,
        config: ModelConfig,
        target_modules: tuple[str, ...],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        linears: dict[tuple[int, str], nn.Linear] | None = None,
    ) -> None:
        shapes = module_shapes(config)
        self.num_layers = config.num_layers
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.target_modules = target_modules
        self.fold = linears is not None
        self.out_features: dict[str, int] = {}
        self.fused_w: dict[str, list[Tensor]] = {}  # [out + S n_sub R, in] per layer
        self.fused_bias: dict[str, list[Tensor | None]] = {}  # [out + S n_sub R] per layer
        self.fused_a: dict[str, list[Tensor]] = {}
        self.fused_b: dict[str, Tensor] = {}
        self.bounds: dict[str, tuple[int, ...]] = {}  # proj -> first column of subs 1..
        self.a: dict[str, list[Tensor]] = {}
        self.b: dict[str, Tensor] = {}
        self.slices: dict[str, list[tuple[str, int, int]]] = {}
        for proj, subs in fused_slices(config).items():
            self.slices[proj] = [(m, col, shapes[m][1]) for m, col in subs if m in target_modules]
            if not self.slices[proj]:
                continue
            in_f = shapes[subs[0][0]][0]
            out_f = subs[-1][1] + shapes[subs[-1][0]][1]
            self.out_features[proj] = out_f
            self.bounds[proj] = tuple(col for _, col in subs[1:])
            kw = {"dtype": dtype, "device": device}
            self.fused_b[proj] = torch.zeros(config.num_layers, num_slots, out_f, max_rank, **kw)
            self._fold_layers(proj, len(subs), in_f, out_f, linears, kw)
            for k, (m, col) in enumerate(subs):
                if m in target_modules:
                    self.a[m] = [
                        a[:, k * max_rank : (k + 1) * max_rank] for a in self.fused_a[proj]
                    ]
                    self.b[m] = self.fused_b[proj][:, :, col : col + shapes[m][1]]
        if linears is not None and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # give back the replaced base weights' memory

    def _fold_layers(
        self,
        proj: str,
        n_sub: int,
        in_f: int,
        out_f: int,
        linears: dict[tuple[int, str], nn.Linear] | None,
        kw: dict,
    ) -> None:
        """Each layer's fused weight (and bias), adopting the model's base rows when given."""
        extra = self.num_slots * n_sub * self.max_rank
        self.fused_w[proj], self.fused_bias[proj], self.fused_a[proj] = [], [], []
        for layer in range(self.num_layers):
            fused = torch.zeros(out_f + extra, in_f, **kw)
            bias = None
            if linears is not None:
                bias = _adopt(linears.get((layer, proj)), fused, out_f, f"layer {layer} {proj}")
            self.fused_w[proj].append(fused)
            self.fused_bias[proj].append(bias)
            self.fused_a[proj].append(
                fused[out_f:].view(self.num_slots, n_sub * self.max_rank, in_f)
            )

    def write(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy an adapter's host weights into `slot`, zeroing what it does not adapt."""
        self.clear(slot)
        for (layer, module), (a, b) in adapter.weights.items():
            r = a.shape[0]
            self.a[module][layer][slot, :r].copy_(a)  # [r, in]
            self.b[module][layer, slot, :, :r].copy_(b)  # [out, r]

    def clear(self, slot: int) -> None:
        """Zero `slot`'s A rows and B, so it adds nothing."""
        for proj, a_layers in self.fused_a.items():
            for a in a_layers:
                a[slot].zero_()
            self.fused_b[proj][:, slot].zero_()


def _adopt(linear: nn.Linear | None, fused: Tensor, out_f: int, where: str) -> Tensor | None:
    """Copy `linear`'s weight into fused's first out_f rows and make its parameters views of them
    (the old weight is freed); the fused bias [out + extra] (zero past out), or None."""
    want = (out_f, fused.shape[1])
    if linear is None or tuple(linear.weight.shape) != want:
        got = None if linear is None else tuple(linear.weight.shape)
        raise ValueError(f"{where}: expected a linear layer of weight {list(want)}, got {got}")
    tp = getattr(linear, "tp", None)
    if tp is not None and tp.is_parallel:
        raise ValueError(f"{where}: LoRA under tensor parallelism is not supported")
    if linear.weight.dtype != fused.dtype or linear.weight.device != fused.device:
        raise ValueError(
            f"{where}: weight is {linear.weight.dtype} on {linear.weight.device}, LoRA slots "
            f"{fused.dtype} on {fused.device}"
        )
    fused[:out_f].copy_(linear.weight)
    linear.weight = nn.Parameter(fused[:out_f], requires_grad=False)
    if linear.bias is None:
        return None
    bias = torch.zeros(fused.shape[0], dtype=fused.dtype, device=fused.device)
    bias[:out_f].copy_(linear.bias)
    linear.bias = nn.Parameter(bias[:out_f], requires_grad=False)
    return bias
