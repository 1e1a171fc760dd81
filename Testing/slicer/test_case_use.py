"""Which volumes of the scene the export uses as cases (issue 21 item 7): a PET, a dose grid or a
resampled copy is not silently exported as unlabeled training data; the case table shows why, and
the user's tick wins and is saved with the scene. Against real MRML nodes."""

from __future__ import annotations

import json

import numpy as np

import slicer
from conftest import add_volume, phantom_case, save_and_reopen
from PLBOptLib import WorkflowLogic, cases, panel
from test_plboptlib import add_phantom

CT_SPACING = (0.8, 0.7, 2.5)  # add_volume's default: finest 0.7 mm


def tag_modality(volume, modality):
    """What Slicer's DICOM import records: the series modality on the volume's subject hierarchy item."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volume.GetScene())
    item = hierarchy.GetItemByDataNode(volume) or hierarchy.CreateItem(hierarchy.GetSceneItemID(), volume)
    hierarchy.SetItemAttribute(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName(),
                               modality)
    return volume


def mixed_scene(scene):
    """A labeled CT and an unlabeled CT (from DICOM), an unlabeled scan read from NIfTI (no
    modality known), and what else a radiotherapy or PET/CT session leaves in the scene."""
    labeled, _, _ = add_phantom(scene, "CT labeled", seed=0)
    tag_modality(labeled, "CT")
    tag_modality(add_phantom(scene, "CT unlabeled", seed=1, labeled=False)[0], "CT")
    add_phantom(scene, "nifti scan", seed=2, labeled=False)
    image, _ = phantom_case(seed=3)
    tag_modality(add_volume(scene, "PET", image, spacing=(4.0, 4.0, 4.0)), "PT")
    tag_modality(add_volume(scene, "MR", image), "MR")  # same grid as the CTs: told apart by its modality only
    dose = add_volume(scene, "Dose", image)  # SlicerRT's mark, on a CT-like grid
    dose.SetAttribute("DicomRtImport.DoseVolume", "1")
    add_volume(scene, "resampled 3 mm", image, spacing=(3.0, 3.0, 3.0))
    add_volume(scene, "one slice", image[:1])
    colour = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "screenshot")
    slicer.util.updateVolumeFromArray(colour, np.zeros((4, 5, 6, 3), np.uint8))
    return labeled


def test_a_pet_a_dose_grid_and_a_resampled_copy_are_no_cases_by_default_and_the_table_says_why(scene, tmp_path):
    mixed_scene(scene)
    logged = []
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=logged.append)
    rows = {row.case_name: row for row in panel.case_rows(logic)}
    assert {name: row.used for name, row in rows.items()} == {
        "CT_labeled": True, "CT_unlabeled": True, "nifti_scan": True, "PET": False, "MR": False, "Dose": False,
        "resampled_3_mm": False, "one_slice": False, "screenshot": False}
    why = {name: row.cells[4] for name, row in rows.items()}
    assert why["CT_unlabeled"] == why["nifti_scan"] == why["CT_labeled"] == ""
    assert why["MR"] == "modality MR; the labeled cases are CT"
    assert why["PET"] == "modality PT; the labeled cases are CT"
    assert why["Dose"] == "a radiotherapy dose grid (DICOM-RT import)"
    assert why["resampled_3_mm"].startswith("finest voxel spacing 3 mm, the labeled cases' 0.7 mm")
    assert why["one_slice"] == "a single slice; training needs 3D volumes"
    assert why["screenshot"].startswith("3 values per voxel")

    exported = logic.export_dataset()
    assert (exported.labeled, exported.unlabeled) == (["CT_labeled"], ["CT_unlabeled", "nifti_scan"])
    dataset = json.loads((tmp_path / "dataset" / "dataset.json").read_text())
    assert [entry["image"] for entry in dataset["unlabeled"]] == ["imagesUn/CT_unlabeled.nii.gz",
                                                                   "imagesUn/nifti_scan.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "dataset" / "imagesUn").iterdir()) == ["CT_unlabeled.nii.gz",
                                                                                      "nifti_scan.nii.gz"]
    assert "Not exported: PET (modality PT; the labeled cases are CT)" in logged


def test_a_dicom_modality_on_the_node_itself_counts_too(scene):
    add_phantom(scene, "CT", seed=0)
    image, _ = phantom_case(seed=1)
    dose = add_volume(scene, "dose grid", image)
    dose.SetAttribute("DICOM.Modality", "RTDOSE")
    uses = cases.case_uses(cases.find_cases(scene))
    assert uses[dose.GetID()] == cases.CaseUse(False, "modality RTDOSE: a radiotherapy dose grid", False)


def test_the_users_tick_wins_and_is_saved_with_the_scene(scene, tmp_path):
    mixed_scene(scene)
    # A second labeled case whose segments are named otherwise: its export would stop with an error.
    other, _, _ = add_phantom(scene, "other labeled", seed=4, segment_order=("liver",))
    segmentation = cases.find_case(scene, "other_labeled").segmentation
    segmentation.GetSegmentation().GetSegment("liver").SetName("Liver tumour")
    logic = WorkflowLogic(scene, working_dir=tmp_path, log_callback=lambda line: None)
    volume_of = {case.name: case.volume.GetID() for case in logic.cases()}

    logic.set_case_use(volume_of["PET"], True)  # the user wants it anyway
    logic.set_case_use(volume_of["nifti_scan"], False)
    logic.set_case_use(volume_of["other_labeled"], False)  # left out instead of renamed
    rows = {row.case_name: row for row in panel.case_rows(logic)}
    assert rows["PET"].used and rows["PET"].cells[4] == "ticked by you (by default not: modality PT; the labeled cases are CT)"
    assert not rows["nifti_scan"].used and rows["nifti_scan"].cells[4] == "unticked by you"
    assert logic.class_names() == ["liver", "spleen"]  # the unticked labeled case no longer disagrees
    exported = logic.export_dataset()
    assert (exported.labeled, exported.unlabeled) == (["CT_labeled"], ["CT_unlabeled", "PET"])

    reopened = save_and_reopen(scene, tmp_path / "saved")
    again = {row.case_name: row.used for row in panel.case_rows(WorkflowLogic(reopened, working_dir=tmp_path))}
    assert (again["PET"], again["nifti_scan"], again["other_labeled"], again["MR"]) == (True, False, False, False)

    logic.set_case_use(volume_of["PET"], None)  # back to the default
    assert not {row.case_name: row.used for row in panel.case_rows(logic)}["PET"]


def test_without_labeled_cases_or_modalities_every_readable_volume_is_a_case(scene):
    for seed, spacing in ((0, CT_SPACING), (1, (3.0, 3.0, 3.0))):
        image, _ = phantom_case(seed=seed)
        add_volume(scene, f"scan {seed}", image, spacing=spacing)
    uses = cases.case_uses(cases.find_cases(scene))
    assert all(use.used and use.reason == "" for use in uses.values())


def test_the_export_names_the_labeled_cases_modality_so_the_core_plans_ct_or_mri(scene, tmp_path):
    """dataset.json's channel_names carries the labeled cases' DICOM modality: PLBOptCore then
    plans CT normalisation (HU body crop) for CT and a per-case z-score otherwise; without a known
    modality there is no channel_names, which the core treats as not CT."""
    from PLBOptCore.data.dataset import load_dataset
    from PLBOptCore.data.plan import is_ct

    labeled, _, _ = add_phantom(scene, "CT labeled", seed=0)
    tag_modality(labeled, "CT")
    WorkflowLogic(scene, working_dir=tmp_path).export_dataset()
    dataset_json = tmp_path / "dataset" / "dataset.json"
    assert json.loads(dataset_json.read_text())["channel_names"] == {"0": "CT"}
    assert is_ct(load_dataset(tmp_path / "dataset").modality)

    tag_modality(labeled, "MR")
    WorkflowLogic(scene, working_dir=tmp_path).export_dataset()
    assert json.loads(dataset_json.read_text())["channel_names"] == {"0": "MR"}
    assert not is_ct(load_dataset(tmp_path / "dataset").modality)

    second, _, _ = add_phantom(scene, "second labeled", seed=1)  # no modality known: none written
    WorkflowLogic(scene, working_dir=tmp_path).export_dataset()
    assert "channel_names" not in json.loads(dataset_json.read_text())
