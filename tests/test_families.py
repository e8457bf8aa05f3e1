"""The model-family conformance suite (tests/conformance.py) for every family in the
registry (`megatron_spava.models.registry`); each family's own HF-parity specifics stay in
its test file (test_qwen2_5_vl.py, test_internvl3.py, test_qwen3_vl.py)."""

import pytest

import conformance
from megatron_spava.models import registry

FAMILIES = registry.names()


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    family = registry.get_family(request.param)
    return conformance.make_case(family, str(tmp_path_factory.mktemp(family.name) / "tiny"))


def test_interface(case):
    conformance.check_interface(case)


@pytest.mark.slow
def test_round_trip_and_tp2_cp2_match_hf(case, tmp_path):
    conformance.check_round_trip_and_tp2_cp2_match_hf(case, str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_demo(name, tmp_path):
    conformance.check_demo(registry.get_family(name), str(tmp_path))
