"""QAT trains against the numerics the quantize stage deploys: one LayerQuantSpec source for both.

With zero-initialised adapters (B = 0) the QAT forward of every decoder linear must equal the RTN-quantized
model's forward on the same weights, for every scheme, including the grouped A8 ones whose activation block
is shrunk to fit the weight group (w8a8-g32: blocks of 32, not the scheme's 64).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rotaq.adapters.config import AdapterConfig
from rotaq.adapters.structure import install_adapters
from rotaq.pipeline.families import family_for_model
from rotaq.quantizers.quantize_model import QuantizeSettings, quantize_model
from rotaq.quantizers.schemes import BASE_NAMES, parse_scheme
from tests.tiny_models import random_tokens, tiny_model

SCHEMES = [f"{base}{group}" for base in BASE_NAMES for group in ("", "-g16", "-g32")]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("mistral").eval()  # widths 64 and 96: groups of 16 and 32 tile every layer


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_qat_forward_is_the_deployed_forward(model: torch.nn.Module, scheme_name: str) -> None:
    family = family_for_model(model)
    trained = copy.deepcopy(model)
    install_adapters(trained, family, AdapterConfig(kind="lora", targets=family.decoder_linears, qat=scheme_name))
    deployed = copy.deepcopy(model)
    # QAT fake-quantizes the decoder linears only; the heads stay float here so the two models compare those.
    scheme = dataclasses.replace(parse_scheme(scheme_name), lm_head_bits=None)
    quantize_model(deployed, family, QuantizeSettings(scheme=scheme, weights="rtn", progress=False), None)
    tokens = random_tokens(2, 24)
    with torch.inference_mode():
        qat_logits = trained(input_ids=tokens).logits
        deployed_logits = deployed(input_ids=tokens).logits
        float_logits = model(input_ids=tokens).logits
    assert not torch.allclose(deployed_logits, float_logits, atol=1e-4)  # the scheme did change the model
    torch.testing.assert_close(qat_logits, deployed_logits, rtol=0, atol=1e-5)
