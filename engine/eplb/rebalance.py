"""Live rebalance: move expert weights between ranks to a new placement, a chunk of layers at a time.

Every rank computes the same transfer plan from the same (old, new) placement (`plan_moves`, pure), so no
plan has to be sent: for each slot whose expert changes, the weights come from a slot of the same rank
that already holds that expert (a local copy), else from a rank that holds it (a point-to-point transfer;
the source is spread over the expert's holders by destination slot). Slots that keep their expert are not
touched. `apply_layers` then, for a chunk of layers: packs what each peer needs into one buffer per peer,
exchanges all buffers in one batched isend/irecv (gloo on CPU, NCCL on GPU) into staging buffers, and only
then writes the received/copied rows into the slot tensors and swaps the layer's maps - so a slot is never
overwritten before it was sent. Must run on every rank at the same step boundary, between forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from moefleet.engine.eplb.expert_location import ExpertLocation, install_maps
from torch import nn


@dataclass(frozen=True, slots=True)
class Move:
    """Slot `dst` (global physical id) gets logical expert `expert`, copied from slot `src` of the old
    placement (on the same rank: a local copy)."""

    layer: int
    dst: int
    src: int
    expert: int


def plan_moves(layer: int, old: Sequence[int], new: Sequence[int], slots_per_rank: int) -> list[Move]:
    """Pure: the copies that turn placement `old` [P] into `new` [P] (slots keeping their expert: none)."""
    holders: dict[int, list[int]] = {}
    for p, e in enumerate(old):
        holders.setdefault(e, []).append(p)
    moves = []
    for p, e in enumerate(new):
        if old[p] == e:
            continue
        rank = p // slots_per_rank
        local = [q for q in holders[e] if q // slots_per_rank == rank]
        src = local[0] if local else holders[e][p % len(holders[e])]
        moves.append(Move(layer, p, src, e))
    return moves


def slot_tensors(layer: nn.Module) -> list[torch.Tensor]:
    return list(layer.experts.slot_tensors())  # type: ignore[union-attr,operator]


def _slot_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t[0].numel() * t.element_size() for t in tensors)


def _pack(tensors: list[torch.Tensor], slot: int) -> torch.Tensor:
    """One slot's rows of every slot tensor as raw bytes (mixed dtypes, e.g. FP8 weights + scales)."""
    return torch.cat([t[slot].contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def _unpack_into(tensors: list[torch.Tensor], slot: int, flat: torch.Tensor) -> None:
    offset = 0
    for t in tensors:
        n = t[slot].numel() * t.element_size()
        # clone: a fresh, aligned buffer to reinterpret as t's dtype.
        t[slot].copy_(flat[offset : offset + n].clone().view(t.dtype).view_as(t[slot]))
        offset += n


@torch.no_grad()
def apply_layers(
    layers: Sequence[nn.Module],
    old: ExpertLocation,
    new: ExpertLocation,
    chunk: Sequence[int],
    rank: int,
    group: dist.ProcessGroup | None,
) -> int:
    """Move the weights of MoE layers `chunk` from `old` to `new` placement and install their maps; returns
    the number of slots whose expert changed (all ranks). Collective over `group` when anything moves."""
    s = new.slots_per_rank
    mine = range(rank * s, (rank + 1) * s)
    moves = [m for i in chunk for m in plan_moves(i, old.phy2log[i], new.phy2log[i], s)]
    # What leaves this rank / arrives here, per peer, in one deterministic order (layer, dst slot).
    sends: dict[int, list[Move]] = {}
    recvs: dict[int, list[Move]] = {}
    for m in moves:
        src_rank, dst_rank = m.src // s, m.dst // s
        if src_rank != dst_rank:
            if src_rank == rank:
                sends.setdefault(dst_rank, []).append(m)
            if dst_rank == rank:
                recvs.setdefault(src_rank, []).append(m)
    staged: list[tuple[Move, torch.Tensor]] = []  # (move into this rank, flat weights)
    for m in moves:  # local copies: read the old rows now, before any slot is overwritten
        if m.dst in mine and m.src in mine:
            staged.append((m, _pack(slot_tensors(layers[m.layer]), m.src - rank * s)))
    ops = []
    send_buffers = []
    for peer, peer_moves in sorted(sends.items()):
        buffer = torch.cat([_pack(slot_tensors(layers[m.layer]), m.src - rank * s) for m in peer_moves])
        send_buffers.append(buffer)
        ops.append(dist.P2POp(dist.isend, buffer, peer, group))
    recv_buffers = []
    for peer, peer_moves in sorted(recvs.items()):
        sizes = [_slot_bytes(slot_tensors(layers[m.layer])) for m in peer_moves]
        device = slot_tensors(layers[peer_moves[0].layer])[0].device
        buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        recv_buffers.append((peer_moves, sizes, buffer))
        ops.append(dist.P2POp(dist.irecv, buffer, peer, group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for peer_moves, sizes, buffer in recv_buffers:
        for m, part in zip(peer_moves, torch.split(buffer, sizes), strict=True):
            staged.append((m, part))
    for m, flat in staged:
        _unpack_into(slot_tensors(layers[m.layer]), m.dst - rank * s, flat)
    for i in chunk:
        layers[i].experts.local_experts = new.local_slots(i, rank)  # type: ignore[union-attr]
    install_maps(layers, new, only=chunk)
    return len(moves)
