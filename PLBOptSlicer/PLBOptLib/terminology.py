"""Standard terminology (SNOMED CT codes) for class names the module recognises.

A segment that carries a terminology entry keeps its meaning when exported (DICOM SEG) or
compared with other tools, as SlicerTotalSegmentator does for organs. Unknown names get no
entry; the segment keeps the class name and colour from training.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

# The entry format and codes SlicerTotalSegmentator writes for the same organs.
CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"
LATERALITY = {"left": "SCT^7771000^Left", "right": "SCT^24028007^Right"}

# Normalised class name (without side) -> (SNOMED CT code, code meaning).
ANATOMY_CODES = {
    "liver": ("10200004", "Liver"),
    "spleen": ("78961009", "Spleen"),
    "pancreas": ("15776009", "Pancreas"),
    "stomach": ("69695003", "Stomach"),
    "gallbladder": ("28231008", "Gallbladder"),
    "aorta": ("15825003", "Aorta"),
    "inferior vena cava": ("64131007", "Inferior vena cava"),
    "esophagus": ("32849002", "Esophagus"),
    "trachea": ("44567001", "Trachea"),
    "duodenum": ("38848004", "Duodenum"),
    "small intestine": ("30315005", "Small Intestine"),
    "colon": ("71854001", "Colon"),
    "kidney": ("64033007", "Kidney"),
    "adrenal gland": ("23451007", "Adrenal gland"),
    "urinary bladder": ("89837001", "Bladder"),  # the code meaning of Slicer's DICOM master list
    "prostate": ("41216001", "Prostate"),
    "heart": ("80891009", "Heart"),
    "lung": ("39607008", "Lung"),
    "brain": ("12738006", "Brain"),
}
# Organs that come in a left and a right one: only these take a laterality modifier (as in Slicer's
# DICOM master list); "left liver" names no structure the list has, so it gets no entry at all.
PAIRED_ORGANS = {"kidney", "adrenal gland", "lung"}
SYNONYMS = {"gall bladder": "gallbladder", "bladder": "urinary bladder", "ivc": "inferior vena cava",
            "postcava": "inferior vena cava", "oesophagus": "esophagus", "small bowel": "small intestine"}


def normalise(name: str) -> Tuple[str, Optional[str]]:
    """``Kidney_Left`` / ``left kidney`` -> (``kidney``, ``left``): case and separators unified,
    the side (first or last word) split off."""
    words = re.sub(r"[_\-.]+", " ", name.strip().lower()).split()
    side = None
    if len(words) > 1 and words[0] in LATERALITY:
        side, words = words[0], words[1:]
    elif len(words) > 1 and words[-1] in LATERALITY:
        side, words = words[-1], words[:-1]
    text = " ".join(words)
    return SYNONYMS.get(text, text), side


def terminology_entry(class_name: str) -> Optional[str]:
    """Slicer's serialised terminology entry for ``class_name``, or None when it is not known."""
    base, side = normalise(class_name)
    code = ANATOMY_CODES.get(base)
    if code is None:
        return None
    if side and base not in PAIRED_ORGANS:
        return None
    value, meaning = code
    modifier = LATERALITY[side] if side else "^^"
    return f"{CATEGORY_CONTEXT}~{ANATOMICAL_STRUCTURE}~SCT^{value}^{meaning}~{modifier}~{ANATOMIC_CONTEXT}~^^~^^"
