"""The findings record and a rule-based parser from free English report text (DESIGN §5).

:class:`Findings` is what a radiology report says about the things the generator can render:
sex, age, tumours (organ site, side, size), TNM stage, contrast phase and smoking. Unknown
fields are ``None``; no tumour is ``tumors == []``.

:func:`parse_findings` reads any English text and never raises on odd input (it is a
best-effort reader, not a validator). How it works, in order:

1. **Normalise**: lower case, unicode dashes/``×`` to ASCII, number words to digits
   ("sixty-four" → 64, "two" → 2).
2. **Field extractors** on the string, each blanking what it consumed so later steps do not
   misread it: TNM ("T3N1M0", "pT2 N0", "stage T2", "T stage: 3"), contrast phase, smoking,
   age ("64-year-old", "aged 64", "64 yo", "64 y/o", "M64", "64F") and sex (explicit words and
   letters first, pronouns only as a fallback).
3. **Tumours** on the rest, sentence by sentence over a token stream in which sizes are
   already merged ("3.2 x 2.1 cm" → one size token of 32 mm, the largest dimension; "2-3 cm"
   → 30 mm; "2 and 3 cm" → two sizes). Every *anchor* (mass, lesion, nodule, tumour,
   carcinoma, metastases, HCC, RCC, NSCLC, CRC, ...) collects the organ mentions that belong
   to it — a prefix ("right renal mass", "liver lesion"), a prepositional phrase ("mass in the
   left kidney") or a subject/header ("Liver: 2 lesions") — plus its count ("two", "multiple",
   digits, plural) and sizes. Anchors in a negation scope ("no focal lesion", "without
   metastasis", "negative for", "r/o", "not seen") are dropped, as are anchors with no organ.
   Mentions that refer back ("the mass", "consistent with HCC", anything in an IMPRESSION or
   repeated from a HISTORY block) merge into an earlier tumour of the same site.

Conventions (the test set in ``tests/data/report_testset.jsonl`` follows them):

- ``site`` is an organ-group name of the ``guidegen22`` label set; synonyms map onto it
  (hepatic/HCC → liver, renal/RCC → kidney, pulmonary/NSCLC/lobe → lung, colorectal/rectal/
  sigmoid/cecum/CRC → colon, ...).
- ``side`` is recorded only for the paired organ groups (:data:`PAIRED_SITES`: kidney, lung,
  adrenal_gland, rib); other organs are one label each, so their side is always ``None``.
  "bilateral"/"both" gives one tumour per side.
- ``size_mm`` is the largest stated dimension in mm, or ``None``.
- Count: a number or number word → that many tumours; "multiple/several/numerous/a few" → 3;
  a bare plural ("liver lesions") → 2, or the number of sizes given if larger.
- T/N/M are normalised to their main category ("T1a" → "T1"; Tx/Nx/Mx → ``None``).
- ``phase``: the first stated phase; "contrast-enhanced" without a phase stays ``None``.
- ``smoking``: any smoking history (current or former) → ``True``; non/never smoker → ``False``.
- A known cancer in the history ("known HCC") counts as a present tumour; "status post
  resection"/"s/p nephrectomy for RCC" does not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

# The 19 organ groups of the guidegen22 label set, in id order (ids 1..19).
ORGAN_SITES: tuple[str, ...] = (
    "spleen", "kidney", "liver", "stomach", "pancreas", "lung", "small_bowel", "duodenum", "colon",
    "urinary_bladder", "heart", "vertebrae", "rib", "adrenal_gland", "portal_splenic_vein",
    "esophagus", "aorta", "inferior_vena_cava", "gallbladder",
)
PAIRED_SITES: frozenset[str] = frozenset({"kidney", "lung", "adrenal_gland", "rib"})
SIDES: tuple[str, ...] = ("left", "right")
T_STAGES: tuple[str, ...] = ("T0", "Tis", "T1", "T2", "T3", "T4")
N_STAGES: tuple[str, ...] = ("N0", "N1", "N2", "N3")
M_STAGES: tuple[str, ...] = ("M0", "M1")
PHASES: tuple[str, ...] = ("non_contrast", "arterial", "portal_venous", "delayed")
SEXES: tuple[str, ...] = ("male", "female")


# --------------------------------------------------------------------------------- record
@dataclass(frozen=True)
class Tumor:
    """One tumour: organ-group ``site``, ``side`` ("left"/"right"/None), ``size_mm`` (or None)."""

    site: str
    side: str | None = None
    size_mm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "side": self.side, "size_mm": self.size_mm}


@dataclass
class Findings:
    """What a report says; ``None`` = not stated, ``tumors == []`` = no tumour stated."""

    sex: str | None = None  # "male" | "female"
    age: int | None = None  # years
    tumors: list[Tumor] = field(default_factory=list)
    t_stage: str | None = None  # "T0" "Tis" "T1".."T4"
    n_stage: str | None = None  # "N0".."N3"
    m_stage: str | None = None  # "M0" | "M1"
    phase: str | None = None  # one of PHASES
    smoking: bool | None = None

    @property
    def tumor_count(self) -> int:
        return len(self.tumors)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with exactly the keys of ``guidegen parse --json``."""
        return {
            "sex": self.sex,
            "age": self.age,
            "tumors": [t.to_dict() for t in self.tumors],
            "t_stage": self.t_stage,
            "n_stage": self.n_stage,
            "m_stage": self.m_stage,
            "phase": self.phase,
            "smoking": self.smoking,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Findings":
        """Inverse of :meth:`to_dict`; missing keys are unknown, unknown sites are skipped."""
        d = d or {}
        tumors = []
        for t in d.get("tumors") or []:
            if isinstance(t, dict) and t.get("site") in ORGAN_SITES:
                size = t.get("size_mm")
                tumors.append(Tumor(t["site"], t.get("side"), None if size is None else float(size)))
        age = d.get("age")
        return cls(
            sex=d.get("sex"),
            age=None if age is None else int(age),
            tumors=tumors,
            t_stage=d.get("t_stage"),
            n_stage=d.get("n_stage"),
            m_stage=d.get("m_stage"),
            phase=d.get("phase"),
            smoking=d.get("smoking"),
        )


# --------------------------------------------------------------------------- normalising
_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13,
    "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fourty": 40, "fifty": 50, "sixty": 60,
         "seventy": 70, "eighty": 80, "ninety": 90}
_NUMWORD_RE = re.compile(
    r"\b(?:(" + "|".join(_TENS) + r")(?:[\s-]+(" + "|".join(k for k in _UNITS if _UNITS[k] < 10 and k != "zero") + r"))?"
    r"|(" + "|".join(_UNITS) + r"))\b"
)


