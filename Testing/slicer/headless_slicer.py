"""Headless MRML environment from the PyPI ``slicer-core`` wheel, set up the way trame-slicer does.

The wheel has MRML, the module logics and ``slicer.util`` but no application: ``slicer.app``,
``slicer.modules`` and ``slicer.mrmlScene`` are missing. ``slicer.util`` helpers such as
``updateSegmentBinaryLabelmapFromArray`` look those up at call time, so we provide a scene and the
two module logics they use. Creating the segmentations logic on the scene registers the
binary-labelmap <-> closed-surface converter rules; without them segments cannot hold labelmaps.
"""

from __future__ import annotations

import types

import slicer


def create_headless_scene() -> "slicer.vtkMRMLScene":
    """Return a fresh scene wired to application, colour, segmentations and volumes logics.

    ``slicer.mrmlScene`` and ``slicer.modules.{segmentations,volumes}.logic()`` point at it
    afterwards, so code written for the Slicer application runs unchanged.
    """
    scene = slicer.vtkMRMLScene()
    scene.AddNode(slicer.vtkMRMLCrosshairNode())
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    # The volumes logic finds colour tables for label maps through the "Colors" module logic.
    app_logic.SetModuleLogic("Colors", app_logic.GetColorLogic())

    def register(logic, name: str):
        logic.SetMRMLScene(scene)  # also registers the logic's node classes and converter rules
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        return logic

    # The Colors module registers this class in the application; the module adds confidence legends.
    scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
    segmentations_logic = register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
    volumes_logic = register(slicer.vtkSlicerVolumesLogic(), "Volumes")

    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: segmentations_logic),
        volumes=types.SimpleNamespace(logic=lambda: volumes_logic),
    )
    # Keep the logics alive as long as the scene is used.
    scene._plbopt_logics = (app_logic, segmentations_logic, volumes_logic)
    return scene
