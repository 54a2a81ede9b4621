"""Radiology-style reports written from a phantom case's findings, in many phrasings.

The text must say exactly what the findings say (sex, age, contrast phase, every tumour's site,
side and size, TNM, smoking), but in varied words and order so that the text encoder sees real
variety: templates per sentence type, site synonyms (hepatic, renal, pulmonary, colonic, ...),
sizes in mm, cm or "a x b cm", counts as words, several TNM spellings and negative statements.
"""

from __future__ import annotations

import numpy as np

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty", 9: "ninety"}

# site → (nouns, adjective) ; nouns are used as "in the {noun}"
SITES: dict[str, tuple[list[str], str | None]] = {
    "liver": (["liver", "hepatic parenchyma", "right lobe of the liver", "liver parenchyma"], "hepatic"),
    "kidney": (["kidney", "renal parenchyma"], "renal"),
    "lung": (["lung", "pulmonary parenchyma"], "pulmonary"),
    "colon": (["colon", "large bowel", "colonic wall"], "colonic"),
    "pancreas": (["pancreas", "pancreatic body", "pancreatic parenchyma"], "pancreatic"),
    "spleen": (["spleen", "splenic parenchyma"], "splenic"),
    "stomach": (["stomach", "gastric wall"], "gastric"),
    "small_bowel": (["small bowel", "small intestine", "jejunum"], "small bowel"),
    "duodenum": (["duodenum", "duodenal wall"], "duodenal"),
    "urinary_bladder": (["urinary bladder", "bladder", "bladder wall"], "bladder"),
    "heart": (["heart", "cardiac silhouette"], "cardiac"),
    "vertebrae": (["spine", "vertebral body", "vertebral column"], "vertebral"),
    "rib": (["rib", "chest wall ribs"], "rib"),
    "adrenal_gland": (["adrenal gland", "adrenal"], "adrenal"),
    "portal_splenic_vein": (["portal vein", "portal venous system", "splenoportal axis"], "portal venous"),
    "esophagus": (["esophagus", "oesophagus", "esophageal wall"], "esophageal"),
    "aorta": (["aorta", "aortic wall"], "aortic"),
    "inferior_vena_cava": (["inferior vena cava", "IVC"], "caval"),
    "gallbladder": (["gallbladder", "gallbladder fundus"], "gallbladder"),
}
PHASE_WORDS = {
    "non_contrast": ["non-contrast", "unenhanced", "without intravenous contrast", "plain (non-contrast)", "noncontrast", "native (unenhanced)"],
    "arterial": ["arterial phase", "late arterial phase", "arterial-phase contrast-enhanced", "contrast-enhanced arterial phase", "arterial", "early arterial phase"],
    "portal_venous": ["portal venous phase", "portal-venous phase", "venous phase", "contrast-enhanced portal venous", "portal venous", "PV phase"],
}
MASS = ["mass", "lesion", "tumor", "tumour", "mass lesion", "nodule", "neoplasm"]


