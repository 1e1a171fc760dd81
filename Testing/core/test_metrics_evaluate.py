"""Metrics on hand-computed volumes and folder evaluation on small NIfTI/MHA files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from PLBOptCore.errors import ConfigError, DatasetError
from PLBOptCore.evaluate import evaluate_folders, format_table
from PLBOptCore.metrics import METRIC_NAMES, asd, assd, compute_case_metrics, dice, hd95, surface, surface_distances


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


def _scores(metrics):
    return {m: metrics[m] for m in ("dice", "asd", "assd", "hd95")}


def test_compute_case_metrics():
    pred = PRED.astype(np.int16)
    gt = GT.astype(np.int16)
    gt[0, 0, 0] = 2  # class 2 only in GT
    diagonal = math.sqrt((8 * 2.0) ** 2 + 7 ** 2 + 7 ** 2)  # (8, 7, 7) voxels of (2, 1, 1) mm
    result = compute_case_metrics(pred, gt, num_classes=4, spacing=SPACING)
    assert set(result) == {1, 2, 3}
    assert _scores(result[1]) == pytest.approx({"dice": 2 / 3, "asd": 19 / 26, "assd": 19 / 26, "hd95": 2.0})
    assert result[1]["empty"] == "none"
    assert result[2] == pytest.approx({"dice": 0.0, "asd": diagonal, "assd": diagonal, "hd95": diagonal,
                                       "empty": "prediction"})
    assert result[3]["empty"] == "both" and all(math.isnan(v) for v in _scores(result[3]).values())

    legacy = compute_case_metrics(pred, gt, num_classes=4, spacing=SPACING, empty="perfect", missing="skip")
    assert legacy[2]["dice"] == 0.0 and math.isnan(legacy[2]["asd"]) and math.isnan(legacy[2]["hd95"])
    assert _scores(legacy[3]) == {"dice": 1.0, "asd": 0.0, "assd": 0.0, "hd95": 0.0}
    monai = compute_case_metrics(gt, pred, num_classes=3, spacing=SPACING, missing="inf")
    assert monai[2]["empty"] == "ground_truth" and monai[2]["hd95"] == math.inf and monai[2]["dice"] == 0.0


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
    case2 (.mha prediction): perfect. The confidence/ folder of `plbopt predict` must be ignored."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    gt1 = GT.astype(np.uint8)
    gt1[7, 6, 6] = 2
    _write(pred_dir / "case1.nii.gz", PRED)
    _write(gt_dir / "case1.nii.gz", gt1)
    _write(pred_dir / "confidence" / "case1.nii.gz", np.full(PRED.shape, 0.5), pixel=np.float32)
    both = GT.astype(np.uint8) + 2 * _cube(GT.shape, (0, 0, 4), 2)
    _write(pred_dir / "case2.mha", both)
    _write(gt_dir / "case2.nii.gz", both)
    return pred_dir, gt_dir


def test_evaluate_folders(folders, tmp_path):
    pred_dir, gt_dir = folders
    diagonal = math.sqrt((8 * 2.0) ** 2 + 7 ** 2 + 7 ** 2)
    results = evaluate_folders(pred_dir, gt_dir, labels={0: "background", 1: "liver", 2: "spleen"})
    assert results["conventions"] == {"empty": "ignore", "missing": "diagonal", "hd95": "pooled", "average": "classes"}
    assert set(results["cases"]) == {"case1", "case2"}
    liver1 = results["cases"]["case1"]["liver"]
    assert _scores(liver1) == pytest.approx({"dice": 2 / 3, "asd": 19 / 26, "assd": 19 / 26, "hd95": 2.0})
    spleen1 = results["cases"]["case1"]["spleen"]
    assert spleen1["dice"] == 0.0 and spleen1["asd"] == pytest.approx(diagonal) and spleen1["empty"] == "prediction"
    assert _scores(results["cases"]["case2"]["spleen"]) == {"dice": 1.0, "asd": 0.0, "assd": 0.0, "hd95": 0.0}

    liver = results["classes"]["liver"]
    assert liver["dice"]["mean"] == pytest.approx((2 / 3 + 1) / 2)
    assert liver["dice"]["std"] == pytest.approx(1 / 6)
    assert liver["asd"]["mean"] == pytest.approx(19 / 52)
    spleen = results["classes"]["spleen"]
    assert spleen["n_missing"] == 1 and liver["n_missing"] == 0 and spleen["n_absent"] == 0
    assert spleen["dice"]["mean"] == pytest.approx(0.5)  # the missing case's Dice 0 counts
    assert spleen["asd"]["mean"] == pytest.approx(diagonal / 2)  # and so does its worst-case distance
    assert results["mean"]["dice"] == pytest.approx(((2 / 3 + 1) / 2 + 0.5) / 2)

    with open(pred_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    assert [(r["case"], r["label"], r["class"], r["empty"]) for r in rows] == [
        ("case1", "1", "liver", "none"), ("case1", "2", "spleen", "prediction"), ("case2", "1", "liver", "none"),
        ("case2", "2", "spleen", "none")]
    assert float(rows[0]["asd_mm"]) == pytest.approx(19 / 26) and float(rows[1]["asd_mm"]) == pytest.approx(diagonal)
    saved = json.loads((pred_dir / "metrics.json").read_text())
    assert saved["conventions"]["missing"] == "diagonal"
    assert saved["classes"]["liver"]["hd95"]["mean"] == pytest.approx(1.0)
    assert not [p for p in pred_dir.iterdir() if p.name.startswith(".tmp")]

    table = format_table(results)
    assert "liver" in table and "spleen" in table and "0.8333±0.1667" in table
    assert "--empty ignore" in table and "--missing diagonal" in table and "--hd95 pooled" in table
    print(table)

    # earlier PLBOpt tables: the missing organ's distance is left out, so the spleen ASD mean is 0
    legacy = evaluate_folders(pred_dir, gt_dir, labels={1: "liver", 2: "spleen"}, empty="perfect", missing="skip")
    assert legacy["classes"]["spleen"]["asd"]["mean"] == 0.0 and legacy["classes"]["spleen"]["n_missing"] == 1
    assert math.isnan(legacy["cases"]["case1"]["spleen"]["asd"])
    saved = json.loads((pred_dir / "metrics.json").read_text())
    assert saved["cases"]["case1"]["spleen"]["asd"] is None

    # infinite distance (MONAI's ASD), an infinite class mean, written as "inf"
    monai = evaluate_folders(pred_dir, gt_dir, labels={1: "liver", 2: "spleen"}, missing="inf", hd95="max")
    assert monai["classes"]["spleen"]["hd95"]["mean"] == math.inf and monai["mean"]["hd95"] == math.inf
    assert json.loads((pred_dir / "metrics.json").read_text())["classes"]["spleen"]["hd95"]["mean"] == "inf"
    assert "inf" in format_table(monai).splitlines()[-1]
    with pytest.raises(ConfigError, match="^hd95: 'median' is not one of pooled, max"):
        evaluate_folders(pred_dir, gt_dir, hd95="median")


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


# ---------------------------------------------- cross-check with an independent implementation
# Surfaces from SimpleITK's BinaryContour (face connectivity), distances from its Maurer distance
# map, Dice from LabelOverlapMeasures, the conventions written out from the README's table.
XCHECK_SPACING = (2.5, 0.8, 1.1)  # (Z, Y, X) mm
XCHECK_SHAPE = (16, 20, 18)


def _sitk_image(mask):
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(XCHECK_SPACING[::-1])
    return image


def _sitk_surface(mask):
    contour = sitk.BinaryContour(_sitk_image(mask), fullyConnected=False, backgroundValue=0, foregroundValue=1)
    return sitk.GetArrayFromImage(contour).astype(bool)


def _sitk_distances(a, b):
    distance = sitk.SignedMaurerDistanceMap(_sitk_image(_sitk_surface(b)), insideIsPositive=False,
                                            squaredDistance=False, useImageSpacing=True)
    return np.abs(sitk.GetArrayFromImage(distance))[_sitk_surface(a)]


def _reference(pred, gt, empty, missing, hd95_convention):
    """(dice, asd, assd, hd95) of one class, or None when it is not scored."""
    if not pred.any() and not gt.any():
        return None if empty == "ignore" else (1.0, 0.0, 0.0, 0.0)
    if not pred.any() or not gt.any():
        extent = np.array(XCHECK_SHAPE) * np.array(XCHECK_SPACING)
        d = {"diagonal": float(np.sqrt((extent ** 2).sum())), "inf": math.inf, "skip": math.nan}[missing]
        return (0.0, d, d, d)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(_sitk_image(gt), _sitk_image(pred))
    d_pg, d_gp = _sitk_distances(pred, gt), _sitk_distances(gt, pred)
    pooled = np.concatenate([d_pg, d_gp])
    hd = np.percentile(pooled, 95) if hd95_convention == "pooled" else max(np.percentile(d_pg, 95),
                                                                            np.percentile(d_gp, 95))
    return (overlap.GetDiceCoefficient(), d_pg.mean(), pooled.mean(), hd)


def _box(start, stop):
    mask = np.zeros(XCHECK_SHAPE, bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    return mask


@pytest.fixture(scope="module")
def xcheck_cases():
    """Two cases, classes 1-4. Case a: 1 in both (the prediction with a far false-positive blob, so
    pooled and max HD95 differ), 2 only in GT, 3 only in the prediction, 4 in neither.
    Case b: 1, 2 and 4 in both (irregular), 3 in neither."""
    rng = np.random.default_rng(5)
    a_gt, a_pred = np.zeros(XCHECK_SHAPE, np.uint8), np.zeros(XCHECK_SHAPE, np.uint8)
    a_gt[_box((3, 4, 3), (9, 12, 10))] = 1
    a_pred[_box((4, 5, 3), (10, 12, 11)) | _box((12, 14, 13), (14, 17, 16))] = 1
    a_gt[_box((10, 3, 3), (13, 8, 7))] = 2
    a_pred[_box((2, 14, 2), (4, 17, 6))] = 3
    b_gt, b_pred = np.zeros(XCHECK_SHAPE, np.uint8), np.zeros(XCHECK_SHAPE, np.uint8)
    b_gt[_box((2, 2, 2), (8, 10, 9)) & (rng.random(XCHECK_SHAPE) > 0.1)] = 1
    b_pred[_box((3, 2, 3), (8, 11, 9))] = 1
    b_gt[_box((9, 10, 9), (14, 17, 16))] = 2
    b_pred[_box((9, 11, 8), (13, 17, 16)) & (rng.random(XCHECK_SHAPE) > 0.2)] = 2
    b_gt[_box((2, 13, 2), (6, 18, 7))] = 4
    b_pred[_box((2, 12, 2), (7, 18, 6))] = 4
    return {"a": (a_pred, a_gt), "b": (b_pred, b_gt)}


@pytest.mark.parametrize("hd95_convention", ["pooled", "max"])
@pytest.mark.parametrize("missing", ["diagonal", "inf", "skip"])
@pytest.mark.parametrize("empty", ["ignore", "perfect"])
def test_evaluate_matches_an_independent_implementation(xcheck_cases, tmp_path, empty, missing, hd95_convention):
    for name, (pred, gt) in xcheck_cases.items():
        _write(tmp_path / "pred" / f"{name}.nii.gz", pred, XCHECK_SPACING[::-1])
        _write(tmp_path / "gt" / f"{name}.nii.gz", gt, XCHECK_SPACING[::-1])
    labels = {0: "background", 1: "one", 2: "two", 3: "three", 4: "four"}
    results = evaluate_folders(tmp_path / "pred", tmp_path / "gt", labels=labels, empty=empty, missing=missing,
                               hd95=hd95_convention)
    class_means = {m: [] for m in METRIC_NAMES}
    for c in range(1, 5):
        per_case = {name: _reference(pred == c, gt == c, empty, missing, hd95_convention)
                    for name, (pred, gt) in xcheck_cases.items()}
        for name, expected in per_case.items():
            got = [results["cases"][name][labels[c]][m] for m in METRIC_NAMES]
            if expected is None:
                assert all(math.isnan(v) for v in got)
            else:
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        for i, m in enumerate(METRIC_NAMES):
            scored = [e[i] for e in per_case.values() if e is not None and not math.isnan(e[i])]
            mean = sum(scored) / len(scored) if scored else math.nan
            got = results["classes"][labels[c]][m]["mean"]
            assert (math.isnan(got) and math.isnan(mean)) or got == pytest.approx(mean, rel=1e-5)
            class_means[m].append(mean)
    for m in METRIC_NAMES:
        scored = [v for v in class_means[m] if not math.isnan(v)]
        assert results["mean"][m] == pytest.approx(sum(scored) / len(scored), rel=1e-5)
    # the conventions are not vacuous on these volumes
    a_pred, a_gt = xcheck_cases["a"]
    assert _reference(a_pred == 1, a_gt == 1, empty, missing, "max")[3] > \
        _reference(a_pred == 1, a_gt == 1, empty, missing, "pooled")[3] + 1.0


def test_evaluate_pairs_require_the_same_origin_and_direction(folders):
    pred_dir, gt_dir = folders
    image = sitk.ReadImage(str(pred_dir / "case1.nii.gz"))
    image.SetOrigin((0.0, 0.0, 5.0))
    sitk.WriteImage(image, str(pred_dir / "case1.nii.gz"))
    with pytest.raises(DatasetError) as err:
        evaluate_folders(pred_dir, gt_dir)
    message = str(err.value)
    assert message.startswith(f"{pred_dir / 'case1.nii.gz'}: origin") and str(gt_dir / "case1.nii.gz") in message
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    sitk.WriteImage(image, str(pred_dir / "case1.nii.gz"))
    with pytest.raises(DatasetError, match="direction"):
        evaluate_folders(pred_dir, gt_dir)
