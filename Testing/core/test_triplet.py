"""Confidence-level triplet loss with memory banks (eq. 3-8) on crafted features."""

import io

import pytest
import torch

from PLBOptCore.method.triplet import (ConfidenceTripletLoss, MemoryBank, boundary_internal_masks,
                                       confidence_levels, mine_pairs, triplet_loss)

E = torch.eye(4)


def test_memory_bank_fifo_order_and_capacity():
    bank = MemoryBank(capacity=3, dim=1)
    assert bank.features().shape == (0, 1)
    bank.push(torch.tensor([[0.0], [1.0]]), torch.tensor([10, 11]))
    assert bank.features().flatten().tolist() == [0, 1]
    bank.push(torch.tensor([[2.0], [3.0]]), torch.tensor([12, 13]))  # drops the oldest (0)
    assert bank.features().flatten().tolist() == [1, 2, 3] and len(bank) == 3
    assert bank.labels().tolist() == [11, 12, 13]
    bank.push(torch.arange(4.0, 9.0).view(5, 1))  # more than capacity: the newest 3 survive
    assert bank.features().flatten().tolist() == [6, 7, 8] and bank.labels().tolist() == [-1, -1, -1]
    x = torch.ones(1, 1, requires_grad=True)
    bank.push(x * 9)
    assert not bank.features().requires_grad  # stored detached


def test_memory_bank_state_roundtrip_weights_only():
    bank = MemoryBank(capacity=3, dim=2)
    bank.push(torch.arange(8.0).view(4, 2), torch.tensor([1, 2, 3, 4]))
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    other = MemoryBank(capacity=3, dim=2)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other.features(), bank.features()) and torch.equal(other.labels(), bank.labels())
    other.push(torch.tensor([[9.0, 9.0]]))  # FIFO continues from the restored order
    assert other.features()[:, 0].tolist() == [4, 6, 9]
    with pytest.raises(ValueError):
        other.load_state_dict({"features": torch.zeros(2, 5), "labels": torch.zeros(2, dtype=torch.long)})


def test_confidence_levels_quantiles():
    conf = torch.tensor([0.6, 0.1, 0.5, 0.2, 0.4, 0.3]).view(1, 1, 1, 6)
    assert confidence_levels(conf, 3).flatten().tolist() == [2, 0, 2, 0, 1, 1]
    assert confidence_levels(conf, 1).flatten().tolist() == [0] * 6
    assert confidence_levels(torch.full((1, 1, 2, 2), 0.7), 3).unique().tolist() == [2]  # ties go up


def test_boundary_internal_masks_6_neighbourhood():
    pseudo = torch.zeros(1, 5, 5, 5, dtype=torch.long)
    pseudo[0, 1:4, 1:4, 1:4] = 1
    boundary, internal = boundary_internal_masks(pseudo)
    assert int((boundary & (pseudo == 1)).sum()) == 26  # cube surface
    assert int((boundary & (pseudo == 0)).sum()) == 54  # face neighbours only (6 faces × 9)
    assert not boundary[0, 0, 0, 1] and not boundary[0, 0, 1, 0]  # edge-diagonal to the cube: not 6-adjacent
    assert boundary[0, 0, 1, 1] and boundary[0, 1, 1, 1]  # face neighbour, cube corner
    assert internal.nonzero().tolist() == [[0, 2, 2, 2]]  # eroded interior; background excluded


def test_triplet_loss_hand_values():
    a = torch.stack([E[0], E[0]])
    p = torch.stack([E[1], E[0]])
    n = torch.stack([E[0], -E[0]])
    # anchor 0: 2 - 0 + 0.5 = 2.5 ; anchor 1: 0 - 4 + 0.5 < 0 → 0 ; mean 1.25
    assert triplet_loss(a, p, n, margin=0.5).item() == pytest.approx(1.25)
    assert triplet_loss(a[1:], p[1:], n[1:], margin=0.5).item() == 0.0  # margin satisfied
    empty = torch.zeros(0, 4, requires_grad=True)
    assert triplet_loss(empty, empty, empty, 0.5).item() == 0.0