def number_word(n: int) -> str:
    """0..99 as English words ("sixty-two")."""
    if n < 11:
        return NUMBER_WORDS[n]
    teens = ["eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
    if n < 20:
        return teens[n - 11]
    if n < 100:
        t, u = divmod(n, 10)
        return _TENS[t] + ("" if u == 0 else f"-{NUMBER_WORDS[u]}")
    return str(n)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _size(size_mm: float, rng: np.random.Generator) -> str:
    """'32 mm', '3.2 cm', '3.2 x 2.1 cm' or '32 x 21 mm' (the first dimension is the size)."""
    form = int(rng.integers(5))
    cm = size_mm / 10
    second = size_mm * rng.uniform(0.6, 0.95)
    if form == 0:
        return f"{size_mm:.0f} mm"
    if form == 1:
        return f"{cm:.1f} cm"
    if form == 2:
        return f"{cm:.1f} x {second / 10:.1f} cm"
    if form == 3:
        return f"{size_mm:.0f} x {second:.0f} mm"
    return f"{cm:.1f}-cm"


def _site_phrase(t: dict, rng: np.random.Generator) -> tuple[str, str]:
    """(noun phrase 'the left kidney', adjective phrase 'left renal')."""
    nouns, adj = SITES.get(t["site"], ([t["site"].replace("_", " ")], None))
    noun = _pick(rng, nouns)
    side = t.get("side")
    if side:
        noun_p = f"the {side} {noun}"
        adj_p = f"{side} {adj or noun}"
    else:
        noun_p = f"the {noun}"
        adj_p = adj or noun
    return noun_p, adj_p


def _tumor_sentence(t: dict, rng: np.random.Generator) -> str:
    noun_p, adj_p = _site_phrase(t, rng)
    s = _size(float(t["size_mm"]), rng)
    m = _pick(rng, MASS)
    templates = [
        f"There is a {s} {m} in {noun_p}.",
        f"A {s} {adj_p} {m} is identified.",
        f"{noun_p[0].upper() + noun_p[1:]} contains a {m} measuring {s}.",
        f"Within {noun_p} there is a {m} measuring {s}.",
        f"{adj_p[0].upper() + adj_p[1:]} {m}, {s}.",
        f"A {m} of {s} arises from {noun_p}.",
        f"Known {adj_p} {m} measures {s}.",
        f"Focal {m} in {noun_p} measuring approximately {s}.",
    ]
    return _pick(rng, templates)


def _count_sentence(n: int, rng: np.random.Generator) -> str:
    w = number_word(n)
    return _pick(rng, [
        f"{w.capitalize()} lesions are identified.", f"There are {w} focal lesions.", f"{w.capitalize()} masses are seen:",
        f"Multiple ({w}) lesions are present.", f"In total {w} tumors are noted.", f"{w.capitalize()} separate lesions:",
    ])


def _demographics(f: dict, rng: np.random.Generator) -> str | None:
    sex, age = f.get("sex"), f.get("age")
    if sex is None and age is None:
        return None
    man = {"male": ["man", "male", "male patient", "gentleman"], "female": ["woman", "female", "female patient", "lady"]}
    if age is None:
        return _pick(rng, [f"Patient: {sex}.", f"Sex: {sex}.", f"The patient is {sex}."])
    word = _pick(rng, man[sex]) if sex else "patient"
    abbreviation = {"male": "M", "female": "F"}.get(sex, "")
    return _pick(rng, [
        f"{age}-year-old {word}.",
        f"Patient: {age}-year-old {word}.",
        f"Clinical history: {age} y/o {sex or 'patient'}.",
        f"{number_word(int(age)).capitalize()}-year-old {word}.",
        f"{sex.capitalize() if sex else 'Patient'}, {age} years.",
        f"Age {age}, sex {abbreviation or 'unknown'}.",
        f"A {age} year old {word}.",
    ])


def _phase(f: dict, rng: np.random.Generator) -> str | None:
    ph = f.get("phase")
    if ph is None:
        return None
    p = _pick(rng, PHASE_WORDS[ph])
    return _pick(rng, [
        f"Technique: {p} CT of the chest, abdomen and pelvis.",
        f"CT chest/abdomen/pelvis, {p}.",
        f"Axial CT images from the lung apices to the pelvis were obtained ({p}).",
        f"Study: {p} thoracoabdominal CT.",
        f"Contrast phase: {p}.",
        f"{p[0].upper() + p[1:]} CT of the torso.",
    ])


def _tnm(f: dict, rng: np.random.Generator) -> str | None:
    parts = [f.get(k) for k in ("t_stage", "n_stage", "m_stage")]
    parts = [p for p in parts if p]
    if not parts:
        return None
    joined, spaced = "".join(parts), " ".join(parts)
    return _pick(rng, [
        f"Staging: {spaced}.", f"TNM: {joined}.", f"Clinical stage c{joined}.", f"Stage {', '.join(parts)}.",
        f"Imaging stage {spaced}.", f"Radiological TNM {joined}.",
    ])


def _smoking(f: dict, rng: np.random.Generator) -> str | None:
    s = f.get("smoking")
    if s is None:
        return None
    if s:
        return _pick(rng, ["Current smoker.", "History of smoking.", "Smoker.", "Heavy smoking history.", "Smoking history: yes.", "Long-term tobacco use."])
    return _pick(rng, ["Non-smoker.", "Never smoker.", "No smoking history.", "Smoking history: none.", "Denies tobacco use.", "Nonsmoker."])


def _negative(rng: np.random.Generator) -> str:
    return _pick(rng, [
        "No focal lesion is identified.", "No focal lesion.", "No mass or suspicious lesion in the chest, abdomen or pelvis.",
        "No evidence of tumor.", "Solid organs are unremarkable without focal lesion.", "No focal hepatic, renal or pulmonary lesion.",
        "No suspicious mass is seen.",
    ])


def _normal_filler(findings: dict, rng: np.random.Generator) -> str | None:
    sites = {t["site"] for t in findings.get("tumors") or []}
    options = [(s, txt) for s, txt in [
        ("liver", "The liver is normal in size without focal hepatic lesion."),
        ("kidney", "Both kidneys enhance symmetrically without renal mass."),
        ("lung", "The lungs are clear without pulmonary nodules."),
        ("pancreas", "The pancreas is unremarkable."),
        ("spleen", "The spleen is normal in size."),
        ("urinary_bladder", "The urinary bladder is unremarkable."),
        ("colon", "No colonic wall thickening."),
    ] if s not in sites]
    if not options or rng.random() < 0.4:
        return None
    return options[int(rng.integers(len(options)))][1]


def write_report(findings: dict, rng: np.random.Generator) -> str:
    """A report paragraph that states every finding; phrasing and order drawn from ``rng``."""
    header = [s for s in (_demographics(findings, rng), _smoking(findings, rng)) if s]
    if rng.random() < 0.5:
        header.reverse()
    phase = _phase(findings, rng)
    tumors = list(findings.get("tumors") or [])
    body: list[str] = []
    if tumors:
        order = rng.permutation(len(tumors))
        if len(tumors) > 1 and rng.random() < 0.6:
            body.append(_count_sentence(len(tumors), rng))
        body += [_tumor_sentence(tumors[i], rng) for i in order]
    else:
        body.append(_negative(rng))
    filler = _normal_filler(findings, rng)
    if filler:
        body.append(filler)
    tnm = _tnm(findings, rng)
    tail = [tnm] if tnm else []
    blocks = [header, [phase] if phase else [], body, tail]
    if rng.random() < 0.35:  # sometimes technique first, sometimes staging early
        blocks[0], blocks[1] = blocks[1], blocks[0]
    if tail and rng.random() < 0.25:
        blocks = [blocks[0], tail, blocks[1], blocks[2]]
    return " ".join(s for b in blocks for s in b)
