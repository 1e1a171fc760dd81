"""Superpixels (Algorithm 1 line 6) and entropy-voting refinement (eq. 1-2) on hand-built cases."""

import json
import math

import numpy as np
import pytest
import torch

from PLBOptCore.bench.refine import refine_reference
from PLBOptCore.errors import ConfigError
from PLBOptCore.method.refine import mask_entropy, refine_pseudo_labels, region_entropy
from PLBOptCore.method.superpixels import compute_superpixels


def _volume(z=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    vol = 0.3 + rng.normal(0, 0.03, (z, size, size))
    vol[:, 8:24, 8:20] += 0.4  # an "organ" so that superpixels have an edge to follow
    return np.clip(vol, 0, 1)


@pytest.mark.parametrize("method", ["slic", "quickshift", "felzenszwalb", "watershed"])
def test_superpixels_per_slice_unique_ids(method):
    vol = _volume()
    sp = compute_superpixels(vol, method=method, divisor=16, compactness=0.1)
    assert sp.dtype == np.int32 and sp.shape == vol.shape and sp.min() == 0
    per_slice = [set(np.unique(s)) for s in sp]
    assert not (per_slice[0] & per_slice[1]) and not (per_slice[1] & per_slice[2])  # offset per slice
    assert len(np.unique(sp)) == sp.max() + 1  # sequential
    target = 32 * 32 // 16
    for ids in per_slice:
        assert 0.25 * target <= len(ids) <= 2.5 * target, (method, len(ids), target)


def test_superpixels_slic3d_spans_slices_and_errors():
    vol = _volume(z=8)
    sp = compute_superpixels(vol, method="slic3d", divisor=64)
    assert sp.dtype == np.int32 and sp.min() == 0
    assert set(np.unique(sp[0])) & set(np.unique(sp[1]))  # supervoxels cross slices
    assert 0.25 * (8 * 32 * 32 // 64) <= sp.max() + 1 <= 2.5 * (8 * 32 * 32 // 64)
    with pytest.raises(ConfigError):
        compute_superpixels(vol, method="grid")
    with pytest.raises(ValueError):
        compute_superpixels(vol[0], method="slic")


def test_region_entropy_values():
    assert region_entropy(torch.tensor([1.0, 1.0])).item() == pytest.approx(math.log(2))
    assert region_entropy(torch.tensor([3.0, 0.0])).item() == pytest.approx(0.0)
    # sums of several voxels: only the normalised mean counts
    h = region_entropy(torch.tensor([0.4, 0.6, 1.0]))
    assert h.item() == pytest.approx(-(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5)))
    assert torch.isnan(region_entropy(torch.zeros(3)))  # empty region: undefined


def _line(probs, labels, spx=None):
    """A (1, C, 1, 1, N) probability row, labels and superpixels (default: one superpixel)."""
    p = torch.tensor(probs, dtype=torch.float32).T.reshape(1, len(probs[0]), 1, 1, len(probs))
    y = torch.tensor(labels).reshape(1, 1, 1, -1)
    s = torch.zeros_like(y) if spx is None else torch.tensor(spx).reshape(1, 1, 1, -1)
    return p, y, s


def test_contract_two_classes():
    # M_int uncertain (H = ln 2 = 0.693), M_comp confident (H(0.9, 0.1) = 0.325): contract → background
    p, y, s = _line([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.9, 0.1]], [1, 1, 0, 0])
    out, changed = refine_pseudo_labels(p, y, s, tau=0.5)
    assert out.flatten().tolist() == [0, 0, 0, 0] and changed == pytest.approx(0.5)
    # τ above both entropies: no decision
    out, changed = refine_pseudo_labels(p, y, s, tau=0.7)
    assert out.flatten().tolist() == [1, 1, 0, 0] and changed == 0.0


