"""The package's import graph has no cycle (issue 23): every module can be understood after the ones it
imports. `make test` also runs the layering contracts of pyproject.toml (`lint-imports`), which check whole
layers and subpackages; this states the one property exactly, module by module, counting imports inside
functions and under TYPE_CHECKING (a package's ``__init__`` is a module like any other)."""

import grimp


def test_no_import_cycle_in_the_package():
    graph = grimp.build_graph("medclf", cache_dir=None)
    cycles = sorted(
        (importer, imported)
        for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
        if graph.chain_exists(importer=imported, imported=importer)
    )
    shown = [" -> ".join((a, *graph.find_shortest_chain(importer=b, imported=a))) for a, b in cycles[:5]]
    assert not cycles, "import cycles:\n" + "\n".join(shown)
