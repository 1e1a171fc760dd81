"""Metrics on hand-computed volumes and folder evaluation on small NIfTI/MHA files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from PLBOptCore.errors import DatasetError
from PLBOptCore.evaluate import evaluate_folders, format_table
from PLBOptCore.metrics import asd, assd, compute_case_metrics, dice, hd95, surface, surface_distances


def _cube(shape, start, size=3):
    mask = np.zeros(shape, dtype=bool)
    z, y, x = start
    mask[z:z + size, y:y + size, x:x + size] = True
    return mask


# Two 3×3×3 cubes, the prediction one voxel lower along Z, spacing (Z, Y, X) = (2, 1, 1) mm.
# Prediction surface (26 voxels): its z=3 ring (8) and the z=4 face except its centre (8) lie on the
# GT surface → 0; the z=4 centre is GT-interior, nearest GT surface one voxel along Y/X → 1 mm; the
# z=2 face (9) is one slice below the GT bottom face → 2 mm. ASD = (1 + 9·2)/26 = 19/26, same the
# other way by symmetry. HD95 over the 52 distances (32×0, 2×1, 18×2): rank 0.95·51 = 48.45 → 2 mm.
PRED = _cube((8, 7, 7), (2, 2, 2))
GT = _cube((8, 7, 7), (3, 2, 2))
SPACING = (2.0, 1.0, 1.0)


def test_dice_hand_computed():
    assert dice(PRED, GT) == pytest.approx(2 * 18 / 54)
    assert dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 3))) == 1.0
    assert dice(PRED, np.zeros_like(PRED)) == 0.0


def test_surface_is_xor_with_6_connected_erosion():
    cube = _cube((5, 5, 5), (1, 1, 1))
    s = surface(cube)
    assert s.sum() == 26 and not s[2, 2, 2]
    # the array border counts as outside: a full block keeps only its centre as interior
    assert surface(np.ones((3, 3, 3), bool)).sum() == 26
    # 6-connectivity: a voxel whose 6 face neighbours are inside is interior even if an edge
    # neighbour is outside (full 26-connectivity would call it surface)
    plus = np.zeros((5, 5, 5), bool)
    plus[2, 2, 1:4] = plus[2, 1:4, 2] = plus[1:4, 2, 2] = True
    assert not surface(plus)[2, 2, 2]


def test_offset_cubes_anisotropic_distances():
    assert asd(PRED, GT, SPACING) == pytest.approx(19 / 26)
    assert asd(GT, PRED, SPACING) == pytest.approx(19 / 26)
    assert assd(PRED, GT, SPACING) == pytest.approx(19 / 26)
    assert hd95(PRED, GT, SPACING) == pytest.approx(2.0)
    # the same offset along X (1 mm there): face at 1 mm, interior centre at 1 mm → 10/26
    pred_x = _cube((7, 7, 8), (2, 2, 2))
    gt_x = _cube((7, 7, 8), (2, 2, 3))
    assert asd(pred_x, gt_x, SPACING) == pytest.approx(10 / 26)
    assert hd95(pred_x, gt_x, SPACING) == pytest.approx(1.0)


def test_one_sided_asd_differs_from_symmetric():
    # GT 3×3×3 cube, prediction = its single bottom-centre voxel (itself a surface voxel of GT).
    gt = _cube((7, 7, 7), (2, 2, 2))
    pred = np.zeros_like(gt)
    pred[2, 3, 3] = True
    assert asd(pred, gt, (1, 1, 1)) == 0.0
    # GT surface → the voxel: 26 distances sqrt(dz²+dy²+dx²) for the cube offsets without the centre
    d = [math.sqrt(dz * dz + dy * dy + dx * dx)
         for dz in range(3) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dz, dy, dx) != (1, 0, 0)]
    assert asd(gt, pred, (1, 1, 1)) == pytest.approx(sum(d) / 26)
    # symmetric: mean over all 27 surface voxels of both masks (the voxel's own distance is 0)
    assert assd(pred, gt, (1, 1, 1)) == pytest.approx(sum(d) / 27)


def test_surface_distances_match_brute_force():
    rng = np.random.default_rng(3)
    a = np.zeros((10, 12, 9), bool)
    b = np.zeros_like(a)
    a[2:6, 3:9, 1:5] = True
    a[6:8, 4:6, 2:7] = True
    b[3:8, 2:7, 3:8] = True
    b &= rng.random(b.shape) > 0.1
    spacing = (2.5, 0.7, 1.3)
    pa, pb = np.argwhere(surface(a)) * spacing, np.argwhere(surface(b)) * spacing
    brute = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)
    assert np.allclose(np.sort(surface_distances(a, b, spacing)), np.sort(brute))


def test_empty_mask_convention():
    empty = np.zeros((4, 4, 4), bool)
    full = _cube((4, 4, 4), (0, 0, 0), 2)
    assert (dice(empty, empty), asd(empty, empty, SPACING), assd(empty, empty, SPACING),
            hd95(empty, empty, SPACING)) == (1.0, 0.0, 0.0, 0.0)
    for p, g in ((empty, full), (full, empty)):
        assert dice(p, g) == 0.0
        assert all(math.isnan(f(p, g, SPACING)) for f in (asd, assd, hd95))


def test_compute_case_metrics():
    pred = PRED.astype(np.int16)
    gt = GT.astype(np.int16)
    gt[0, 0, 0] = 2  # class 2 only in GT → distances NaN
    result = compute_case_metrics(pred, gt, num_classes=4, spacing=SPACING)
    assert set(result) == {1, 2, 3}
    assert result[1] == pytest.approx({"dice": 2 / 3, "asd": 19 / 26, "assd": 19 / 26, "hd95": 2.0})
    assert result[2]["dice"] == 0.0 and math.isnan(result[2]["asd"]) and math.isnan(result[2]["hd95"])
    assert result[3] == {"dice": 1.0, "asd": 0.0, "assd": 0.0, "hd95": 0.0}


# ------------------------------------------------------------------------------------ evaluate
def _write(path, array_zyx, spacing_xyz=(1.0, 1.0, 2.0), pixel=np.uint8):
    image = sitk.GetImageFromArray(np.asarray(array_zyx).astype(pixel))
    image.SetSpacing(spacing_xyz)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def folders(tmp_path):
    """case1: class 1 = offset cubes (ASD 19/26 mm with z spacing 2), class 2 only in GT;
    case2 (.mha prediction): perfect. A *_confidence map must be ignored."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    gt1 = GT.astype(np.uint8)
    gt1[7, 6, 6] = 2
    _write(pred_dir / "case1.nii.gz", PRED)
    _write(gt_dir / "case1.nii.gz", gt1)
    _write(pred_dir / "case1_confidence.nii.gz", np.full(PRED.shape, 0.5), pixel=np.float32)
    both = GT.astype(np.uint8) + 2 * _cube(GT.shape, (0, 0, 4), 2)
    _write(pred_dir / "case2.mha", both)
    _write(gt_dir / "case2.nii.gz", both)
    return pred_dir, gt_dir


