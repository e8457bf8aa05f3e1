"""A toy model family registered from its own folder (tests/toy_family/: config, conversion,
tiny checkpoint, HF loader, and its family.py record) runs the whole conformance suite with
no file of the package edited: the registry takes it at run time (`register_module`), and
the demo's processes through MEGATRON_SPAVA_FAMILIES."""

import os

import pytest

import conformance
from megatron_spava.models import registry

TESTS = os.path.dirname(os.path.abspath(__file__))
MODULE = "toy_family.family"


@pytest.fixture(scope="module")
def toy():
    family = registry.register_module(MODULE)
    yield family
    registry.unregister(family.name)


@pytest.fixture(scope="module")
def case(toy, tmp_path_factory):
    return conformance.make_case(toy, str(tmp_path_factory.mktemp("toy") / "tiny"))


def test_the_registry_takes_it(toy):
    assert registry.get_family("toy_vl") is toy and "toy_vl" in registry.names()
    with pytest.raises(ValueError, match="model_type 'qwen2_5_vl' is qwen2_5_vl's already"):
        registry.register(registry.get_family("qwen2_5_vl").__class__(
            **{**toy.__dict__, "name": "another", "model_type": "qwen2_5_vl"}))


def test_interface(case):
    conformance.check_interface(case)


@pytest.mark.slow
def test_round_trip_and_tp2_cp2_match_hf(case, tmp_path):
    conformance.check_round_trip_and_tp2_cp2_match_hf(case, str(tmp_path))


@pytest.mark.slow
def test_demo(toy, tmp_path):
    path = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
    conformance.check_demo(toy, str(tmp_path), env={registry.PLUGINS_ENV: MODULE, "PYTHONPATH": path})