def _numwords_to_digits(s: str) -> str:
    def repl(m: re.Match) -> str:
        if m.group(1):
            return str(_TENS[m.group(1)] + (_UNITS[m.group(2)] if m.group(2) else 0))
        return str(_UNITS[m.group(3)])

    return _NUMWORD_RE.sub(repl, s)


def normalize(text: str) -> str:
    """Lower-case, ASCII punctuation, number words → digits, one space between words.

    Line breaks become sentence breaks (" . ") so structured blocks ("Liver: ...") split.
    """
    s = str(text).lower()
    s = s.replace("\u00d7", " x ").replace("\u2013", "-").replace("\u2014", "-").replace("\u2212", "-")
    s = s.replace("\u2019", "'").replace("\u00a0", " ")
    s = re.sub(r"[\r\n]+", " . ", s)
    s = re.sub(r"\b(lt|rt|pt|pts|approx|mr|mrs|ms|dr|vs|yrs|seg|hx)\.", r"\1 ", s)  # abbreviation dots
    # ordinals ("5th rib", "second part of the duodenum") name a position, never a count
    s = re.sub(r"\b\d+(?:st|nd|rd|th)\b|\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth"
               r"|eleventh|twelfth)\b", " ", s)
    s = re.sub(r"\ba couple of\b", "2", s)
    s = _numwords_to_digits(s)
    s = re.sub(r"(\d),(\d{3})\b", r"\1\2", s)  # 1,000 → 1000
    return re.sub(r"[ \t]+", " ", s).strip()


def _blank(s: str, m: re.Match) -> str:
    return s[: m.start()] + " " * (m.end() - m.start()) + s[m.end():]


# ------------------------------------------------------------------------------------ TNM
_TNM_FULL = re.compile(
    r"\b(?:y?[cpura]?)t(is|[0-4x])[a-d]?\s*[,/]?\s*n([0-3x])[a-c]?(?:\s*[,/]?\s*m([01x])[a-c]?)?\b"
)
_T_ALONE = re.compile(r"\b(?:y?[cpura]?)t(is|[0-4x])[a-d]?\b")
_N_ALONE = re.compile(r"\b(?:y?[cpura]?)n([0-3x])[a-c]?\b")
_M_ALONE = re.compile(r"\b(?:y?[cpura]?)m([01x])[a-c]?\b")
_STAGE_WORD = re.compile(r"\b([tnm])[- ]?(?:stage|category|classification)\s*(?:is|of|:|=|-)?\s*(?:[tnm])?(is|[0-4x])[a-d]?\b")
_VERT_AFTER = re.compile(r"^\s*(?:-?\s*)(?:vertebra|vertebral|spine|spinal|level|body|\(vertebra|-weighted|weighted)")
_VERT_BEFORE = re.compile(r"(?:\bat|\bof|\bin|\binvolving|\bto|\bfrom|\bthrough)\s*$")


def _stage(prefix: str, val: str | None) -> str | None:
    if val is None or val == "x":
        return None
    return prefix + ("is" if val == "is" else val)


def _extract_tnm(s: str) -> tuple[str, dict[str, str | None]]:
    out: dict[str, str | None] = {"t_stage": None, "n_stage": None, "m_stage": None}
    seen: set[str] = set()  # a stated "x" still counts as stated (stays None)

    def setv(key: str, val: str | None) -> None:
        if key not in seen:
            seen.add(key)
            out[key] = _stage(key[0].upper(), val)

    for m in list(_TNM_FULL.finditer(s)):
        setv("t_stage", m.group(1))
        setv("n_stage", m.group(2))
        if m.group(3):
            setv("m_stage", m.group(3))
        s = _blank(s, m)
    for m in list(_STAGE_WORD.finditer(s)):
        setv(f"{m.group(1)}_stage", m.group(2) if not (m.group(1) == "m" and m.group(2) not in "01x") else None)
        s = _blank(s, m)
    for key, rx in (("t_stage", _T_ALONE), ("n_stage", _N_ALONE), ("m_stage", _M_ALONE)):
        for m in list(rx.finditer(s)):
            if key == "t_stage" and (_VERT_AFTER.match(s[m.end():]) or _VERT_BEFORE.search(s[: m.start()])):
                continue  # "T3 vertebral body", "lesion at T4": a spine level, not a T stage
            setv(key, m.group(1))
            s = _blank(s, m)
    return s, out


# ---------------------------------------------------------------------------------- phase
_PHASE_RULES: tuple[tuple[str, str], ...] = (
    ("non_contrast", r"\b(?:non|un|no)[- ]?(?:contrast(?:ed)?|enhanced|enhancing|con)\b"),
    ("non_contrast", r"\b(?:without|w/o|no|w/out)\s+(?:any\s+)?(?:iv\s+|intravenous\s+|i\.v\.\s+|oral\s+or\s+iv\s+|iv\s+or\s+oral\s+)?contrast\b"),
    ("non_contrast", r"\b(?:nect|ncct|plain\s+ct|native\s+(?:ct|phase|scan)|pre-?contrast|unenhanced)\b"),
    ("arterial", r"\b(?:late\s+|early\s+|hepatic\s+)?arterial[- ]*(?:phases?|series|acquisition|imaging)\b"),
    ("arterial", r"\barterial(?=\s*(?:\+|and|/|,|&)\s*(?:portal[- ]*)?venous[- ]+phases?)"),  # multiphase: first
    ("arterial", r"\(\s*(?:late\s+|early\s+)?arterial\s*\)|\barterial(?=\s+(?:ct|scan|study|acquisition)\b)"),
    ("arterial", r"\b(?:cta|ct\s+angiogra\w*|angiographic\s+phase)\b"),
    ("portal_venous", r"\b(?:portal[- ]*venous|porto[- ]*venous|portal[- ]+phases?|pv[- ]+phases?|venous[- ]+phases?)\b"
                      r"(?!\s*(?:system|lesion|mass|tumou?r|nodule|thrombus|invasion|involvement|confluence))"),
    ("delayed", r"\b(?:delayed|excretory|urographic|equilibrium|late|urographic)[- ]*(?:phase|images?|imaging|series|scan|acquisition)\b"),
)
_PHASE_RULES += (
    ("non_contrast", r"(?<=phase)\s*[:=-]\s*(?:non[- ]?contrast|none|unenhanced|plain)\b"),
    ("arterial", r"(?<=phase)\s*[:=-]\s*arterial\b"),
    ("portal_venous", r"(?<=phase)\s*[:=-]\s*(?:pv|venous)\b"),
    ("delayed", r"(?<=phase)\s*[:=-]\s*(?:delayed|excretory)\b"),
)  # structured "Phase: arterial"
_PHASE_RES = [(name, re.compile(rx)) for name, rx in _PHASE_RULES]