def test_expand_two_classes():
    # M_int confident (0.325), M_comp uncertain (0.693): expand → the whole superpixel becomes 1
    p, y, s = _line([[0.1, 0.9], [0.1, 0.9], [0.5, 0.5], [0.5, 0.5]], [1, 1, 0, 0])
    out, changed = refine_pseudo_labels(p, y, s, tau=0.5)
    assert out.flatten().tolist() == [1, 1, 1, 1] and changed == pytest.approx(0.5)
    # equal entropies: neither strictly larger, no decision
    p, y, s = _line([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]], [1, 1, 0, 0])
    assert refine_pseudo_labels(p, y, s, tau=0.1)[0].flatten().tolist() == [1, 1, 0, 0]


def test_no_decision_without_both_regions_and_padding_untouched():
    # superpixel 0 is all class 1 (M_comp empty) → untouched although uncertain; voxels with id -1
    # never change and do not count in the changed fraction
    p, y, s = _line([[0.5, 0.5]] * 2 + [[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.9, 0.1]],
                    [1, 1, 1, 1, 0, 0], spx=[0, 0, -1, 1, 1, 1])
    out, changed = refine_pseudo_labels(p, y, s, tau=0.5)
    assert out.flatten().tolist() == [1, 1, 1, 0, 0, 0]
    assert changed == pytest.approx(1 / 5)


def test_contract_multiclass_goes_to_next_most_probable_class():
    # M_int (class 1) mean (0.1, 0.5, 0.4): H = 0.943 > τ and > H(comp) → contract to class 2 (not 0)
    p, y, s = _line([[0.1, 0.5, 0.4]] * 2 + [[0.95, 0.025, 0.025]] * 2, [1, 1, 0, 0])
    h_int = region_entropy(torch.tensor([0.1, 0.5, 0.4])).item()
    assert h_int == pytest.approx(0.9433, abs=1e-4)
    assert refine_pseudo_labels(p, y, s, tau=0.5, entropy="multiclass")[0].flatten().tolist() == [2, 2, 0, 0]


def test_two_expansions_lowest_int_entropy_wins():
    # class 1 interior H≈0.20, class 2 interior H≈0.39, background uncertain: both expand
    probs = [[0.02, 0.96, 0.02]] * 2 + [[0.05, 0.05, 0.9]] * 2 + [[0.4, 0.3, 0.3]] * 2
    p, y, s = _line(probs, [1, 1, 2, 2, 0, 0])
    h_comp_1 = region_entropy(torch.tensor([0.225, 0.175, 0.6])).item()
    h_comp_2 = region_entropy(torch.tensor([0.21, 0.63, 0.16])).item()
    assert h_comp_1 == pytest.approx(0.9472, abs=1e-4) and h_comp_2 == pytest.approx(0.9120, abs=1e-4)
    out, changed = refine_pseudo_labels(p, y, s, tau=0.5, entropy="multiclass")
    assert out.flatten().tolist() == [1] * 6 and changed == pytest.approx(4 / 6)


def test_expansion_overrides_contraction_in_the_same_superpixel():
    # class 1 certain → expands; class 2 uncertain (H = 1.089 > H(comp) = 0.820) → would contract
    probs = [[0.02, 0.96, 0.02]] * 2 + [[0.3, 0.3, 0.4]] * 2 + [[0.9, 0.05, 0.05]] * 2
    p, y, s = _line(probs, [1, 1, 2, 2, 0, 0])
    assert region_entropy(torch.tensor([0.46, 0.505, 0.035])).item() == pytest.approx(0.8196, abs=1e-4)
    assert refine_pseudo_labels(p, y, s, tau=0.5, entropy="multiclass")[0].flatten().tolist() == [1] * 6
    # with only superpixel {2, 2, 0, 0} the contraction of class 2 applies (to class 0, next best)
    p2, y2, s2 = _line(probs, [1, 1, 2, 2, 0, 0], spx=[-1, -1, 0, 0, 0, 0])
    assert refine_pseudo_labels(p2, y2, s2, tau=0.5, entropy="multiclass")[0].flatten().tolist() == [1, 1, 0, 0, 0, 0]


