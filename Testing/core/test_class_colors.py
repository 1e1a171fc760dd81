"""The phantom's class colours, the default palette and the demo montage's overlays: every two classes
are far apart in CIE Lab (CIE76 delta E), also with simulated colour-vision deficiency (protan, deutan,
tritan) and as the montage draws them over CT; background stays dark; the colours are Slicer's
terminology recommendations wherever those are distinct."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from PLBOptCore import demo
from PLBOptCore.data.dataset import default_color, load_dataset
from PLBOptCore.data.phantom import COLORS, LABELS, TERMINOLOGY_COLORS, make_phantom_dataset

MIN_DELTA_E = 40.0  # class colours (the terminology's liver / right kidney was 12.5)
MIN_DELTA_E_OVERLAY = 20.0  # after blending at the montage's opacity (the old colours: 7)
MIN_DELTA_E_FROM_CT = 15.0  # an overlay from the bare CT under it (the terminology's muted gallbladder: 16.8)
CT_GREYS = (0.0, 0.25, 0.5, 0.8)  # under the overlay: air/fat, soft tissue, contrast, bone (0..1)
MIN_DELTA_E_CVD = 25.0  # phantom classes seen with protan, deutan or tritan vision (terminology: 3.7)
MIN_DELTA_E_CVD_PALETTE = 15.0  # the default palette's first seven classes, likewise (the former one: 4.9)
# Machado, Oliveira and Fernandes (2009), severity 1.0: linear-RGB matrices simulating dichromacy
CVD_MATRICES = {
    "protan": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    "deutan": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
    "tritan": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]],
}


def linear_rgb(rgb) -> np.ndarray:
    """Linear-light RGB of an sRGB colour in 0..1."""
    c = np.asarray(rgb, dtype=float)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def lab(rgb) -> np.ndarray:
    """CIE L*a*b* (D65) of an sRGB colour in 0..1."""
    c = linear_rgb(rgb)
    xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]]) @ c / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def delta_e(a, b) -> float:
    """CIE76 colour difference of two sRGB colours in 0..1 (2.3: just noticeable)."""
    return float(np.linalg.norm(lab(a) - lab(b)))


def rgb01(rgb) -> np.ndarray:
    return np.asarray(rgb, dtype=float) / 255


def simulate(rgb, deficiency: str) -> np.ndarray:
    """An sRGB colour in 0..1 as seen with ``deficiency`` (a key of CVD_MATRICES)."""
    seen = np.clip(np.asarray(CVD_MATRICES[deficiency]) @ linear_rgb(rgb), 0, 1)
    return np.where(seen <= 0.0031308, 12.92 * seen, 1.055 * seen ** (1 / 2.4) - 0.055)


def closest_pair_any_vision(colors):
    """(delta E, class, class, vision) of the closest pair over normal and simulated deficient vision."""
    return min([(*closest_pair(colors), "normal")]
               + [(*closest_pair({c: simulate(rgb, kind) for c, rgb in colors.items()}), kind)
                  for kind in CVD_MATRICES])


def closest_pair(colors):
    """(delta E, class, class) of the two closest colours of ``{class: rgb01}``."""
    return min((delta_e(colors[a], colors[b]), a, b) for a, b in itertools.combinations(sorted(colors), 2))


def test_lab_matches_reference_values():
    assert np.allclose(lab([1, 1, 1]), [100, 0, 0], atol=0.01) and np.allclose(lab([0, 0, 0]), 0, atol=0.01)
    assert np.allclose(lab([1, 0, 0]), [53.24, 80.09, 67.20], atol=0.05)
    assert delta_e([1, 0, 0], [1, 0, 0]) == 0.0


def test_phantom_class_colours_are_pairwise_distinct():
    assert set(COLORS) == set(LABELS) - {0}
    distance, a, b = closest_pair({c: rgb01(rgb) for c, rgb in COLORS.items()})
    assert distance > MIN_DELTA_E, f"{LABELS[a]} and {LABELS[b]} are only delta E {distance:.1f} apart"
    # the test can fail: the terminology's own colours cannot pass it
    assert closest_pair({c: rgb01(rgb) for c, rgb in TERMINOLOGY_COLORS.items()})[0] < MIN_DELTA_E


def test_simulation_matches_reference_values():
    # Machado's matrices keep grey grey (rows sum to 1) and make red and green alike for protan/deutan
    assert np.allclose(simulate([0.5, 0.5, 0.5], "deutan"), 0.5, atol=2e-3)
    assert delta_e(simulate([1, 0, 0], "protan"), simulate([0, 0.5, 0], "protan")) < 30 < delta_e([1, 0, 0], [0, 0.5, 0])


def test_phantom_class_colours_stay_distinct_with_colour_vision_deficiency():
    distance, a, b, vision = closest_pair_any_vision({c: rgb01(rgb) for c, rgb in COLORS.items()})
    assert distance > MIN_DELTA_E_CVD, f"{LABELS[a]}/{LABELS[b]} only delta E {distance:.1f} apart ({vision})"
    # the test can fail: with the terminology's gallbladder, liver and gallbladder are 3.7 apart (protan)
    with_terminology_gallbladder = {c: rgb01(rgb) for c, rgb in {**COLORS, 6: TERMINOLOGY_COLORS[6]}.items()}
    distance, a, b, vision = closest_pair_any_vision(with_terminology_gallbladder)
    assert distance < 5 and {LABELS[a], LABELS[b]} == {"liver", "gallbladder"} and vision == "protan"


def test_default_palette_stays_distinct_with_colour_vision_deficiency():
    colors = {c: rgb01(default_color(c)) for c in range(1, 8)}
    distance, a, b, vision = closest_pair_any_vision(colors)
    assert distance > MIN_DELTA_E_CVD_PALETTE, f"classes {a}/{b} only delta E {distance:.1f} apart ({vision})"
    assert lab(rgb01(default_color(0)))[0] < 10  # background dark
    assert len({default_color(c) for c in range(40)}) == 40  # beyond the palette: still one colour per class


def test_terminology_colours_are_kept_where_distinct():
    """A class leaves Slicer's recommended colour only when that is too close to another class's, with
    normal or with simulated deficient colour vision."""
    for c, recommended in TERMINOLOGY_COLORS.items():
        if COLORS[c] != recommended:
            others = [rgb01(COLORS[o]) for o in COLORS if o != c]
            closest = min([delta_e(rgb01(recommended), o) for o in others]
                          + [delta_e(simulate(rgb01(recommended), kind), simulate(o, kind))
                             for kind in CVD_MATRICES for o in others])
            assert closest < MIN_DELTA_E_CVD, LABELS[c]
    assert [LABELS[c] for c in COLORS if COLORS[c] == TERMINOLOGY_COLORS[c]] == ["liver", "spleen"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = make_phantom_dataset(tmp_path_factory.mktemp("colors") / "data", n_labeled=1, n_unlabeled=0, n_test=1,
                                n_validation=0, shape=(8, 16, 16))
    return load_dataset(root)


def test_montage_overlays_are_distinct_over_ct_and_background_stays_dark(spec):
    assert {c: tuple(v) for c, v in spec.colors.items() if c} == COLORS
    assert lab(rgb01(spec.colors[0]))[0] < 10  # background colour (Slicer's colour table, exports): dark
    rgba = demo.montage_colors(spec)
    assert rgba.shape == (len(LABELS), 4) and rgba[0, 3] == 0  # background: the CT shows through, unchanged
    assert np.all(rgba[1:, 3] >= 0.5)  # classes: opaque enough to show their colour
    for grey in CT_GREYS:
        drawn = {c: rgba[c, 3] * rgba[c, :3] + (1 - rgba[c, 3]) * grey for c in range(1, len(rgba))}
        distance, a, b = closest_pair(drawn)
        assert distance > MIN_DELTA_E_OVERLAY, f"over grey {grey}: {LABELS[a]}/{LABELS[b]} delta E {distance:.1f}"
        for c, colour in drawn.items():  # and each class stands out from the bare CT it covers
            assert delta_e(colour, [grey] * 3) > MIN_DELTA_E_FROM_CT, (LABELS[c], grey)


@pytest.mark.skipif(not demo.SHIPPED_CHECKPOINT.is_file(), reason="no shipped checkpoint (install without Resources/)")
def test_shipped_run_takes_the_phantoms_colours(spec, tmp_path):
    from PLBOptCore.engine.checkpoint import load_checkpoint

    run = demo._materialise_shipped_run(tmp_path / "run", spec.root)
    stored = json.loads((run / "dataset.json").read_text())["colors"]
    assert {int(k): tuple(v) for k, v in stored.items() if int(k)} == COLORS
    assert load_checkpoint(run / "checkpoints" / "best.pt")["colors"] == stored
