"""Parameter shapes of the models the benchmarks use (no weights, just shapes)."""

from __future__ import annotations


def resnet32_shapes(num_classes: int = 100) -> list[tuple[int, ...]]:
    """CIFAR ResNet-32 (3 stages x 5 basic blocks, widths 16/32/64): 0.47M parameters in 95 tensors."""
    shapes: list[tuple[int, ...]] = [(16, 3, 3, 3), (16,), (16,)]
    cin = 16
    for width in (16, 32, 64):
        for _ in range(5):
            shapes += [(width, cin, 3, 3), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            cin = width
    return shapes + [(num_classes, 64), (num_classes,)]


def transformer_shapes(layers: int = 6, d: int = 768, ffn: int = 3072) -> list[tuple[int, ...]]:
    """Transformer encoder blocks (attention, MLP, two LayerNorms); 6 x 768 gives ~42.5M parameters."""
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (ffn, d), (ffn,), (d, ffn), (d,), (d,), (d,), (d,), (d,)]
    return block * layers


def even_shapes(total: int, tensors: int) -> list[tuple[int, ...]]:
    """``tensors`` 1-D tensors holding ``total`` parameters together (odd sizes on purpose)."""
    base = total // tensors
    return [(base + (i % 7),) for i in range(tensors)]


def numel(shapes: list[tuple[int, ...]]) -> int:
    n = 0
    for s in shapes:
        k = 1
        for d in s:
            k *= d
        n += k
    return n
