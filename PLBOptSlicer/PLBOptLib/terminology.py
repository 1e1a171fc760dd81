"""Standard terminology (SNOMED CT codes) for class names the module recognises.

A segment that carries a terminology entry keeps its meaning when exported (DICOM SEG) or
compared with other tools, as SlicerTotalSegmentator does for organs. Unknown names get no
entry; the segment keeps the class name and colour from training.
"""

from __future__ import annotations

import re
from typing import Optional

CATEGORY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"

# Normalised class name -> (SNOMED CT code, code meaning).
ANATOMY_CODES = {
    "liver": ("10200004", "Liver"),
    "spleen": ("78961009", "Spleen"),
    "pancreas": ("15776009", "Pancreas"),
    "stomach": ("69695003", "Stomach"),
    "gallbladder": ("28231008", "Gallbladder"),
    "aorta": ("15825003", "Aorta"),
    "inferior vena cava": ("64131007", "Inferior vena cava"),
    "esophagus": ("32849002", "Esophagus"),
    "duodenum": ("38848004", "Duodenum"),
    "kidney": ("64033007", "Kidney"),
    "right kidney": ("9846003", "Right kidney"),
    "left kidney": ("18639004", "Left kidney"),
    "adrenal gland": ("23451007", "Adrenal gland"),
    "urinary bladder": ("89837001", "Urinary bladder"),
    "prostate": ("41216001", "Prostate"),
    "heart": ("80891009", "Heart"),
    "lung": ("39607008", "Lung"),
    "brain": ("12738006", "Brain"),
    "colon": ("71854001", "Colon"),
    "small intestine": ("30315005", "Small intestine"),
}
SYNONYMS = {"gall bladder": "gallbladder", "bladder": "urinary bladder", "ivc": "inferior vena cava",
            "postcava": "inferior vena cava", "oesophagus": "esophagus"}


def normalise(name: str) -> str:
    """``Kidney_Left`` -> ``left kidney`` (case, separators and a trailing laterality unified)."""
    words = re.sub(r"[_\-.]+", " ", name.strip().lower()).split()
    text = " ".join(words)
    if len(words) == 2 and words[1] in ("left", "right"):
        text = f"{words[1]} {words[0]}"
    return SYNONYMS.get(text, text)


def terminology_entry(class_name: str) -> Optional[str]:
    """Slicer's serialised terminology entry for ``class_name``, or None when it is not known."""
    code = ANATOMY_CODES.get(normalise(class_name))
    if code is None:
        return None
    value, meaning = code
    return f"{CATEGORY_CONTEXT}~{ANATOMICAL_STRUCTURE}~SCT^{value}^{meaning}~^^~{ANATOMIC_CONTEXT}~^^~^^"