def test_mine_pairs_within_domain():
    anchor = E[:1]  # class 1
    positives = torch.stack([E[0], 0.8 * E[0] + 0.6 * E[1], E[0], E[1]])
    positive_cls = torch.tensor([1, 1, 2, 1])  # 0 = the anchor itself, 2 = another class
    negatives = torch.stack([-E[0], E[2], 0.6 * E[0] + 0.8 * E[3], -0.6 * E[0] + 0.8 * E[2]])
    negative_cls = torch.tensor([2, 1, 1, 1])
    ok, p, n = mine_pairs(anchor, torch.tensor([1]), positives, positive_cls, negatives, negative_cls, 1)
    assert ok.tolist() == [True] and p.tolist() == [1] and n.tolist() == [3]  # eq. 5 / eq. 6
    ok, p, n = mine_pairs(anchor, torch.tensor([1]), positives, positive_cls, negatives, negative_cls, 1,
                          mining="hardest")
    assert p.tolist() == [3] and n.tolist() == [2]
    ok, _, _ = mine_pairs(anchor, torch.tensor([3]), positives, positive_cls, negatives, negative_cls, 1)
    assert ok.tolist() == [False]  # nothing of class 3


def _masked_mining_reference(anchor, anchor_cls, positives, positive_cls, negatives, negative_cls, num_self, mining):
    """All pairs with a class mask: the plain reading of eq. 4-6 the per-class search must match."""
    sign = 1.0 if mining == "paper" else -1.0
    allowed_p = anchor_cls[:, None] == positive_cls[None, :]
    own = torch.arange(min(anchor.shape[0], num_self))
    allowed_p[own, own] = False
    score_p = (sign * anchor @ positives.T).masked_fill(~allowed_p, float("-inf"))
    score_n = (-sign * anchor @ negatives.T).masked_fill(anchor_cls[:, None] != negative_cls[None, :], float("-inf"))
    best_p, p_index = score_p.max(1)
    best_n, n_index = score_n.max(1)
    return torch.isfinite(best_p) & torch.isfinite(best_n), p_index, n_index


@pytest.mark.parametrize("mining", ["paper", "hardest"])
def test_mine_pairs_matches_the_masked_all_pairs_search(mining):
    generator = torch.Generator().manual_seed(3)
    anchor = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=1)
    anchor_cls = torch.randint(1, 6, (40,), generator=generator)
    positives = torch.nn.functional.normalize(torch.randn(300, 8, generator=generator), dim=1)
    positive_cls = torch.randint(1, 6, (300,), generator=generator)
    positives[:30], positive_cls[:30] = anchor[:30], anchor_cls[:30]  # the first 30 anchors are positives too
    positive_cls[positive_cls == 4] = 3  # class 4 has anchors but no positive
    negatives = torch.nn.functional.normalize(torch.randn(200, 8, generator=generator), dim=1)
    negative_cls = torch.randint(1, 6, (200,), generator=generator)
    ok, p, n = mine_pairs(anchor, anchor_cls, positives, positive_cls, negatives, negative_cls, 30, mining)
    ok_ref, p_ref, n_ref = _masked_mining_reference(anchor, anchor_cls, positives, positive_cls, negatives,
                                                    negative_cls, 30, mining)
    assert torch.equal(ok, ok_ref) and 0 < int(ok.sum()) < 40
    assert torch.equal(p[ok], p_ref[ok]) and torch.equal(n[ok], n_ref[ok])


