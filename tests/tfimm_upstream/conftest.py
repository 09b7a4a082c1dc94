"""tfimm's own test file registers a mock model in tfimm's process-wide
registry when it is imported (at collection). The registry is put back as it
was once collection is done, the mock is there only while these tests run,
so every other test sees tfimm's own 282 names whatever the order."""

import copy

import pytest
from tfimm.models import registry

_TABLES = ("_model_class", "_model_config", "_module_to_models", "_model_has_pretrained")


def _snapshot() -> dict:
    return {name: copy.copy(getattr(registry, name)) for name in _TABLES}


def _restore(saved: dict) -> None:
    for name, value in saved.items():
        table = getattr(registry, name)
        table.clear()
        table.update(value)


_BEFORE = _snapshot()  # this conftest is imported before the test file beside it
_WITH_MOCKS: dict = {}


def pytest_collection_finish(session):
    _WITH_MOCKS.update(_snapshot())
    _restore(_BEFORE)


@pytest.fixture(autouse=True, scope="module")
def tfimm_registry_with_the_mocks():
    _restore(_WITH_MOCKS)
    yield
    _restore(_BEFORE)
