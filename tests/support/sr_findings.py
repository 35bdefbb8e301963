"""Reading the coded findings of an answer report back, with the codes stated here through pydicom's own code
dictionary (`pydicom.sr.codedict.codes`), not through gmaivl_rt's table: what the report says in codes, turned
back into the findings schema's fields (examples/findings.schema.json), to compare with the JSON answer."""
from __future__ import annotations

from pydicom.sr.codedict import codes

# field -> {schema value: pydicom Code}; the context group each value must belong to (pydicom's CID tables)
VALUES = {
    "modality": ({"CT": codes.DCM.ComputedTomography, "MR": codes.DCM.MagneticResonance,
                  "US": codes.DCM.Ultrasound, "PT": codes.DCM.PositronEmissionTomography,
                  "NM": codes.DCM.NuclearMedicine}, 29),
    "plane": ({"axial": codes.SCT.Axial, "coronal": codes.SCT.Coronal, "sagittal": codes.SCT.Sagittal,
               "oblique": codes.SCT.Oblique}, 6312),
    "body_part": ({"head": codes.SCT.Head, "neck": codes.SCT.Neck, "chest": codes.SCT.Chest,
                   "abdomen": codes.SCT.Abdomen, "pelvis": codes.SCT.Pelvis, "spine": codes.SCT.Spine,
                   "extremity": codes.SCT.Extremity}, 4031),
    "lesion.present": ({True: codes.SCT.Present, False: codes.SCT.Absent}, 241),
    "lesion.side": ({"left": codes.SCT.Left, "right": codes.SCT.Right, "bilateral": codes.SCT.Bilateral,
                     "midline": codes.DCM.Median}, 245),
}
CONCEPTS = {"modality": codes.DCM.Modality, "plane": codes.DCM.AcquisitionPlane, "body_part": codes.DCM.TargetRegion,
            "lesion": codes.DCM.Finding, "lesion.present": codes.DCM.PresenceOfProperty,
            "lesion.side": codes.SCT.Laterality, "lesion.size_mm": codes.SCT.Diameter}
# Values the findings schema has that no single standard code names (kept in the answer text only).
UNCODED = {"modality": {"XR", "other"}, "plane": {"not applicable"}, "body_part": {"other"}, "lesion.side": {"none"}}


def _key(item) -> tuple:
    return item.CodingSchemeDesignator, item.CodeValue


def _is(code_item, code) -> bool:
    return _key(code_item) == (code.scheme_designator, code.value)


def _value(field: str, item):
    table, _ = VALUES[field]
    found = [v for v, code in table.items() if _is(item.ConceptCodeSequence[0], code)]
    assert len(found) == 1, f"{field}: code {_key(item.ConceptCodeSequence[0])} is none of the expected ones"
    return found[0]


def findings_from_report(ds) -> dict:
    """The CODE / NUM items directly under a report's root (pydicom Dataset) -> {"modality": ..., "plane": ...,
    "body_part": ..., "lesion": {"present": ..., "side": ..., "size_mm": ...}} with only the fields coded."""
    found: dict = {}
    for item in ds.ContentSequence:
        if item.ValueType != "CODE":
            continue
        name = item.ConceptNameCodeSequence[0]
        field = next(f for f, code in CONCEPTS.items() if _is(name, code))
        assert item.RelationshipType == "CONTAINS"
        if field != "lesion":
            assert field not in found, f"{field} coded twice"
            found[field] = _value(field, item)
            continue
        assert _is(item.ConceptCodeSequence[0], codes.SCT.Lesion)
        lesion = found.setdefault("lesion", {})
        for child in item.ContentSequence:
            part = next(f for f, code in CONCEPTS.items() if _is(child.ConceptNameCodeSequence[0], code))
            if part == "lesion.size_mm":
                assert child.ValueType == "NUM" and child.RelationshipType == "HAS PROPERTIES"
                measured = child.MeasuredValueSequence[0]
                assert _key(measured.MeasurementUnitsCodeSequence[0]) == ("UCUM", "mm")
                lesion["size_mm"] = float(measured.NumericValue)
            else:
                want = "HAS CONCEPT MOD" if part == "lesion.side" else "HAS PROPERTIES"
                assert child.ValueType == "CODE" and child.RelationshipType == want, part
                lesion[part.split(".")[1]] = _value(part, child)
    return found


def codable(answer: dict) -> dict:
    """A findings JSON answer with what the report codes: values without a standard code left out, the size only
    for a present lesion."""
    out = {}
    for field in ("modality", "plane", "body_part"):
        if field in answer and answer[field] in VALUES[field][0]:
            out[field] = answer[field]
    lesion = answer.get("lesion")
    if isinstance(lesion, dict) and isinstance(lesion.get("present"), bool):
        coded = {"present": lesion["present"]}
        if lesion.get("side") in VALUES["lesion.side"][0]:
            coded["side"] = lesion["side"]
        if lesion["present"] and isinstance(lesion.get("size_mm"), int):
            coded["size_mm"] = float(lesion["size_mm"])
        out["lesion"] = coded
    return out
