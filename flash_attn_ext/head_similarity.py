"""`--method similarity` of the MHA -> GQA converter: which heads share a group.

Mean pooling replaces the keys and values of a group's heads by their mean (a linear map, so
the pooled head's keys are the mean of the heads' keys on any input). What a group loses is the
spread of its heads around that mean. The paper pools contiguous heads; here heads are grouped
by how close their keys and values are on calibration text, then the heads are permuted so
each group is contiguous, and the usual mean pooling follows.

The permutation moves whole heads: K/V head a and the query heads that attend to it move
together (rows of q_proj, k_proj, v_proj and their biases, columns of o_proj), which leaves
the layer's function unchanged before pooling. RoPE rotates every head by the same angle at a
position, so distances between pre-RoPE keys (what k_proj outputs, captured here) are the
distances between the rotated keys.

    acts = collect_kv_activations(model, [token_ids, ...])      # {module prefix: (K, V)}
    perms = {prefix: group_heads(k, v, num_kv_heads, kv_heads) for prefix, (k, v) in acts.items()}
    new_sd = permute_heads(state_dict, perms, q_heads, kv_heads, head_dim)   # then pool as "mean"
"""

import re
from typing import Dict, Iterable, List, Tuple

import torch

_PROJ = re.compile(r"^(?P<prefix>.*)\.(?P<proj>q_proj|k_proj|v_proj|o_proj)\.(?P<kind>weight|bias)$")


@torch.no_grad()
def collect_kv_activations(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], max_tokens: int = 4096
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Runs model(batch) on each batch of token ids and returns, for every attention module
    (the prefix of its `k_proj` / `v_proj` submodules), the outputs of k_proj and v_proj as
    float32 (tokens, kv_heads * head_dim) matrices, at most max_tokens rows each."""
    names = dict(model.named_modules())
    captured: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    hooks = []
    for name, module in names.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("k_proj", "v_proj") and isinstance(module, torch.nn.Linear):
            prefix = name[: -len(leaf) - 1]

            def hook(_mod, _inp, out, prefix=prefix, leaf=leaf):
                store = captured.setdefault(prefix, {"k_proj": [], "v_proj": []})[leaf]
                if sum(t.shape[0] for t in store) < max_tokens:
                    store.append(out.detach().reshape(-1, out.shape[-1]).float().cpu())

            hooks.append(module.register_forward_hook(hook))
    if not hooks:
        raise ValueError("the model has no k_proj / v_proj linear layers to calibrate on")
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {
        prefix: (torch.cat(d["k_proj"])[:max_tokens], torch.cat(d["v_proj"])[:max_tokens])
        for prefix, d in captured.items()
    }


def _group_cost(dist: torch.Tensor, groups: List[List[int]]) -> float:
    return float(sum(dist[g][:, g].sum() for g in groups))


def _distances(k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    tokens = k.shape[0]
    kh = k.reshape(tokens, heads, -1).transpose(0, 1).reshape(heads, -1).double()
    vh = v.reshape(tokens, heads, -1).transpose(0, 1).reshape(heads, -1).double()
    kh = kh / kh.norm(dim=1).mean().clamp_min(1e-12)
    vh = vh / vh.norm(dim=1).mean().clamp_min(1e-12)
    return torch.cdist(kh, kh) ** 2 + torch.cdist(vh, vh) ** 2


def grouping_spread(k: torch.Tensor, v: torch.Tensor, heads: int, order: List[int], num_groups: int) -> float:
    """The cost group_heads minimises, for the groups that contiguous pooling of `order` forms."""
    r = heads // num_groups
    return _group_cost(_distances(k, v, heads), [order[g * r : (g + 1) * r] for g in range(num_groups)])


def group_heads(k: torch.Tensor, v: torch.Tensor, num_groups: int, heads: int) -> List[int]:
    """Partitions the K/V heads of one layer into num_groups equal groups of heads whose keys
    and values are close, and returns the new head order (groups contiguous, in order of their
    smallest old head; each group sorted).

    k, v: (tokens, heads * head_dim) outputs of k_proj and v_proj on calibration tokens. The
    cost of a group is the sum of squared distances between its heads' keys (each head's keys
    scaled by the mean key norm of the layer, likewise values), which is proportional to
    what mean pooling discards. Greedy seeding, then pairwise swaps between groups while the
    total cost drops (heads per layer are few: this is exact enough and fast)."""
    dist = _distances(k, v, heads)
    r = heads // num_groups
    if r == 1 or num_groups == 1:
        return list(range(heads))
    # Seeding: a group starts at the lowest unassigned head and takes its r - 1 nearest.
    free = list(range(heads))
    groups: List[List[int]] = []
    while free:
        seed = free[0]
        rest = sorted(free[1:], key=lambda h: (float(dist[seed, h]), h))[: r - 1]
        group = [seed] + rest
        groups.append(group)
        free = [h for h in free if h not in group]
    # Local search: swap two heads of different groups while it lowers the total cost.
    cost = _group_cost(dist, groups)
    improved = True
    while improved:
        improved = False
        for gi in range(len(groups)):
            for gj in range(gi + 1, len(groups)):
                for a in range(r):
                    for b in range(r):
                        ga, gb = list(groups[gi]), list(groups[gj])
                        ga[a], gb[b] = gb[b], ga[a]
                        trial = groups[:gi] + [ga] + groups[gi + 1 : gj] + [gb] + groups[gj + 1 :]
                        new_cost = _group_cost(dist, trial)
                        if new_cost < cost - 1e-12 * max(1.0, cost):
                            groups, cost, improved = trial, new_cost, True
    groups = sorted(sorted(g) for g in groups)
    return [h for g in groups for h in g]


def head_index(order: List[int], head_dim: int) -> torch.Tensor:
    """Row indices of a (heads * head_dim, ...) projection reordered to heads `order`."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in order])


def permute_tensor(
    name: str, t: torch.Tensor, perms: Dict[str, List[int]], q_heads: int, kv_heads: int, head_dim: int
) -> torch.Tensor:
    """t reordered by the K/V head order perms[prefix] of its attention module (unchanged if
    the name is not a q/k/v/o projection of a module in perms). Query heads move with their
    K/V head: K/V head a owns query heads [a * q_per_kv, (a + 1) * q_per_kv)."""
    m = _PROJ.match(name)
    if m is None or m["prefix"] not in perms:
        return t
    order = perms[m["prefix"]]
    if sorted(order) != list(range(kv_heads)):
        raise ValueError(f"head order for {m['prefix']} is not a permutation of {kv_heads} heads: {order}")
    q_per_kv = q_heads // kv_heads
    if m["proj"] in ("k_proj", "v_proj"):
        return t.index_select(0, head_index(order, head_dim))
    q_order = [a * q_per_kv + i for a in order for i in range(q_per_kv)]
    idx = head_index(q_order, head_dim)
    if m["proj"] == "q_proj":
        return t.index_select(0, idx)
    if m["kind"] == "bias":  # o_proj's bias is per output feature: unchanged
        return t
    return t.index_select(1, idx)  # o_proj weight: its input features are the heads' outputs