def _extract_phase(s: str) -> tuple[str, str | None]:
    hits = []
    for name, rx in _PHASE_RES:
        for m in rx.finditer(s):
            hits.append((m.start(), name, m))
    if not hits:
        # fallback: a bare phase word in a sentence about the scan ("CT chest/abdomen/pelvis, arterial.")
        for sent in re.split(r"[.;!?]", s):
            if re.search(r"\b(?:ct|scan|study|technique|protocol|imaging)\b", sent):
                m = re.search(r"\b(arterial|(?:portal[- ]*)?venous|delayed|unenhanced)\b(?!\s*(?:enhanc|wash|hyper|phase))", sent)
                if m:
                    word = m.group(1)
                    return s, ("arterial" if word == "arterial" else "delayed" if word == "delayed"
                               else "non_contrast" if word == "unenhanced" else "portal_venous")
        return s, None
    hits.sort(key=lambda h: h[0])
    for _, _, m in hits:
        s = _blank(s, m)
    return s, hits[0][1]


# -------------------------------------------------------------------------------- smoking
_SMOKE_NO = re.compile(
    r"\b(?:non[- ]?smok\w*|never[- ]?smok\w*|lifelong\s+non[- ]?smoker"
    r"|(?:denies|denied|deny|no|negative\s+for|without)\s+(?:any\s+)?(?:history\s+of\s+|h/o\s+)?(?:tobacco|smoking|cigarettes?|nicotine)(?:\s+(?:use|history|abuse))?"
    r"|(?:does\s+not|doesn't|did\s+not|didn't|never)\s+smoke[sd]?"
    r"|not\s+a\s+smoker"
    r"|(?:smoking|tobacco|smoker)(?:\s+(?:history|status|use|hx))?\s*[:=-]?\s*(?:no|none|never|negative|denies|denied|n)\b)"
)
_SMOKE_YES = re.compile(
    r"\b(?:(?:ex|former|current|active|heavy|chronic|previous|past|daily|longtime|long-time)[- ]?)?smokers?\b"
    r"|\b(?:smokes|smoked|smoking\s+history|history\s+of\s+(?:smoking|tobacco)|h/o\s+(?:smoking|tobacco)|tobacco\s+(?:use|abuse|history|user)"
    r"|\d+(?:\.\d+)?\s*[- ]?(?:pack|pk)[- ]?(?:years?|yrs?|yr)|pack[- ]?years?|cigarettes?"
    r"|(?:smoking|tobacco)(?:\s+(?:status|use|hx))?\s*[:=-]?\s*(?:yes|positive|current|former|ex|y|active|quit))\b"
)


def _extract_smoking(s: str) -> tuple[str, bool | None]:
    m = _SMOKE_NO.search(s)
    if m:
        for mm in list(_SMOKE_NO.finditer(s)):
            s = _blank(s, mm)
        for mm in list(_SMOKE_YES.finditer(s)):
            s = _blank(s, mm)
        return s, False
    hits = list(_SMOKE_YES.finditer(s))
    for mm in hits:
        s = _blank(s, mm)
    return s, (True if hits else None)


# ------------------------------------------------------------------------------ age / sex
_AGE_RULES = (
    re.compile(r"\b(\d{1,3})\s*-?\s*(?:years?|yrs?|yr|y)\s*-?\s*old\b"),
    re.compile(r"\b(\d{1,3})\s*(?:years?|yrs?)\s+of\s+age\b"),
    re.compile(r"\b(\d{1,3})\s*(?:y/o|y\.o\.?|yo|yrs?|y)(?=[\s,.;:/)]|$)"),
    re.compile(r"\b(?:aged?|age\s*[:=]|age\s+is|age\s+of)\s*(\d{1,3})\b"),
)
# "female, 39", "he is 82": only the number is consumed, the sex word stays for the sex rules
_AGE_AFTER_WORD = re.compile(
    r"\b(?:male|female|man|woman|he|she|patient|pt|(?:mr|mrs|ms|miss)\b[^,.;]{0,20},)\s*(?:,|/|\(|is|is\s+a)?\s*"
    r"(\d{2})\b(?!\s*(?:mm|cm|%|x\b|\.\d))")
_SEX_AGE = re.compile(r"\b([mf])\s*[/,-]?\s*(\d{2})\b(?!\s*(?:mm|cm|%|x\b))")
_AGE_SEX = re.compile(r"\b(\d{2})\s*[/,-]?\s*([mf])\b")
_SEX_FIELD = re.compile(r"\b(?:sex|gender)\s*[:=-]?\s*(m|f|male|female|man|woman)\b")
_SEX_AFTER_AGE = re.compile(r"^\s*[,/]?\s*([mf])\b")
_MALE_WORDS = re.compile(r"\b(?:male|man|men|gentleman|gent|boy|mr|husband|father)\b")
_FEMALE_WORDS = re.compile(r"\b(?:female|woman|women|lady|girl|mrs|ms|miss|wife|mother)\b")
_MALE_PRON = re.compile(r"\b(?:he|his|him|himself)\b")
_FEMALE_PRON = re.compile(r"\b(?:she|her|hers|herself)\b")


def _sex_letter(c: str) -> str:
    return "male" if c.startswith("m") else "female"


def _extract_age_sex(s: str) -> tuple[str, int | None, str | None]:
    age: int | None = None
    sex: str | None = None
    for rx in _AGE_RULES:
        m = rx.search(s)
        if m and 0 < int(m.group(1)) <= 120:
            age = int(m.group(1))
            after = _SEX_AFTER_AGE.match(s[m.end():])
            if after and sex is None:
                sex = _sex_letter(after.group(1))
                s = s[: m.end()] + " " * (after.end()) + s[m.end() + after.end():]
            s = _blank(s, m)
            break
    m = _SEX_FIELD.search(s)
    if m:
        if sex is None:
            sex = "male" if m.group(1) in ("m", "male", "man") else "female"
        s = _blank(s, m)
    for rx, sex_group, age_group in ((_SEX_AGE, 1, 2), (_AGE_SEX, 2, 1)):
        m = rx.search(s)
        if m and 18 <= int(m.group(age_group)) <= 110:
            sex = sex or _sex_letter(m.group(sex_group))
            age = age if age is not None else int(m.group(age_group))
            s = _blank(s, m)
    if age is None:
        m = _AGE_AFTER_WORD.search(s)
        if m:
            age = int(m.group(1))
            s = s[: m.start(1)] + " " * (m.end(1) - m.start(1)) + s[m.end(1):]
    if sex is None:
        mm, mf = _MALE_WORDS.search(s), _FEMALE_WORDS.search(s)
        if mm or mf:
            sex = "male" if mf is None or (mm is not None and mm.start() < mf.start()) else "female"
    if sex is None:
        mm, mf = _MALE_PRON.search(s), _FEMALE_PRON.search(s)
        if mm or mf:
            sex = "male" if mf is None or (mm is not None and mm.start() < mf.start()) else "female"
    return s, age, sex


