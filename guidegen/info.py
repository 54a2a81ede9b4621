"""Environment and installation summary for ``guidegen info``."""

from __future__ import annotations

import platform

from guidegen import __version__
from guidegen.labels import load_label_set


def shipped_checkpoints() -> list[str]:
    from guidegen.checkpoints import list_shipped

    return list_shipped()


def collect_info() -> dict[str, str]:
    import monai
    import torch

    labels = load_label_set()
    cuda = torch.cuda.is_available()
    device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU)" if cuda else f"cpu ({torch.get_num_threads()} threads)"
    ckpts = shipped_checkpoints()
    return {
        "guidegen": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "device": device,
        "label set": f"{labels.name} ({labels.num_classes} classes: {', '.join(labels.names)})",
        "checkpoints": ", ".join(ckpts) if ckpts else "none shipped",
    }