def test_boundary_masks_and_levels_match_pooling_and_sorting():
    generator = torch.Generator().manual_seed(4)
    pseudo = torch.randint(0, 3, (2, 6, 7, 8), generator=generator)
    labels = pseudo.unsqueeze(1).float()
    expected = torch.zeros_like(pseudo, dtype=torch.bool)
    for kernel in ((3, 1, 1), (1, 3, 1), (1, 1, 3)):  # max/min pooling over each axis' neighbours
        padding = tuple(k // 2 for k in kernel)
        high = torch.nn.functional.max_pool3d(labels, kernel, stride=1, padding=padding)
        low = -torch.nn.functional.max_pool3d(-labels, kernel, stride=1, padding=padding)
        expected |= ((high != labels) | (low != labels)).squeeze(1)
    boundary, internal = boundary_internal_masks(pseudo)
    assert torch.equal(boundary, expected) and torch.equal(internal, (pseudo > 0) & ~expected)
    confidence = torch.rand(2, 6, 7, 8, generator=generator)
    confidence[0, :2] = 0.5  # ties at a threshold
    flat = confidence.flatten().sort().values
    thresholds = flat[(torch.arange(1, 4) * flat.numel()) // 4]
    assert torch.equal(confidence_levels(confidence, 4), torch.bucketize(confidence, thresholds, right=True))


def _line_case():
    """Labels 0 1 1 1 1 1 0 on a line: foreground boundary at x=1, 5; interior at x=2, 3, 4."""
    pseudo = torch.tensor([0, 1, 1, 1, 1, 1, 0]).view(1, 1, 1, 7)
    feats = torch.zeros(1, 4, 1, 1, 7)
    feats[0, :, 0, 0, 1] = E[0]
    feats[0, :, 0, 0, 5] = E[1]
    feats[0, :, 0, 0, 2] = E[0]
    feats[0, :, 0, 0, 3] = -0.6 * E[1] + 0.8 * E[2]
    feats[0, :, 0, 0, 4] = -E[0]
    feats[0, :, 0, 0, 0] = feats[0, :, 0, 0, 6] = E[3]  # background: never used
    return pseudo, 3.0 * feats  # unnormalised on purpose: the loss L2-normalises


def test_confidence_triplet_loss_hand_value_and_banks():
    pseudo, feats = _line_case()
    feats.requires_grad_(True)
    loss_fn = ConfidenceTripletLoss(levels=1, capacity=8, dim=4, margin=1.5, max_anchors=8, max_candidates=8)
    gen = torch.Generator().manual_seed(0)
    conf = torch.full(pseudo.shape, 0.9)
    # anchor x=1 (e0): positive e1 (d=2), negative -e0 (d=4): [2 - 4 + 1.5]+ = 0
    # anchor x=5 (e1): positive e0 (d=2), negative -0.6 e1 + 0.8 e2 (d=3.2): [2 - 3.2 + 1.5]+ = 0.3
    loss = loss_fn(feats, pseudo, conf, gen)
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    loss.backward()
    assert feats.grad[0, :, 0, 0, 5].abs().sum() > 0
    assert len(loss_fn.positive[0]) == 2 and len(loss_fn.negative[0]) == 3  # pushed after the loss
    assert torch.allclose(loss_fn.positive[0].features().norm(dim=1), torch.ones(2))
    # second step: the bank now holds each anchor's own feature from the last step → d_pos = 0
    assert loss_fn(feats.detach(), pseudo, conf, gen).item() == pytest.approx(0.0, abs=1e-6)
    # the banks survive a weights_only checkpoint
    buffer = io.BytesIO()
    torch.save(loss_fn.state_dict(), buffer)
    buffer.seek(0)
    restored = ConfidenceTripletLoss(levels=1, capacity=8, dim=4, margin=1.5, max_anchors=8, max_candidates=8)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.negative[0].features(), loss_fn.negative[0].features())


def test_levels_separate_domains():
    pseudo, feats = _line_case()
    # median threshold 0.3: level 1 = x 2..5, level 0 = x 0, 1, 6. The two boundary voxels x=1 and
    # x=5 are in different levels, so neither anchor has a positive: no triplet, although level
    # pooling would have given one (see the hand value above)
    conf = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.4, 0.8, 0.05]).view(1, 1, 1, 7)
    loss_fn = ConfidenceTripletLoss(levels=2, capacity=8, dim=4, margin=1.5, max_anchors=8, max_candidates=8)
    loss = loss_fn(feats.requires_grad_(True), pseudo, conf, torch.Generator().manual_seed(0))
    assert loss.item() == 0.0 and loss.requires_grad  # no complete triplet in any level
    assert [len(b) for b in loss_fn.positive] == [1, 1] and [len(b) for b in loss_fn.negative] == [0, 3]


def test_nothing_to_mine_returns_graph_connected_zero():
    feats = torch.randn(1, 4, 2, 3, 3, requires_grad=True)
    loss_fn = ConfidenceTripletLoss(levels=3, capacity=4, dim=4)
    loss = loss_fn(feats, torch.zeros(1, 2, 3, 3, dtype=torch.long), torch.rand(1, 2, 3, 3),
                   torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(feats.grad, torch.zeros_like(feats))
    assert all(len(b) == 0 for b in loss_fn.positive + loss_fn.negative)


def test_sampling_caps_and_determinism():
    gen_feats = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 8, 6, 12, 12, generator=gen_feats)
    pseudo = torch.zeros(2, 6, 12, 12, dtype=torch.long)
    pseudo[:, 1:5, 2:10, 2:10] = 1
    pseudo[:, 1:5, 2:6, 2:6] = 2
    conf = torch.rand(2, 6, 12, 12, generator=gen_feats)
    values = []
    for _ in range(2):
        loss_fn = ConfidenceTripletLoss(levels=3, capacity=100, dim=8, margin=0.5, max_anchors=5,
                                        max_candidates=7, mining="hardest")
        values.append(loss_fn(feats, pseudo, conf, torch.Generator().manual_seed(4)).item())
        assert all(len(b) <= 7 for b in loss_fn.positive + loss_fn.negative)
    assert values[0] == values[1] and values[0] > 0
