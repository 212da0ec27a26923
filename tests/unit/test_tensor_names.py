"""The one list of exchanged tensor names: the model's tensors follow it, and it stays free of torch."""

from __future__ import annotations

import subprocess
import sys

from mlecs.model import ModelConfig, build_edge_model
from mlecs.tensor_names import LORA_PREFIX, MODALITY_PREFIXES, device_may_send, owning_modality


def test_every_modality_specific_tensor_of_the_model_is_named_after_its_modality() -> None:
    model = build_edge_model(ModelConfig(backbone="tiny"), frozenset({"image", "audio"}), seed=0)
    names = set(model.shared_state())
    owners = {owning_modality(name) for name in names}
    assert owners == {None, "image", "audio"}
    assert any(name.startswith(LORA_PREFIX) for name in names)
    image_only = build_edge_model(ModelConfig(backbone="tiny"), frozenset({"image"}), seed=0)
    assert {n for n in names if device_may_send(n, {"image"})} == set(image_only.shared_state())


def test_the_names_module_imports_without_torch() -> None:
    code = ("import sys, mlecs.tensor_names, mlecs.modality; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    assert all(prefix.endswith(".") for prefix in MODALITY_PREFIXES)
