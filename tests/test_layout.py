"""The package's structure (docs/design.md section 12): no import cycle, and the engines import no stage."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "pipelines"))
from import_graph import cycles, package_imports  # noqa: E402

EDGES = package_imports(REPO / "ncleaner")


def test_the_package_has_no_import_cycle():
    assert cycles(EDGES) == []


def test_the_ray_engine_imports_no_stage_and_the_engine_layer_only_it():
    assert EDGES["ray_engine"] <= {"errors"}
    assert EDGES["engine"] <= {"errors", "ray_engine"}
    stages = ("scoring", "embeddings", "filtering", "fitting", "inspection", "rules")
    assert all("ray_engine" not in EDGES[stage] for stage in stages)


def test_the_graph_sees_imports_made_inside_functions():
    # engine imports ray_engine only inside functions: a lazy import must count, or a cycle
    # through one would go unseen (the one this layout removed ran through lazy imports).
    assert "ray_engine" in EDGES["engine"]
