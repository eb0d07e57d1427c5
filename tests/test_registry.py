"""The registry helper every name table uses: loud on duplicates, unknown names and broken loaders."""

import pytest

from sparge_core.methods import METHODS, get_method, method_names
from sparge_core.registry import Registry, UnknownName


def test_unknown_name_lists_known():
    reg = Registry("widget")
    reg.add("a", 1)
    reg.add("b", 2)
    with pytest.raises(UnknownName, match=r"unknown widget 'c'; known: \['a', 'b'\]"):
        reg.get("c")
    assert reg.get("b") == 2 and "a" in reg and reg.names() == ["a", "b"] and len(reg) == 2


def test_duplicate_registration_is_an_error():
    reg = Registry("widget")
    reg.register("a")(object())
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", object())


def test_loader_import_error_propagates_and_is_retried():
    calls = []

    def loader():
        calls.append(1)
        raise ImportError("no module named 'missing_dep'")

    reg = Registry("widget", loader=loader)
    with pytest.raises(ImportError, match="missing_dep"):
        reg.names()
    with pytest.raises(ImportError):  # not silently marked as loaded
        reg.get("x")
    assert len(calls) == 2


def test_builtin_methods_registered():
    assert set(method_names()) == {"dense", "sparge", "sparge-topk", "sparge-budget", "minference",
                                   "flexprefill"}
    assert METHODS.get("sparge").name == "sparge"
    with pytest.raises(ValueError, match="unknown attention method 'nope'"):
        get_method("nope")
