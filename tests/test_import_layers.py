"""Imports point down (errors, log, paths; model and data; parallel; plan; training) and form no cycle."""

from helpers import import_graph


def test_no_module_imports_a_higher_layer():
    assert import_graph.upward_imports() == []


def test_no_import_cycle():
    assert import_graph.cycles() == []


def test_the_model_and_parallel_packages_import_nothing_of_training():
    graph = import_graph.edges()
    low = [m for m in graph if m.startswith(("jetmoe.model", "jetmoe.parallel", "jetmoe.data"))]
    assert not [(m, t) for m in low for t in graph[m] if t.startswith(("jetmoe.training", "jetmoe.plan"))]