# ------------------------------------------------------------------------------- lexicon
def _phrases(site: str, *words: str) -> dict[tuple[str, ...], str]:
    return {tuple(w.split()): site for w in words}


_ORGAN_LEXICON: dict[tuple[str, ...], str] = {
    **_phrases("liver", "liver", "livers", "hepatic", "intrahepatic", "hepatocellular", "caudate", "hepatic lobe",
               "hepatic segment", "hepatobiliary"),
    **_phrases("kidney", "kidney", "kidneys", "renal", "nephric", "renal pelvis", "renal cortex", "perirenal",
               "intrarenal"),
    **_phrases("lung", "lung", "lungs", "pulmonary", "intrapulmonary", "bronchogenic", "lingula", "lingular",
               "upper lobe", "lower lobe", "middle lobe", "pulmonic"),
    **_phrases("colon", "colon", "colonic", "colorectal", "rectal", "rectum", "rectosigmoid", "sigmoid", "cecum",
               "caecum", "cecal", "caecal", "hepatic flexure", "splenic flexure", "large bowel", "large intestine",
               "ascending colon", "descending colon", "transverse colon", "anorectal"),
    **_phrases("pancreas", "pancreas", "pancreatic", "uncinate", "pancreatic head", "pancreatic tail"),
    **_phrases("stomach", "stomach", "gastric", "antrum", "antral", "pylorus", "pyloric", "lesser curvature",
               "greater curvature"),
    **_phrases("spleen", "spleen", "splenic", "intrasplenic"),
    **_phrases("small_bowel", "small bowel", "small intestine", "small intestinal", "jejunum", "jejunal", "ileum",
               "ileal", "terminal ileum"),
    **_phrases("duodenum", "duodenum", "duodenal", "ampulla", "ampullary", "periampullary"),
    **_phrases("urinary_bladder", "bladder", "urinary bladder", "vesical"),
    **_phrases("heart", "heart", "cardiac", "myocardium", "myocardial", "atrium", "atrial", "ventricle",
               "ventricular", "intracardiac"),
    **_phrases("vertebrae", "vertebra", "vertebrae", "vertebral", "spine", "spinal", "vertlevel", "vertebral body"),
    **_phrases("rib", "rib", "ribs", "costal"),
    **_phrases("adrenal_gland", "adrenal", "adrenals", "suprarenal", "adrenal gland", "adrenal glands"),
    **_phrases("portal_splenic_vein", "portal vein", "splenic vein", "splenoportal", "portal venous system", "portal venous",
               "main portal vein", "splenic veins"),
    **_phrases("esophagus", "esophagus", "oesophagus", "esophageal", "oesophageal"),
    **_phrases("aorta", "aorta", "aortic"),
    **_phrases("inferior_vena_cava", "ivc", "inferior vena cava", "vena cava", "caval", "infrarenal ivc"),
    **_phrases("gallbladder", "gallbladder", "gall bladder", "gb", "cholecystic"),
}
# phrases that look like an organ word but are not a tumour site
_NON_ORGAN: set[tuple[str, ...]] = {
    ("renal", "vein"), ("renal", "veins"), ("renal", "artery"), ("hepatic", "vein"), ("hepatic", "veins"),
    ("hepatic", "artery"), ("splenic", "artery"), ("pulmonary", "artery"), ("pulmonary", "embolism"),
    ("pulmonary", "arteries"), ("mass", "effect"), ("aortic", "valve"),
}
# anchors whose word itself names the organ
_SITE_ANCHORS: dict[str, str] = {
    "hcc": "liver", "hepatoma": "liver", "hepatomas": "liver", "cholangiocarcinoma": "liver",
    "rcc": "kidney", "ccrcc": "kidney", "hypernephroma": "kidney",
    "nsclc": "lung", "sclc": "lung", "crc": "colon", "pdac": "pancreas",
    "pheochromocytoma": "adrenal_gland", "phaeochromocytoma": "adrenal_gland", "gist": "stomach",
}
_ANCHOR_WORDS: set[str] = {
    "mass", "masses", "lesion", "lesions", "tumor", "tumors", "tumour", "tumours", "nodule", "nodules",
    "neoplasm", "neoplasms", "carcinoma", "carcinomas", "cancer", "cancers", "malignancy", "malignancies",
    "metastasis", "metastases", "mets", "adenocarcinoma", "adenocarcinomas", "adenoma", "adenomas",
    "sarcoma", "sarcomas", "growth", "growths", "sol", "sols", "neoplasia", "deposit", "deposits",
} | set(_SITE_ANCHORS)
_DISEASE_WORDS = {"cancer", "ca", "carcinoma", "adenocarcinoma", "malignancy", "neoplasia"} | set(_SITE_ANCHORS)
_PLURAL_ANCHORS = {"mets", "metastases", "malignancies", "masses"}
_SIDE_WORDS = {"left": "left", "l": "left", "lt": "left", "right": "right", "r": "right", "rt": "right",
               "bilateral": "both", "both": "both", "bilaterally": "both"}
_LOBE_ABBR = {"rul": "right", "rml": "right", "rll": "right", "lul": "left", "lll": "left"}
_PREPS = {"in", "of", "within", "at", "from", "involving", "on", "inside", "along", "throughout", "affecting"}
_NON_SITE_CUES = {"into", "invading", "invades", "invasion", "abutting", "abuts", "encasing", "encases",
                  "compressing", "compresses", "displacing", "displaces", "adjacent", "near", "toward", "towards",
                  "contacting", "contacts", "narrowing", "obstructing", "beside", "between", "indenting",
                  "extending", "extends", "extension", "to", "than", "thrombus", "versus", "vs"}
