"""KVCachePool: one object owning every attention layer's paged KV buffers, and per-block access for transfer.

Each layer's cache is one tensor whose shape the layer gives (`kv_cache_shape(num_blocks, block_size)`):
[2, N, bs, Hk, D] for GQA, [N, bs, R + Dr] for MLA (the compressed latent and the roped shared key: MLA
models therefore move only the latent), other shapes for attention variants. The pool finds each layer's
block dimension from the shapes themselves (the one dimension that grows with N), so transfer code works
for any layer without knowing its kind. Layers still read `layer.kv_cache` (the attention backends' seam).

Transfer unit: one (layer, block) pair, `unit_bytes(layer)` bytes, layers outer and blocks inner
(`request_units`). `read_unit` copies one unit out to host bytes (host-staged); `write_unit` copies bytes in.

Device-side transfer (the `p2p` backend): `gather_blocks(layers, blocks, out)` copies a request's blocks of a
range of layers into one flat byte tensor on the pool's device (layers outer; each layer's piece is its cache
with the block dimension cut down to `blocks`, in their order), `scatter_blocks` writes such a tensor back into
other blocks of a pool of the same layout; `span_bytes` is its size. No host copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What a peer must match to exchange blocks: per-layer block shape and dtype, and the block size."""

    block_size: int
    dtype: str
    block_shapes: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_size": self.block_size,
            "dtype": self.dtype,
            "block_shapes": [list(s) for s in self.block_shapes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        return cls(
            block_size=int(data["block_size"]),
            dtype=str(data["dtype"]),
            block_shapes=tuple(tuple(int(x) for x in s) for s in data["block_shapes"]),
        )


def block_dim(layer: Any, block_size: int) -> int:
    """The dimension of the layer's cache that indexes blocks (differs between shapes for 1 and 2 blocks)."""
    one, two = layer.kv_cache_shape(1, block_size), layer.kv_cache_shape(2, block_size)
    dims = [i for i, (a, b) in enumerate(zip(one, two, strict=True)) if a != b]
    if len(dims) != 1:
        raise ValueError(
            f"{type(layer).__name__}.kv_cache_shape has no single block dimension: {one} vs {two}"
        )
    return dims[0]


class KVCachePool:
    """Allocates `num_blocks` blocks for every layer in `layers` and assigns each its `layer.kv_cache`."""

    def __init__(
        self, layers: list[Any], num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ):
        self.layers = layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self.block_dims = [block_dim(layer, block_size) for layer in layers]
        self.caches: list[torch.Tensor] = []
        for layer in layers:
            cache = torch.zeros(layer.kv_cache_shape(num_blocks, block_size), dtype=dtype, device=device)
            layer.kv_cache = cache
            self.caches.append(cache)

    @property
    def num_layers(self) -> int:
        return len(self.caches)

    def block_shape(self, layer: int) -> tuple[int, ...]:
        shape = list(self.caches[layer].shape)
        del shape[self.block_dims[layer]]
        return tuple(shape)

    def unit_bytes(self, layer: int) -> int:
        return math.prod(self.block_shape(layer)) * self.caches[layer].element_size()

    @property
    def bytes_per_block(self) -> int:
        return sum(self.unit_bytes(i) for i in range(self.num_layers))

    def layout(self) -> KVLayout:
        return KVLayout(
            block_size=self.block_size,
            dtype=str(self.dtype).removeprefix("torch."),
            block_shapes=tuple(self.block_shape(i) for i in range(self.num_layers)),
        )

    def request_units(self, blocks: list[int]) -> Iterator[tuple[int, int]]:
        """(layer, block) units of a request's blocks, in transfer order."""
        for layer in range(self.num_layers):
            for block in blocks:
                yield layer, block

    def _view(self, layer: int, block: int) -> torch.Tensor:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} is outside the pool [0, {self.num_blocks})")
        return self.caches[layer].select(self.block_dims[layer], block)

    def read_unit(self, layer: int, block: int) -> bytes:
        """One layer's contents of one block, as host bytes."""
        view = self._view(layer, block).to("cpu").contiguous().reshape(-1)
        return view.view(torch.uint8).numpy().tobytes()

    def write_unit(self, layer: int, block: int, data: bytes | bytearray | memoryview) -> None:
        """Overwrite one layer's contents of one block with bytes from `read_unit` of a matching layout."""
        if len(data) != self.unit_bytes(layer):
            raise ValueError(
                f"unit of layer {layer} has {len(data)} bytes, expected {self.unit_bytes(layer)}"
            )
        view = self._view(layer, block)
        writable = (
            data if not isinstance(data, bytes) and not getattr(data, "readonly", False) else bytearray(data)
        )
        src = torch.frombuffer(writable, dtype=torch.uint8).view(self.dtype).reshape(view.shape)
        view.copy_(src)

    def span_bytes(self, layers: range, num_blocks: int) -> int:
        """Bytes of `num_blocks` blocks of each layer in `layers` (the size `gather_blocks` fills)."""
        return sum(self.unit_bytes(layer) for layer in layers) * num_blocks

    def _pieces(
        self, layers: range, blocks: list[int], flat: torch.Tensor
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(layer, the view of `flat` that holds the layer's `blocks`), checking sizes and the block ids."""
        if flat.dtype != torch.uint8 or flat.dim() != 1 or flat.device != self.caches[0].device:
            raise ValueError(
                f"staging must be a flat uint8 tensor on {self.caches[0].device}, got {flat.dtype} {flat.device}"
            )
        need = self.span_bytes(layers, len(blocks))
        if flat.numel() != need:
            raise ValueError(
                f"staging has {flat.numel()} bytes, layers {layers} x {len(blocks)} blocks need {need}"
            )
        bad = [b for b in blocks if not 0 <= b < self.num_blocks]
        if bad:
            raise IndexError(f"blocks {bad} are outside the pool [0, {self.num_blocks})")
        offset = 0
        for layer in layers:
            shape = list(self.caches[layer].shape)
            shape[self.block_dims[layer]] = len(blocks)
            size = self.unit_bytes(layer) * len(blocks)
            yield layer, flat[offset : offset + size].view(self.dtype).view(shape)
            offset += size

    def _index(self, blocks: list[int]) -> torch.Tensor:
        return torch.tensor(blocks, dtype=torch.long).to(self.caches[0].device, non_blocking=True)

    def gather_blocks(self, layers: range, blocks: list[int], out: torch.Tensor) -> torch.Tensor:
        """Copy `blocks` of every layer in `layers` into `out` (flat uint8, `span_bytes` long, on the pool's
        device), on the current stream; returns `out`."""
        index = self._index(blocks)
        for layer, piece in self._pieces(layers, blocks, out):
            torch.index_select(self.caches[layer], self.block_dims[layer], index, out=piece)
        return out

    def scatter_blocks(self, layers: range, blocks: list[int], src: torch.Tensor) -> None:
        """Write `src` (filled by `gather_blocks` of a pool with the same layout) into `blocks` of every layer
        in `layers`, on the current stream."""
        index = self._index(blocks)
        for layer, piece in self._pieces(layers, blocks, src):
            self.caches[layer].index_copy_(self.block_dims[layer], index, piece)
