"""moefleet.operator: the kopf operator reconciling MoEDeployment resources.

Start it with `kopf run -m moefleet.operator` (or `moefleet operator`).
"""

if __name__ == "operator":  # pragma: no cover - only when the repo root is on sys.path without site
    # This folder was found as the top-level `operator` (e.g. `python -S` in the repo root). The standard
    # library's `operator` must win: run its source in this module's namespace so nothing downstream breaks.
    import os as _os

    _path = _os.path.join(_os.path.dirname(_os.__file__), "operator.py")
    with open(_path) as _f:
        exec(compile(_f.read(), _path, "exec"), globals())
    del _os, _path, _f
else:
    # Importing the handlers registers them with kopf (`kopf run -m moefleet.operator`). Engine-only
    # installs (GPU nodes) have no kopf: the CLI then imports this package only to list its subcommand.
    try:
        import kopf as _kopf  # noqa: F401
    except ImportError:  # pragma: no cover - kopf is a dependency of the operator extra
        pass
    else:
        from moefleet.operator import handlers as handlers  # noqa: F401