_NEG_CUES = {"no", "not", "without", "negative", "free", "absence", "nor", "neither", "denies", "exclude",
             "excluded", "resected", "removed", "post", "sp", "ro", "never", "none", "nil"}
_POST_NEG = [("not", "seen"), ("not", "identified"), ("not", "visualized"), ("not", "visualised"), ("not", "present"),
             ("not", "detected"), ("not", "demonstrated"), ("absent",), ("excluded",), ("ruled", "out"), ("resolved",),
             ("none",), ("resected",), ("removed",), ("no", "longer"), ("not", "appreciated"), ("sp",)]
_BREAKERS = {"but", "however", "although", "though", "whereas", "while", "except", "yet", "otherwise", "apart"}
_STARTERS = {"a", "an", "there", "the", "has", "have", "shows", "show", "demonstrates", "contains", "is", "are",
             "with", "and", "new", "known", "now", "also", "which"} | set(_SIDE_WORDS)
_DEFINITE = {"the", "this", "these", "that", "those", "said", "aforementioned", "above", "index", "known", "dominant"}
_DIAG_CUES = [("consistent", "with"), ("compatible", "with"), ("suspicious", "for"), ("concerning", "for"),
              ("suggestive", "of"), ("in", "keeping", "with"), ("representing",), ("likely",), ("probable",),
              ("probably",), ("c", "w"), ("characteristic", "of"), ("typical", "of"),
              ("most", "likely"), ("possibly",), ("presumed",), ("i", "e"), ("as",), ("aka",)]
_REFER_CUES = [("as", "above"), ("as", "described"), ("previously", "described"), ("again", "seen"), ("again",),
               ("redemonstrated",), ("see", "above"), ("described", "above"), ("unchanged",), ("stable",)]
_COUNT_WORDS = {"a": 1, "an": 1, "single": 1, "solitary": 1, "another": 1, "isolated": 1, "pair": 2, "both": 2,
                "multiple": 3, "several": 3, "numerous": 3, "few": 3, "many": 3, "innumerable": 3, "various": 3,
                "multifocal": 3, "countless": 3, "scattered": 3}
_UNITS_MM = {"mm": 1.0, "mms": 1.0, "millimeter": 1.0, "millimeters": 1.0, "millimetre": 1.0, "millimetres": 1.0,
             "cm": 10.0, "cms": 10.0, "centimeter": 10.0, "centimeters": 10.0, "centimetre": 10.0,
             "centimetres": 10.0}
_UP_TO_CUES = {"largest", "biggest", "dominant", "up", "maximum", "max", "index"}
_HISTORY_HEADERS = {"history", "indication", "indications", "clinical", "reason", "hx"}
_IMPRESSION_HEADERS = {"impression", "impressions", "conclusion", "conclusions", "summary", "opinion", "dx",
                       "diagnosis", "assessment"}
_FINDINGS_HEADERS = {"findings", "finding", "report", "description", "results"}


# ----------------------------------------------------------------------------- tokenising
@dataclass
class _Tok:
    kind: str  # "word" | "num" | "punct" | "size"
    text: str
    value: float = 0.0  # number value, or size in mm
    upto: bool = False


_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|[a-z]+|[^\sa-z\d]")
_NUM_SEPS_DIM = {"x", "by", "*"}
_NUM_SEPS_RANGE = {"-", "to"}
_NUM_SEPS_LIST = {",", "and", "or", "&"}


def _tokenize(s: str) -> list[_Tok]:
    s = re.sub(r"\b(?:c[1-7]|th?[1-9]|t1[0-2]|l[1-5]|s[1-5])\b", " vertlevel ", s)  # spine levels after TNM
    s = re.sub(r"\bc\s*/\s*w\b", " consistent with ", s)
    s = re.sub(r"\br\s*/\s*o\b", " ro ", s)
    s = re.sub(r"\bs\s*/\s*p\b", " sp ", s)
    s = re.sub(r"\bw\s*/\s*o\b", " without ", s)
    s = re.sub(r"\bw\s*/\s*", " with ", s)
    s = re.sub(r"\bstatus post\b", " sp ", s)
    s = re.sub(r"\bmass effect\b", " ", s)
    toks = []
    for t in _TOKEN_RE.findall(s):
        kind = "num" if t[0].isdigit() else ("word" if t[0].isalpha() else "punct")
        toks.append(_Tok(kind, t, float(t) if kind == "num" else 0.0))
    return _merge_sizes(toks)


def _merge_sizes(toks: list[_Tok]) -> list[_Tok]:
    """Turn number runs with a unit into size tokens (mm); see the module docstring."""
    out: list[_Tok] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        if t.kind != "num" or (out and out[-1].text in {"segment", "level", "grade", "series", "image", "zone", "station"}):
            out.append(t)
            i += 1
            continue
        # collect: num (sep [unit] num)* unit
        groups: list[list[float]] = [[t.value]]  # groups of dims; a list sep starts a new group
        j = i + 1
        unit = None
        while j < len(toks):
            tj = toks[j]
            if tj.text in _UNITS_MM:
                unit = _UNITS_MM[tj.text]
                # "3 cm x 2 cm": a unit followed by a dimension separator continues the run
                if j + 2 < len(toks) and toks[j + 1].text in _NUM_SEPS_DIM and toks[j + 2].kind == "num":
                    groups[-1].append(toks[j + 2].value)
                    j += 3
                    continue
                j += 1
                break
            if tj.text == "-" and j + 1 < len(toks) and toks[j + 1].text in _UNITS_MM:
                j += 1  # "2.5-cm"
                continue
            if j + 1 < len(toks) and toks[j + 1].kind == "num":
                if tj.text in _NUM_SEPS_DIM or tj.text in _NUM_SEPS_RANGE:
                    groups[-1].append(toks[j + 1].value)
                    j += 2
                    continue
                if tj.text in _NUM_SEPS_LIST:
                    groups.append([toks[j + 1].value])
                    j += 2
                    continue
            if tj.text in _NUM_SEPS_LIST and j + 2 < len(toks) and toks[j + 1].text in _NUM_SEPS_LIST and toks[j + 2].kind == "num":
                groups.append([toks[j + 2].value])  # "2, and 3 cm"
                j += 3
                continue
            break
        if unit is None:
            out.append(t)
            i += 1
            continue
        upto = any(o.text in _UP_TO_CUES for o in out[-3:])  # "the largest 3 cm", "up to 3 cm"
        for g in groups:
            out.append(_Tok("size", "<size>", round(max(g) * unit, 1), upto))
        i = j
    return out