def test_binary_entropy_ignores_a_mix_of_confident_classes():
    # M_comp of class 1 holds confident background and confident class 2: mean (0.49, 0.02, 0.49).
    # Multiclass: H = 0.7773 > τ, above H(int) → class 1 takes the whole superpixel.
    # Binary: p(1|M_comp) = 0.02, H = 0.098 → no decision, nothing changes.
    probs = [[0.02, 0.96, 0.02]] * 2 + [[0.96, 0.02, 0.02]] * 2 + [[0.02, 0.02, 0.96]] * 2
    p, y, s = _line(probs, [1, 1, 0, 0, 2, 2])
    assert region_entropy(torch.tensor([0.49, 0.02, 0.49])).item() == pytest.approx(0.7773, abs=1e-4)
    assert mask_entropy(torch.tensor([0.49, 0.02, 0.49]), torch.tensor(1)).item() == pytest.approx(0.0980, abs=1e-4)
    assert refine_pseudo_labels(p, y, s, tau=0.5, entropy="multiclass")[0].flatten().tolist() == [1] * 6
    out, changed = refine_pseudo_labels(p, y, s, tau=0.5, entropy="binary")
    assert out.flatten().tolist() == [1, 1, 0, 0, 2, 2] and changed == 0.0


def test_binary_entropy_expands_an_uncertain_complement():
    # class 1 confident inside; outside p(1) = 0.45: binary H = 0.688 > τ and > H(int) = 0.135 → expand
    probs = [[0.02, 0.97, 0.01]] * 2 + [[0.5, 0.45, 0.05]] * 2
    p, y, s = _line(probs, [1, 1, 0, 0])
    assert mask_entropy(torch.tensor([0.5, 0.45, 0.05]), torch.tensor(1)).item() == pytest.approx(0.6881, abs=1e-4)
    out, changed = refine_pseudo_labels(p, y, s, tau=0.5)  # binary is the default
    assert out.flatten().tolist() == [1, 1, 1, 1] and changed == pytest.approx(0.5)


def test_binary_and_multiclass_agree_with_two_classes():
    gen = torch.Generator().manual_seed(11)
    probs = torch.softmax(2 * torch.randn(1, 2, 3, 5, 5, generator=gen), 1)
    pseudo = torch.randint(0, 2, (1, 3, 5, 5), generator=gen)
    spx = torch.randint(0, 6, (1, 3, 5, 5), generator=gen)
    for tau in (0.2, 0.5, 0.65):
        binary = refine_pseudo_labels(probs, pseudo, spx, tau, entropy="binary")[0]
        assert torch.equal(binary, refine_pseudo_labels(probs, pseudo, spx, tau, entropy="multiclass")[0])


def test_3d_batch_items_do_not_mix():
    # same superpixel ids in two batch items are different superpixels
    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(3 * torch.randn(2, 3, 2, 3, 3, generator=gen), 1)
    pseudo = torch.randint(0, 3, (2, 2, 3, 3), generator=gen)
    spx = torch.randint(0, 3, (2, 2, 3, 3), generator=gen)
    joint, _ = refine_pseudo_labels(probs, pseudo, spx, tau=0.4)
    for b in range(2):
        alone, _ = refine_pseudo_labels(probs[b:b + 1], pseudo[b:b + 1], spx[b:b + 1], tau=0.4)
        assert torch.equal(joint[b:b + 1], alone)


