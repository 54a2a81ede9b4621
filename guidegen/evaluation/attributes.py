"""Text fidelity: an attribute classifier trained on real pairs, scored on synthetic pairs.

As in the paper's characteristic classifier, a 3D conv net reads the image and its label map
(CT channel + one-hot classes) and predicts what the report says: sex, contrast phase and the
site of the largest tumour ("none" when no tumour is reported). Its accuracy on the synthetic
set, against the findings each synthetic case was generated from, measures whether the pairs
show what the prompt asked for. Class vocabularies come from the real set; a synthetic value
never seen in the real set counts as a miss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from guidegen.evaluation.features import PHASES, SEXES, MultiHeadNet, _cfg_dict, _class_index, cached_model, fit_multitask
from guidegen.evaluation.sets import EvalSet, ct_to_unit

ATTRIBUTES = ("sex", "phase", "tumor_site")


@dataclass(frozen=True)
class AttributeConfig:
    widths: tuple[int, ...] = (8, 16, 32)
    steps: int = 150
    batch_size: int = 2
    lr: float = 2e-3
    seed: int = 1


def main_tumor_site(findings: dict | None) -> str | None:
    """Site of the largest reported tumour, "none" without tumours, None when unknown."""
    if not isinstance(findings, dict):
        return None
    tumors = [t for t in findings.get("tumors") or [] if isinstance(t, dict) and t.get("site")]
    if not tumors:
        return "none"
    return max(tumors, key=lambda t: t.get("size_mm") or 0.0)["site"]


def attribute_values(findings: list[dict | None]) -> dict[str, list]:
    """Attribute name → one value (or None) per case."""
    return {
        "sex": [(f or {}).get("sex") for f in findings],
        "phase": [(f or {}).get("phase") for f in findings],
        "tumor_site": [main_tumor_site(f) for f in findings],
    }


def pair_batch(ds: EvalSet) -> Callable[[np.ndarray], torch.Tensor]:
    """Case indices → (B, 1 + C, X, Y, Z): normalized CT and the one-hot label map."""
    n_cls = ds.label_set.num_classes

    def make(idx: np.ndarray) -> torch.Tensor:
        idx = np.asarray(idx)
        ct = torch.from_numpy(ct_to_unit(ds.ct[idx]))[:, None]
        onehot = F.one_hot(torch.from_numpy(ds.labels[idx].astype(np.int64)), n_cls).permute(0, 4, 1, 2, 3).float()
        return torch.cat([ct, onehot], dim=1)

    return make


def train_attribute_classifier(real: EvalSet, cfg: AttributeConfig, cache_dir: Path | None) -> tuple[MultiHeadNet, dict, dict[str, tuple[str, ...]]]:
    """Train (or load) the classifier; returns (net, training meta, vocabularies)."""
    values = attribute_values(real.findings)
    sites = tuple(["none"] + sorted({s for s in values["tumor_site"] if s not in (None, "none")}))
    vocab = {"sex": SEXES, "phase": PHASES, "tumor_site": sites}
    targets = {k: _class_index(values[k], vocab[k]) for k in ATTRIBUTES}
    heads = {k: len(vocab[k]) for k in ATTRIBUTES}
    key = {"kind": "attribute_classifier", "version": 1, "real": real.digest, "grid": list(real.labels.shape[1:]),
           "sites": list(sites), **_cfg_dict(cfg)}

    def build() -> MultiHeadNet:
        torch.manual_seed(cfg.seed)
        return MultiHeadNet(1 + real.label_set.num_classes, heads, cfg.widths)

    def train(net: MultiHeadNet) -> dict:
        losses = fit_multitask(net, pair_batch(real), targets, len(real), steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
        return {"final_loss": float(np.mean(losses[-10:])) if losses else None, "steps": cfg.steps}

    net, meta = cached_model(cache_dir, "attribute_classifier", key, build, train)
    return net, meta, vocab


@torch.no_grad()
def attribute_accuracy(net: MultiHeadNet, vocab: dict[str, tuple[str, ...]], ds: EvalSet, batch_size: int = 4) -> dict[str, dict]:
    """Per attribute: ``{"accuracy", "n", "chance"}`` on the cases whose findings state it.

    ``chance`` is the accuracy of always answering the most frequent value of ``ds`` (a floor
    to read the accuracy against). Accuracy is None when no case states the attribute.
    """
    make = pair_batch(ds)
    preds: dict[str, list[int]] = {k: [] for k in ATTRIBUTES}
    for i in range(0, len(ds), batch_size):
        out = net(make(np.arange(i, min(i + batch_size, len(ds)))))
        for k in ATTRIBUTES:
            preds[k] += out[k].argmax(1).tolist()
    values = attribute_values(ds.findings)
    result = {}
    for k in ATTRIBUTES:
        known = [(p, v) for p, v in zip(preds[k], values[k]) if v is not None]
        if not known:
            result[k] = {"accuracy": None, "n": 0, "chance": None}
            continue
        hits = [v in vocab[k] and vocab[k].index(v) == p for p, v in known]
        vals = [v for _, v in known]
        chance = max(vals.count(v) for v in set(vals)) / len(vals)
        result[k] = {"accuracy": float(np.mean(hits)), "n": len(known), "chance": round(chance, 4)}
    return result