def _split_sentences(toks: list[_Tok]) -> list[list[_Tok]]:
    sents, cur = [], []
    for t in toks:
        if t.kind == "punct" and t.text in ".;!?":
            if cur:
                sents.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        sents.append(cur)
    return sents


# ------------------------------------------------------------------------------- tumours
@dataclass
class _Anchor:
    idx: int
    word: str
    plural: bool
    sites: list[tuple[str, str | None]] = field(default_factory=list)
    count: int | None = None
    count_implicit: bool = False
    sizes: list[float] = field(default_factory=list)
    upto: bool = False
    negated: bool = False
    definite: bool = False
    diagnostic: bool = False
    historic: bool = False  # "known HCC", "history of CRC": refers to the patient's known cancer
    named_only: bool = False  # site only from the word itself ("NSCLC"), no organ, size or count


def _match_at(words: list[str], i: int, seqs) -> int:
    """Length of the first sequence in ``seqs`` that matches ``words`` at ``i`` (0 if none)."""
    for seq in seqs:
        if tuple(words[i: i + len(seq)]) == tuple(seq):
            return len(seq)
    return 0


def _find_organs(words: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, site) of organ mentions, longest phrase first; skips non-organ phrases."""
    found = []
    i = 0
    while i < len(words):
        if tuple(words[i: i + 2]) in _NON_ORGAN:
            i += 2
            continue
        for n in (3, 2, 1):
            key = tuple(words[i: i + n])
            if len(key) == n and key in _ORGAN_LEXICON:
                found.append((i, i + n, _ORGAN_LEXICON[key]))
                i += n
                break
            if n == 1 and words[i] in _LOBE_ABBR:
                found.append((i, i + 1, "lung"))
                i += 1
                break
        else:
            i += 1
    return found


def _is_modifier(t: _Tok) -> bool:
    """Tokens that may sit inside a noun phrase between an organ/size/count and its noun."""
    if t.kind == "size":
        return True
    if t.kind == "punct":
        return t.text in "-/"
    if t.kind == "num":
        return True
    w = t.text
    return w not in _PREPS and w not in _BREAKERS and w not in {"and", "or", "is", "are", "was", "were", "with",
                                                                   "has", "have", "shows", "demonstrates", "contains",
                                                                   "there", "no", "not", "without", "measuring",
                                                                   "measures", "which", "that", "for", "as",
                                                                   "likely", "probably", "representing"} and w not in _ANCHOR_WORDS


def _side_near(sent: list[_Tok], start: int, end: int) -> str | None:
    """Side stated next to an organ mention at sent[start:end]."""
    w = [t.text for t in sent]
    if w[start] in _LOBE_ABBR:
        return _LOBE_ABBR[w[start]]
    j = start - 1
    steps = 0
    while j >= 0 and steps < 4:
        if w[j] in _SIDE_WORDS:
            return _SIDE_WORDS[w[j]]
        if not (w[j] in {"the", "of", "-", "sided", "side"} or (_is_modifier(sent[j]) and sent[j].kind != "punct")):
            break
        j -= 1
        steps += 1
    # "kidney, left" / "kidney (right)" / "kidney on the right"
    k = end
    if k + 1 < len(w) and w[k] in {",", "(", "-", ":"} and w[k + 1] in _SIDE_WORDS:
        return _SIDE_WORDS[w[k + 1]]
    if k + 2 < len(w) and w[k] in {"on", "at"} and w[k + 1] == "the" and w[k + 2] in _SIDE_WORDS:
        return _SIDE_WORDS[w[k + 2]]
    if k < len(w) and w[k] in {"bilaterally"}:
        return "both"
    return None


def _add_site(a: _Anchor, site: str, side: str | None) -> None:
    """Add an organ to an anchor; a second mention of the same organ only refines its side."""
    for k, (s, sd) in enumerate(a.sites):
        if s == site and (sd is None or side is None or sd == side):
            a.sites[k] = (s, sd or side)
            return
    a.sites.append((site, side))


def _tumours_in_sentence(sent: list[_Tok]) -> list[_Anchor]:
    words = [t.text for t in sent]
    n = len(sent)
    anchors: list[_Anchor] = []
    for i, t in enumerate(sent):
        # "colorectal primary" (a noun) but not "primary lung cancer" (an adjective); "ca" but not "CA 19-9"
        is_primary = t.text in {"primary", "primaries"} and (i + 1 == n or sent[i + 1].kind != "word" or words[i + 1] in _PREPS | {"and", "or"})
        is_ca = t.text == "ca" and not (i + 1 < n and sent[i + 1].kind == "num")
        if t.kind == "word" and (t.text in _ANCHOR_WORDS or is_primary or is_ca):
            if anchors and anchors[-1].idx == i - 1 and words[i - 1] in _ANCHOR_WORDS:
                continue  # "mass lesion", "tumor mass": one noun phrase, one anchor
            plural = (t.text.endswith("s") and t.text not in {"mass", "metastasis", "sols", "mets"}) or t.text in _PLURAL_ANCHORS
            if t.text in {"sols"}:
                plural = True
            anchors.append(_Anchor(i, t.text, plural))
        elif t.kind == "num" and anchors and i + 2 < n and words[i + 1] in {"in", "within", "at", "involving"} \
                and float(t.value).is_integer() and 1 <= t.value <= 20:
            # elliptical anchor: "two lesions in the liver and one in the spleen"
            anchors.append(_Anchor(i, anchors[-1].word, t.value > 1, count=int(t.value)))
        elif t.kind == "word" and t.text == "another" and anchors and i + 1 < n and words[i + 1] in {"in", "within", "at"}:
            anchors.append(_Anchor(i, anchors[-1].word, False, count=1))
    if not anchors:
        return []

    def next_anchor(i: int) -> _Anchor | None:
        for a in anchors:
            if a.idx > i:
                return a
        return None

    def prev_anchor(i: int) -> _Anchor | None:
        best = None
        for a in anchors:
            if a.idx < i:
                best = a
        return best

    # ---- organs → anchors
    organs = _find_organs(words)
    prev_mode: str | None = None
    prev_end = -10
    prev_target: _Anchor | None = None
    for start, end, site in organs:
        side = _side_near(sent, start, end)
        # an organ right after a relation word ("invading the IVC") is not a site
        j = start - 1
        adjectives = 0
        while j >= 0 and (words[j] in {"the", "a", "an"} or words[j] in _SIDE_WORDS or (
                adjectives < 3 and sent[j].kind == "word" and _is_modifier(sent[j]) and words[j] not in _NON_SITE_CUES
                and not any(s <= j < e for s, e, _ in organs))):
            adjectives += words[j] not in {"the", "a", "an"} and words[j] not in _SIDE_WORDS
            j -= 1
        before = words[j] if j >= 0 else ""
        if before in _NON_SITE_CUES or (j >= 1 and words[j - 1] in _NON_SITE_CUES and before in {"of"}):
            prev_mode, prev_end, prev_target = "skip", end, None
            continue
        target: _Anchor | None = None
        mode = None
        # coordinated with the previous organ ("liver and spleen", "liver, spleen or kidneys")
        between = words[prev_end:start]
        if prev_mode is not None and start == prev_end:
            mode, target = prev_mode, prev_target  # adjacent organ words: "sigmoid colon"
        elif prev_mode is not None and start - prev_end <= 4 and all(
                w in {"and", "or", ",", "the", "/", "&"} or w in _SIDE_WORDS for w in between) and between:
            mode = prev_mode
            target = prev_target if prev_mode != "prefix" else None
        if mode is None or (mode == "prefix" and target is None):
            # prefix: organ ... anchor with only modifiers between
            na = next_anchor(end - 1)
            if na is not None and na.idx - end <= 5 and all(_is_modifier(sent[k]) for k in range(end, na.idx)):
                mode, target = "prefix", na
            elif na is not None and mode == "prefix":
                # coordinated prefix organ: "liver and spleen lesions"
                if all(_is_modifier(sent[k]) or words[k] in {"and", "or", ","} for k in range(end, na.idx)) and na.idx - end <= 8:
                    target = na
        if target is None and mode != "prefix":
            clause_start = j - 1 < 0 or words[j - 1] in {":", ",", "("}
            if before in _PREPS and clause_start and next_anchor(end - 1) is not None:
                mode, target = "subject", next_anchor(end - 1)  # "Within the spine there is a lesion"
            elif before in _PREPS or mode == "post":
                mode, target = "post", prev_anchor(start)
                if target is None:
                    # "in the liver there are two lesions"
                    mode, target = "subject", next_anchor(end - 1)
            else:
                mode, target = "subject", next_anchor(end - 1)
                pa = prev_anchor(start)
                # trailing organ of an anchor's phrase: "Mass, right kidney, 3 cm", "CRC (sigmoid)"
                if target is None and pa is not None and start - pa.idx <= 4 and all(
                        words[k] in {",", "(", "-", ":", "the"} or words[k] in _SIDE_WORDS or sent[k].kind == "size"
                        for k in range(pa.idx + 1, start)):
                    target = pa
        if target is None and mode == "prefix":
            target = next_anchor(end - 1)
        prev_mode, prev_end, prev_target = mode, end, target
        if target is not None:
            if side is None and site in PAIRED_SITES:
                # side word just before the anchor's noun phrase: "left 3 cm renal mass" handled above;
                # "a left-sided mass ... kidney": look in the anchor's own phrase
                side = _side_near(sent, target.idx, target.idx + 1)
            _add_site(target, site, side if site in PAIRED_SITES else None)
    for a in anchors:
        if a.word in _SITE_ANCHORS and not any(s == _SITE_ANCHORS[a.word] for s, _ in a.sites):
            a.named_only = not a.sites
            a.sites.append((_SITE_ANCHORS[a.word], None))
        if a.idx + 1 < n and words[a.idx + 1] in {"bilaterally", "bilateral"}:
            a.sites = [(s, "both" if s in PAIRED_SITES else sd) for s, sd in a.sites]
        lo = max(0, a.idx - 4)
        a.historic = "known" in words[lo:a.idx] or any(
            _match_at(words, k, [("history", "of"), ("hx", "of"), ("h", "/", "o")]) for k in range(lo, a.idx))

    # ---- sizes → anchors
    for i, t in enumerate(sent):
        if t.kind != "size":
            continue
        na = next_anchor(i)
        target = None
        if na is not None and na.idx - i <= 6 and all(_is_modifier(sent[k]) for k in range(i + 1, na.idx)):
            target = na
        else:
            target = prev_anchor(i) or na
        if target is not None:
            target.sizes.append(t.value)
            target.upto = target.upto or t.upto

    # ---- counts, negation, definiteness
    for a in anchors:
        j = a.idx - 1
        while a.count is None and j >= 0 and a.idx - j <= 7:
            t = sent[j]
            if t.kind == "num" and float(t.value).is_integer() and 1 <= t.value <= 30 \
                    and not (j > 0 and words[j - 1] in {"segment", "level"}) and not (j + 1 < n and words[j + 1] == "ordinal"):
                a.count = int(t.value)
                break
            if t.kind == "word" and t.text in _COUNT_WORDS:
                a.count = _COUNT_WORDS[t.text]
                a.count_implicit = _COUNT_WORDS[t.text] == 3
                if t.text == "both":
                    a.sites = [(s, "both" if s in PAIRED_SITES else side) for s, side in a.sites]
                break
            if t.kind == "word" and t.text in _DEFINITE and a.idx - j <= 5:
                a.definite = True
            if not _is_modifier(t) and t.text not in _DEFINITE:
                break
            j -= 1
        # count after the noun: "lesions (n=3)", "nodules x 3", "lesions, 3 in number"
        k = a.idx + 1
        if a.count is None and k + 3 < n and words[k: k + 3] == ["(", "n", "="] and sent[k + 3].kind == "num":
            a.count = int(sent[k + 3].value)
        if a.count is None and k + 1 < n and words[k] in {"x", "*"} and sent[k + 1].kind == "num":
            a.count = int(sent[k + 1].value)
        # definite determiner right before the phrase
        j = a.idx - 1
        while j >= 0 and a.idx - j <= 5 and (_is_modifier(sent[j]) or words[j] in _DEFINITE):
            if words[j] in _DEFINITE:
                a.definite = True
            j -= 1
        # diagnostic phrase before the anchor ("consistent with HCC")
        for k in range(max(0, a.idx - 6), a.idx):
            if all(_is_modifier(sent[q]) or words[q] in _DEFINITE for q in range(k + 1, a.idx)) and any(
                    k - len(cue) + 1 >= 0 and tuple(words[k - len(cue) + 1: k + 1]) == cue for cue in _DIAG_CUES):
                a.diagnostic = True
        # negation scope, scanning back to the start of the clause
        j = a.idx - 1
        while j >= 0:
            w = words[j]
            if w in _BREAKERS:
                break
            if w in {",", "and", "with", ":"} and j + 1 < a.idx:
                nxt = sent[j + 1]
                organ_list = any(s <= j - 1 < e for s, e, _ in organs) and any(s == j + 1 for s, _, _ in organs)
                if (nxt.kind in {"size", "num"} or nxt.text in _STARTERS) and not organ_list:
                    break
                if w == ":":
                    break
            if w in _NEG_CUES:
                if w == "free" and not (j + 1 < n and words[j + 1] in {"of", "from"}):
                    j -= 1
                    continue
                if w == "negative" and not (j + 1 < n and words[j + 1] in {"for"}):
                    j -= 1
                    continue
                if w == "post" and not (j > 0 and words[j - 1] in {"status"}):
                    j -= 1
                    continue
                a.negated = True
                break
            j -= 1
        # post-anchor negation ("lesion not seen", "masses: none")
        stop = next((b.idx for b in anchors if b.idx > a.idx), n)
        for k in range(a.idx + 1, stop):
            if words[k] in _BREAKERS:
                break
            if _match_at(words, k, _POST_NEG) and not (words[k] == "none" and k > a.idx + 3):
                a.negated = True
                break
            if words[k] in {",", "and"} and k + 1 < n and (sent[k + 1].kind in {"size", "num"} or words[k + 1] in {"a", "an", "there"}):
                break
        if any(_match_at(words, k, _REFER_CUES) for k in range(max(0, a.idx - 3), min(n, stop))):
            a.definite = True
    # a diagnostic anchor ("... lesion in segment 7, suspicious for HCC") describes the anchor before it
    kept: list[_Anchor] = []
    for a in anchors:
        if a.diagnostic and kept and not kept[-1].negated:
            host = kept[-1]
            for s in a.sites:
                if s not in host.sites and not any(s[0] == hs[0] for hs in host.sites):
                    host.sites.append(s)
            host.sizes.extend(a.sizes)
            continue
        kept.append(a)
    return kept


def _expand(a: _Anchor) -> list[Tumor]:
    """One anchor → tumours (count × sites, sides, sizes)."""
    sites = [(s, side if s in PAIRED_SITES else None) for s, side in a.sites]
    if not sites:
        return []
    count = a.count
    if count is None:
        count = max(2, len(a.sizes)) if a.plural else max(1, len(a.sizes))
    elif a.count_implicit and len(a.sizes) > count:
        count = len(a.sizes)
    count = min(count, 30)
    slots: list[tuple[str, str | None]] = []
    if len(sites) == 1:
        site, side = sites[0]
        if side == "both":
            count = max(count, 2)
            slots = [(site, ("left", "right")[k % 2]) for k in range(count)]
        else:
            slots = [(site, side)] * count
    else:
        per = max(1, count // len(sites)) if a.count is not None and not a.count_implicit else 1
        for site, side in sites:
            if side == "both":
                slots += [(site, "left"), (site, "right")]
            else:
                slots += [(site, side)] * per
    sizes: list[float | None]
    if len(a.sizes) == len(slots):
        sizes = list(a.sizes)
    elif len(a.sizes) == 1:
        sizes = [a.sizes[0]] + [None if a.upto else a.sizes[0]] * (len(slots) - 1)
    elif len(a.sizes) > len(slots):
        sizes = list(a.sizes[: len(slots)])
    else:
        sizes = list(a.sizes) + [None] * (len(slots) - len(a.sizes))
    return [Tumor(site, side, size) for (site, side), size in zip(slots, sizes)]


def _compatible(t: Tumor, u: Tumor) -> bool:
    return (t.site == u.site and (t.side is None or u.side is None or t.side == u.side)
            and (t.size_mm is None or u.size_mm is None or abs(t.size_mm - u.size_mm) <= 1.0))


def _extract_tumours(s: str) -> list[Tumor]:
    toks = _tokenize(s)
    tumors: list[Tumor] = []
    origin: list[str] = []  # section each tumour came from
    section = "body"
    for sent in _split_sentences(toks):
        w0 = [t.text for t in sent[:3]]
        for k, w in enumerate(w0):
            if k + 1 < len(sent) and sent[k + 1].text == ":" or (k + 1 == len(sent)):
                if w in _IMPRESSION_HEADERS:
                    section = "impression"
                elif w in _HISTORY_HEADERS:
                    section = "history"
                elif w in _FINDINGS_HEADERS or w in {"technique", "comparison"}:
                    section = "body"
        for a in _tumours_in_sentence(sent):
            if a.negated:
                continue
            if not a.sites and a.definite and tumors and a.sizes:
                # "Right renal mass. The mass measures 4.2 cm": the size belongs to the last tumour
                u = tumors[-1]
                if u.size_mm is None:
                    tumors[-1] = Tumor(u.site, u.side, max(a.sizes))
                continue
            new = _expand(a)
            # a mention may repeat a tumour already listed: a definite or named-only mention
            # ("the mass", "NSCLC"), anything in the impression, or a tumour first met as history
            refer = a.definite or a.named_only or section == "impression"
            # a bare disease name ("Esophageal ca.", "CRC") names the cancer that later sentences describe
            disease_name = a.word in _DISEASE_WORDS and not a.sizes and a.count is None and not a.plural
            here = "history" if (a.historic or section == "history" or disease_name) else section
            used: set[int] = set()
            for t in new:
                match = None
                for k, u in enumerate(tumors):
                    if k not in used and _compatible(u, t) and (refer or origin[k] == "history"):
                        match = k
                        break
                if match is not None:
                    used.add(match)
                    u = tumors[match]
                    tumors[match] = Tumor(u.site, u.side or t.side, u.size_mm if u.size_mm is not None else t.size_mm)
                    if origin[match] == "history":
                        origin[match] = here
                else:
                    tumors.append(t)
                    origin.append(here)
    return tumors


# -------------------------------------------------------------------------------- public
def parse_findings(text: str, strict: bool = False) -> Findings:
    """Read a :class:`Findings` from free English text.

    Never raises on odd input: an internal failure gives all-unknown findings, unless
    ``strict`` (tests use it so that a parser bug shows up as an error).
    """
    try:
        s = normalize(text if isinstance(text, str) else str(text))
        s, tnm = _extract_tnm(s)
        s, phase = _extract_phase(s)
        s, smoking = _extract_smoking(s)
        s, age, sex = _extract_age_sex(s)
        tumors = _extract_tumours(s)
    except Exception:  # the parser must never crash on user text
        if strict:
            raise
        return Findings()
    return Findings(sex=sex, age=age, tumors=tumors, phase=phase, smoking=smoking, **tnm)