def test_evaluate_folders(folders, tmp_path):
    pred_dir, gt_dir = folders
    results = evaluate_folders(pred_dir, gt_dir, labels={0: "background", 1: "liver", 2: "spleen"})
    assert set(results["cases"]) == {"case1", "case2"}
    liver1 = results["cases"]["case1"]["liver"]
    assert liver1 == pytest.approx({"dice": 2 / 3, "asd": 19 / 26, "assd": 19 / 26, "hd95": 2.0})
    spleen1 = results["cases"]["case1"]["spleen"]
    assert spleen1["dice"] == 0.0 and math.isnan(spleen1["asd"])
    assert results["cases"]["case2"]["spleen"] == {"dice": 1.0, "asd": 0.0, "assd": 0.0, "hd95": 0.0}

    liver = results["classes"]["liver"]
    assert liver["dice"]["mean"] == pytest.approx((2 / 3 + 1) / 2)
    assert liver["dice"]["std"] == pytest.approx(1 / 6)
    assert liver["asd"]["mean"] == pytest.approx(19 / 52)
    spleen = results["classes"]["spleen"]
    assert spleen["n_missing"] == 1 and liver["n_missing"] == 0
    assert spleen["dice"]["mean"] == pytest.approx(0.5)  # the missing case's Dice 0 counts
    assert spleen["asd"]["mean"] == 0.0  # its NaN distance does not
    assert results["mean"]["dice"] == pytest.approx(((2 / 3 + 1) / 2 + 0.5) / 2)

    with open(pred_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    assert [(r["case"], r["label"], r["class"]) for r in rows] == [
        ("case1", "1", "liver"), ("case1", "2", "spleen"), ("case2", "1", "liver"), ("case2", "2", "spleen")]
    assert float(rows[0]["asd_mm"]) == pytest.approx(19 / 26) and rows[1]["asd_mm"] == ""
    saved = json.loads((pred_dir / "metrics.json").read_text())
    assert saved["cases"]["case1"]["spleen"]["asd"] is None
    assert saved["classes"]["liver"]["hd95"]["mean"] == pytest.approx(1.0)
    assert not [p for p in pred_dir.iterdir() if p.name.startswith(".tmp")]

    table = format_table(results)
    assert "liver" in table and "spleen" in table and "0.8333±0.1667" in table
    print(table)


def test_evaluate_labels_from_dataset_json_default_names_and_out_dir(folders, tmp_path):
    pred_dir, gt_dir = folders
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"name": "x", "labels": {"0": "background", "1": "a", "2": "b"}}))
    out = tmp_path / "report"
    results = evaluate_folders(pred_dir, gt_dir, labels=dataset_json, out_dir=out)
    assert list(results["classes"]) == ["a", "b"]
    assert (out / "metrics.csv").is_file() and (out / "metrics.json").is_file()
    assert not (pred_dir / "metrics.json").exists()

    nnunet_v2 = tmp_path / "dataset_v2.json"
    nnunet_v2.write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}}))
    assert list(evaluate_folders(pred_dir, gt_dir, labels=nnunet_v2)["classes"]) == ["liver", "spleen"]

    default = evaluate_folders(pred_dir, gt_dir)
    assert list(default["classes"]) == ["class_1", "class_2"]
    assert default["labels"] == {"1": "class_1", "2": "class_2"}


