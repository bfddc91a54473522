"""Class priors, presets and class-masked losses against plain torch."""

import pytest
import torch
import torch.nn.functional as F

from imbsam_fast import (
    ClassWeights,
    class_weighted_cross_entropy,
    focal_sam_weights,
    head_tail_cross_entropy,
    imbsam_weights,
    plain_weights,
    sam_weights,
    split_classes,
    split_head_tail,
    tail_class_mask,
)
from imbsam_fast.priors import sample_weights


def test_tail_class_mask_and_splits():
    counts = [500, 120, 100, 50, 20, 19, 1, 0]
    assert tail_class_mask(counts, eta=20).tolist() == [False] * 5 + [True] * 3
    assert tail_class_mask(torch.tensor(counts), eta=100).tolist() == [False] * 3 + [True] * 5
    s = split_classes(counts)
    assert s["many"].tolist() == [True, True, False, False, False, False, False, False]
    assert s["medium"].tolist() == [False, False, True, True, True, False, False, False]
    assert s["few"].tolist() == [False] * 5 + [True] * 3
    total = s["many"].int() + s["medium"].int() + s["few"].int()
    assert (total == 1).all()
    with pytest.raises(ValueError):
        tail_class_mask([3, -1])
    with pytest.raises(ValueError):
        tail_class_mask([])
    with pytest.raises(ValueError):
        split_classes(counts, many=10, few=20)


def test_presets_follow_the_design_table():
    p, s = plain_weights(4), sam_weights(4)
    assert p.head.tolist() == [1] * 4 and p.tail.tolist() == [0] * 4
    assert s.head.tolist() == [0] * 4 and s.tail.tolist() == [1] * 4
    m = torch.tensor([False, True, False, True])
    w = imbsam_weights(m, tail_weight=2.0)
    assert w.head.tolist() == [1, 0, 1, 0] and w.tail.tolist() == [0, 2, 0, 2]
    counts = torch.tensor([60.0, 30.0, 10.0])
    f = focal_sam_weights(counts, lam=0.5, gamma=2.0)
    c = 0.5 * (1 - counts / 100) ** 2
    torch.testing.assert_close(f.tail, c)
    torch.testing.assert_close(f.head, 1 - c)
    assert f.tail[2] > f.tail[1] > f.tail[0]
    assert torch.equal(imbsam_weights(m, 3.0).tail, torch.tensor([0, 3.0, 0, 3.0]))
    with pytest.raises(ValueError):
        imbsam_weights(torch.tensor([0, 1]))  # not bool
    with pytest.raises(ValueError):
        imbsam_weights(m, tail_weight=float("nan"))
    with pytest.raises(ValueError):
        focal_sam_weights(counts, lam=2.0)
    with pytest.raises(ValueError):
        ClassWeights(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError):
        plain_weights(0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("classes", [2, 7, 100])
def test_head_tail_cross_entropy_matches_masked_sums(smoothing, classes):
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(33, classes, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, classes, (33,), generator=g)
    mask = torch.rand(classes, generator=g) < 0.4
    head, tail = head_tail_cross_entropy(logits, y, mask, tail_weight=2.0, label_smoothing=smoothing)
    ls = F.cross_entropy(logits, y, reduction="none", label_smoothing=smoothing)
    is_tail = mask[y]
    torch.testing.assert_close(head, ls[~is_tail].sum() / 33)
    torch.testing.assert_close(tail, 2.0 * ls[is_tail].sum() / 33)
    gh = torch.autograd.grad(head, logits, retain_graph=True)[0]
    gt = torch.autograd.grad(tail, logits)[0]
    gref = torch.autograd.grad(ls.sum() / 33, logits)[0]
    torch.testing.assert_close(gh + gt / 2.0, gref)


def test_general_form_and_split_of_any_loss():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 5, generator=g)
    y = torch.randint(0, 5, (20,), generator=g)
    a, b = torch.rand(5, generator=g), torch.rand(5, generator=g)
    head, tail = class_weighted_cross_entropy(logits, y, ClassWeights(a, b))
    ls = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(head, (a[y] * ls).sum() / 20)
    torch.testing.assert_close(tail, (b[y] * ls).sum() / 20)
    h2, t2 = split_head_tail(ls, y, ClassWeights(a, b))
    torch.testing.assert_close((h2, t2), (head, tail))
    with pytest.raises(ValueError, match="one entry per target"):
        split_head_tail(ls[:5], y, ClassWeights(a, b))


def test_tail_weight_is_keyword_only_and_required():
    with pytest.raises(TypeError):
        head_tail_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([False, False, True]))


def test_half_precision_logits_accumulate_in_fp32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g).to(torch.bfloat16)
    y = torch.randint(0, 50, (64,), generator=g)
    mask = torch.arange(50) >= 40
    head, tail = head_tail_cross_entropy(logits, y, mask, tail_weight=1.0)
    ref = F.cross_entropy(logits.double(), y, reduction="none")
    assert head.dtype == torch.float32
    torch.testing.assert_close(head.double(), ref[~mask[y]].sum() / 64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tail.double(), ref[mask[y]].sum() / 64, rtol=1e-5, atol=1e-5)


def test_empty_batch_gives_zero_losses():
    head, tail = head_tail_cross_entropy(
        torch.randn(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long), torch.tensor([0, 0, 1, 1]).bool(),
        tail_weight=2.0,
    )
    assert head.item() == 0 and tail.item() == 0


@pytest.mark.parametrize("labels,ignore_index,ok", [
    ([0, 3, 2], -100, False),    # 3 == C, not ignored
    ([0, -100, 2], -100, True),
    ([0, -1, 2], -100, False),
    ([0, 3, 2], 3, True),        # ignore_index == C
    ([0, 4, 2], 3, False),
    ([-100, -100], -100, True),
    ([0, 1, 2, 2], -100, True),  # every label in range: the labels index the table as they are
    ([0, 1, 2], 1, True),        # ignore_index inside [0, C): class 1 ignored
    ([2, 0], 7, True),
])
def test_sample_weights_label_rule(labels, ignore_index, ok):
    w = ClassWeights(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.0, 4.0]))
    y = torch.tensor(labels)
    if not ok:
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            sample_weights(w, y, ignore_index)
        return
    a, b = sample_weights(w, y, ignore_index)
    keep = y != ignore_index
    safe = torch.where(keep, y, 0)
    torch.testing.assert_close(a, torch.where(keep, w.head[safe], 0.0))
    torch.testing.assert_close(b, torch.where(keep, w.tail[safe], 0.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_sample_weights_take_int64_and_int32_labels_and_name_other_widths(dtype):
    w = ClassWeights(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.0, 4.0]))
    y = torch.tensor([2, 0, 1], dtype=dtype)
    if dtype in (torch.int16, torch.uint8):
        with pytest.raises(ValueError, match=r"int64 \(or int32\) class labels, got torch\.(int16|uint8).*\.long\(\)"):
            sample_weights(w, y)
        return
    a, b = sample_weights(w, y)
    assert torch.equal(a, torch.tensor([3.0, 1.0, 2.0])) and torch.equal(b, torch.tensor([4.0, 0.5, 0.0]))