@pytest.mark.parametrize("ids", ["sparse", "dense"])
@pytest.mark.parametrize("entropy", ["binary", "multiclass"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_vectorised_equals_reference_loop(seed, entropy, ids):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 4, 6, 8)
    probs = torch.softmax(2.5 * torch.randn(2, 4, 4, 6, 8, generator=gen), 1)
    # pseudo labels mostly the argmax, partly wrong, so that both decisions occur
    noise = torch.randint(0, 4, shape, generator=gen)
    pseudo = torch.where(torch.rand(shape, generator=gen) < 0.3, noise, probs.argmax(1))
    spx = torch.randint(0, 60, shape, generator=gen)
    if ids == "sparse":  # volume-wide ids of a cropped patch: compacted by a sort
        spx = spx * 1000 + 10**6
    spx[:, :, :, :2] = -1  # padding
    seen = set()
    for tau in ((0.2, 0.4, 0.6) if entropy == "binary" else (0.3, 0.8, 1.2)):
        fast, fast_changed = refine_pseudo_labels(probs, pseudo, spx, tau, entropy)
        slow, slow_changed = refine_reference(probs, pseudo, spx, tau, entropy)
        assert torch.equal(fast, slow)
        assert fast_changed == pytest.approx(slow_changed, abs=1e-12)
        assert torch.equal(fast[spx < 0], pseudo[spx < 0])
        seen.add(round(fast_changed, 6))
    assert len(seen) > 1 and max(seen) > 0  # τ matters: the comparison is not vacuous


def test_pure_superpixels_are_returned_unchanged():
    # every superpixel holds one pseudo class: no region pair is defined, nothing can change
    probs = torch.softmax(torch.randn(1, 3, 2, 4, 4), 1)
    pseudo = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    pseudo[..., 2:] = 2
    spx = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    spx[..., 2:] = 1
    out, changed = refine_pseudo_labels(probs, pseudo, spx, tau=0.0)
    assert torch.equal(out, pseudo) and changed == 0.0 and out.data_ptr() != pseudo.data_ptr()


def test_refine_bench_writes_json_and_markdown(tmp_path):
    from PLBOptCore.bench.refine import run_refine_bench

    result = run_refine_bench(tmp_path, sizes=((4, 16, 16),), repeats=2, reference_repeats=1, device="cpu")
    saved = json.loads((tmp_path / "refine_bench.json").read_text())
    assert saved["rows"][0]["shape"] == [2, 6, 4, 16, 16] and saved["rows"][0]["speedup"] > 0
    assert saved["target_met"] == result["target_met"] == (saved["rows"][0]["speedup"] >= 20)
    assert "Speed-up target" in (tmp_path / "refine_bench.md").read_text()


def test_step_bench_times_both_presets_interleaved(tmp_path):
    from PLBOptCore.bench.step import PHASES, run_step_bench

    result = run_step_bench(tmp_path, iterations=2, warmup=1)
    saved = json.loads((tmp_path / "step_bench.json").read_text())
    dhc, plbopt = (saved["presets"][p]["median_seconds"] for p in ("dhc", "plbopt"))
    assert dhc["refine"] + dhc["triplet"] < 1e-3 < plbopt["refine"] + plbopt["triplet"]  # DHC has neither
    assert all(plbopt[phase] >= 0 for phase in PHASES)
    assert saved["plbopt_over_dhc_step_time"] == pytest.approx(plbopt["total"] / dhc["total"])
    assert result["steps_timed"] == 2 and "interleaved" in (tmp_path / "step_bench.md").read_text()


# ---------------------------------------------------------------- safe rule (refine_mode="safe")
def test_safe_contraction_gives_voxels_to_background_not_to_the_neighbouring_organ():
    # superpixel 0 = six voxels: class 1 uncertain (H_bin(0.5) = ln 2 > τ, above H(comp)), class 2
    # and background certain (class 2's complement: p = 0.185, H = 0.479 < τ); superpixel 1 holds
    # enough class-1 voxels that class 1 is not thinner than a superpixel
    probs = [[0.15, 0.5, 0.35]] * 2 + [[0.02, 0.02, 0.96]] * 2 + [[0.96, 0.02, 0.02]] * 2 + [[0.02, 0.96, 0.02]] * 6
    p, y, s = _line(probs, [1, 1, 2, 2, 0, 0] + [1] * 6, [0] * 6 + [1] * 6)
    paper, _ = refine_pseudo_labels(p, y, s, tau=0.5, mode="paper")
    safe, changed = refine_pseudo_labels(p, y, s, tau=0.5, mode="safe")
    assert paper.flatten().tolist()[:6] == [2, 2, 2, 2, 0, 0]  # next most probable: the organ
    assert safe.flatten().tolist() == [0, 0, 2, 2, 0, 0] + [1] * 6
    assert changed == pytest.approx(2 / 12)


def test_safe_expansion_takes_only_background_voxels():
    # class 1 certain inside; its complement (organ 2 and background, both unsure of themselves and
    # leaning to 1) is uncertain: paper expands over both, safe only over background
    probs = [[0.01, 0.98, 0.01]] * 4 + [[0.1, 0.45, 0.45]] * 2 + [[0.5, 0.45, 0.05]] * 2
    p, y, s = _line(probs, [1, 1, 1, 1, 2, 2, 0, 0])
    paper, _ = refine_pseudo_labels(p, y, s, tau=0.5, mode="paper")
    safe, changed = refine_pseudo_labels(p, y, s, tau=0.5, mode="safe")
    assert paper.flatten().tolist() == [1] * 8
    assert safe.flatten().tolist() == [1, 1, 1, 1, 2, 2, 1, 1] and changed == pytest.approx(2 / 8)


def test_safe_rule_never_contracts_a_class_thinner_than_a_superpixel_in_its_slice():
    # two slices, superpixels of 8 voxels on average (6, 6, 12); class 1 has 2 voxels in slice 0: no
    # contraction there, while in slice 1 (8 voxels of class 1) the same uncertainty contracts
    unsure, sure_bg = [0.5, 0.5], [0.95, 0.05]
    p0 = [unsure] * 2 + [sure_bg] * 4
    p1 = [unsure] * 8 + [sure_bg] * 4
    probs = torch.zeros(1, 2, 2, 1, 12)
    probs[0, :, 0, 0, :6] = torch.tensor(p0).T
    probs[0, :, 0, 0, 6:] = torch.tensor([sure_bg] * 6).T
    probs[0, :, 1, 0, :] = torch.tensor(p1).T
    labels = torch.zeros(1, 2, 1, 12, dtype=torch.long)
    labels[0, 0, 0, :2] = 1
    labels[0, 1, 0, :8] = 1
    superpixels = torch.tensor([[0] * 6 + [1] * 6, [2] * 12]).reshape(1, 2, 1, 12)
    out, _ = refine_pseudo_labels(probs, labels, superpixels, tau=0.5, mode="safe")
    assert out[0, 0, 0, :2].tolist() == [1, 1]  # thin: kept
    assert out[0, 1, 0, :8].tolist() == [0] * 8  # wide enough: contracted to background
    paper, _ = refine_pseudo_labels(probs, labels, superpixels, tau=0.5, mode="paper")
    assert paper[0, 0, 0, :2].tolist() == [0, 0]


def test_safe_rule_never_removes_a_class_from_a_patch():
    # all of class 2 sits in one superpixel and would be contracted: it must survive
    probs = [[0.45, 0.05, 0.5]] * 6 + [[0.96, 0.02, 0.02]] * 6 + [[0.02, 0.96, 0.02]] * 12
    p, y, s = _line(probs, [2] * 6 + [0] * 6 + [1] * 12, [0] * 12 + [1] * 12)
    paper, _ = refine_pseudo_labels(p, y, s, tau=0.5, mode="paper")
    safe, changed = refine_pseudo_labels(p, y, s, tau=0.5, mode="safe")
    assert 2 not in paper.flatten().tolist()
    assert safe.flatten().tolist() == y.flatten().tolist() and changed == 0.0


def test_refinement_leaves_classes_that_are_not_allowed():
    p, y, s = _line([[0.1, 0.9]] * 2 + [[0.5, 0.5]] * 2, [1, 1, 0, 0])
    assert refine_pseudo_labels(p, y, s, tau=0.5, mode="safe")[0].flatten().tolist() == [1, 1, 1, 1]
    blocked, changed = refine_pseudo_labels(p, y, s, tau=0.5, mode="safe", allowed_classes=torch.tensor([True, False]))
    assert blocked.flatten().tolist() == [1, 1, 0, 0] and changed == 0.0