def test_evaluate_missing_cases_name_the_case(folders):
    pred_dir, gt_dir = folders
    _write(pred_dir / "case3.nii.gz", PRED)
    with pytest.raises(DatasetError, match="case3"):
        evaluate_folders(pred_dir, gt_dir)
    (pred_dir / "case3.nii.gz").unlink()
    _write(gt_dir / "case4.nrrd", GT)
    with pytest.raises(DatasetError, match="no prediction for case 'case4'"):
        evaluate_folders(pred_dir, gt_dir)


def test_evaluate_geometry_and_label_errors(folders):
    pred_dir, gt_dir = folders
    _write(pred_dir / "case1.nii.gz", np.zeros((8, 7, 6)))
    with pytest.raises(DatasetError) as info:
        evaluate_folders(pred_dir, gt_dir)
    message = str(info.value)
    assert message.startswith(str(pred_dir / "case1.nii.gz")) and str(gt_dir / "case1.nii.gz") in message

    _write(pred_dir / "case1.nii.gz", PRED * 3)
    with pytest.raises(DatasetError, match=r"label values \[3\]"):
        evaluate_folders(pred_dir, gt_dir, labels={1: "liver", 2: "spleen"})

    _write(pred_dir / "case1.nii.gz", PRED * 0.5, pixel=np.float32)
    with pytest.raises(DatasetError, match="non-integer"):
        evaluate_folders(pred_dir, gt_dir)

    (pred_dir / "case1.nii.gz").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="case1.nii.gz"):
        evaluate_folders(pred_dir, gt_dir)

    with pytest.raises(DatasetError, match="not found"):
        evaluate_folders(pred_dir / "nope", gt_dir)
