"""Text-conditioning speed on CPU: parser, encoders (batch of 64 prompts), cache, injection.

    python benchmarks/text.py [--batch 64] [--repeats 5] [--threads N]

Each timing is the median of ``--repeats`` warm runs (one untimed warm-up first). Prompts are
the knowledge-augmented encoder inputs (canonical prompt + raw report) of varied reports.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from guidegen.config import TextConfig  # noqa: E402
from guidegen.text.encoders import (  # noqa: E402
    EmbeddingCache, HFEncoder, MiniLMEncoder, TrainableTokenEncoder, minilm_model_path,
)
from guidegen.text.findings import parse_findings  # noqa: E402
from guidegen.text.knowledge import KnowledgeInjection, text_for_encoding  # noqa: E402
from guidegen.text.prompts import findings_vector  # noqa: E402

REPORTS = [
    "62-year-old man, 4 cm mass in the left kidney, portal venous phase",
    "F64. Two hypodense liver lesions, 2.1 and 3.4 cm. T3N1M0. Ex-smoker.",
    "FINDINGS:\nLungs: 2.8 cm spiculated RUL nodule.\nLiver: normal.\nIMPRESSION: RUL mass, cT1c N0.",
    "pt 70 y/o m w/ known HCC, arterial phase: 3.2 x 2.1 cm lesion in segment 7 c/w HCC",
    "No focal lesion. Non-contrast CT. Never smoker.",
    "Rectal adenocarcinoma, 6 cm, T3 N1. 55yo gentleman. Delayed phase.",
    "Bilateral adrenal nodules, largest 1.5 cm; 48 year old woman",
    "pancreatic head mass 3 cm abutting the portal vein, stage T2, 71M, smoker",
]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.system()} {platform.release()} | {cpu} | {os.cpu_count()} logical CPUs | "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads | python {platform.python_version()} | "
            f"load avg {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_info())
    reports = [REPORTS[i % len(REPORTS)] + f" (case {i})" for i in range(args.batch)]
    findings = [parse_findings(r) for r in reports]
    prompts = [text_for_encoding(r, f) for r, f in zip(reports, findings)]
    cfg = TextConfig()
    rows: list[tuple[str, float]] = []

    t = median_time(lambda: [parse_findings(r) for r in reports], args.repeats)
    rows.append((f"parse_findings x{args.batch}", t))
    t = median_time(lambda: [findings_vector(f) for f in findings], args.repeats)
    rows.append((f"findings_vector x{args.batch}", t))

    t0 = time.perf_counter()
    minilm = MiniLMEncoder(max_tokens=cfg.max_tokens)
    rows.append(("MiniLM load (incl. sha256 check)", time.perf_counter() - t0))
    hf = HFEncoder(minilm_model_path(), max_tokens=cfg.max_tokens)
    trainable = TrainableTokenEncoder(dim=cfg.trainable_dim, max_tokens=cfg.max_tokens)
    with torch.inference_mode():
        for name, e in (("minilm", minilm), ("hf (MiniLM dir)", hf), ("trainable (untrained)", trainable)):
            t = median_time(lambda e=e: e.encode(prompts), args.repeats)
            rows.append((f"encode {args.batch} prompts, {name}, L={cfg.max_tokens}", t))

    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp, minilm.encoder_id)
        t0 = time.perf_counter()
        cache.encode(minilm, prompts)
        rows.append((f"cache cold (encode + write {args.batch})", time.perf_counter() - t0))
        t = median_time(lambda: cache.encode(minilm, prompts), args.repeats)
        rows.append((f"cache warm (read {args.batch})", t))

    tokens, mask = minilm.encode(prompts)
    vec = torch.from_numpy(__import__("numpy").stack([findings_vector(f) for f in findings]))
    ki = KnowledgeInjection(minilm.dim, context_dim=cfg.context_dim, num_queries=cfg.num_queries,
                            num_layers=cfg.injection_layers)
    n_params = sum(p.numel() for p in ki.parameters())
    with torch.inference_mode():
        t = median_time(lambda: ki(tokens, mask, vec), args.repeats)
    rows.append((f"KnowledgeInjection fwd B={args.batch} ({n_params / 1e6:.2f} M params)", t))

    width = max(len(n) for n, _ in rows)
    for name, sec in rows:
        print(f"{name:<{width}}  {sec * 1000:9.1f} ms")


if __name__ == "__main__":
    main()
