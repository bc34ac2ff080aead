"""Pinned Kubernetes test binaries, built from the Go module proxy into a cache shared by every checkout.

`python tests/support/binaries.py build` (what `make cluster-bins` runs) builds what is missing;
`python tests/support/binaries.py path` prints the directories to put on PATH.

The cache lives outside the repository (`~/.cache/moefleet/bin/<component>-<version>`, or
`$MOEFLEET_CACHE/bin/...`) so that a fresh clone on the same machine (CI clones main into a new folder)
reuses the binaries. A component is rebuilt only when its pin (the directory name) changes; each build goes
to a temporary directory next to the final one and is renamed into place, so an interrupted build never
leaves a half-written component behind. A file lock serialises concurrent builds (two `make test` at once).

Versions, and why (the single place they are pinned; docs/testing.md repeats them):
- Kubernetes 1.34.4 (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl): a recent stable
  line with the scheduler/StatefulSet/GC behaviour the operator targets.
- etcd 3.6.16: Kubernetes 1.34 is tested against etcd 3.6 (its go.mod pins the 3.6 client); latest patch.
  Debian bookworm ships only etcd 3.4, so etcd is built from go.etcd.io/etcd/server/v3 as well.
- kwok 0.7.0: built against k8s.io/api 0.33, one minor from the cluster (0.8 targets 1.36).
- helm 3.19.5: the helm 3 line built against client-go 0.34, the same minor as the cluster.
- prometheus: the Debian bookworm package (2.42, installed with apt): scraping and PromQL are all the tests
  need, and building prometheus from source pulls in every cloud SDK (tens of minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

KUBERNETES_VERSION = "1.34.4"
ETCD_VERSION = "3.6.16"
KWOK_VERSION = "0.7.0"
HELM_VERSION = "3.19.5"
# Bump when the build recipe (flags, ldflags) changes without a version change, to force a rebuild.
RECIPE = "r1"

_GO_FLAGS = {"CGO_ENABLED": "0", "GOFLAGS": "-trimpath -mod=mod"}


@dataclass(frozen=True)
class GoComponent:
    """One cache directory built by one `go build` of `packages` inside a generated main module."""

    name: str
    version: str
    module: str  # the module required by the generated main module
    module_version: str  # its version on the module proxy
    packages: tuple[str, ...]  # main packages to build; binaries are named after the last path element
    ldflags_x: dict[str, str] = field(default_factory=dict)  # -X symbol=value (version strings)
    # Modules whose replace directives point at ./staging in the required module's own go.mod: the
    # generated module replaces each with the published copy at `staging_version`.
    staging_version: str | None = None
    binary_names: tuple[str, ...] = ()

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.version}-{RECIPE}"

    @property
    def binaries(self) -> tuple[str, ...]:
        return self.binary_names or tuple(p.rstrip("/").rsplit("/", 1)[-1] for p in self.packages)


def _k8s_version_ldflags(version: str) -> dict[str, str]:
    # Without these the binaries report v0.0.0-master, which breaks helm's kubeVersion checks and kubectl's
    # version-skew warning.
    major, minor, _ = version.split(".")
    out: dict[str, str] = {}
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        out.update(
            {
                f"{pkg}.gitVersion": f"v{version}",
                f"{pkg}.gitMajor": major,
                f"{pkg}.gitMinor": minor,
                f"{pkg}.gitTreeState": "clean",
                f"{pkg}.buildDate": "1970-01-01T00:00:00Z",
            }
        )
    return out


COMPONENTS: tuple[GoComponent, ...] = (
    GoComponent(
        name="kubernetes",
        version=KUBERNETES_VERSION,
        module="k8s.io/kubernetes",
        module_version=f"v{KUBERNETES_VERSION}",
        packages=(
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "k8s.io/kubernetes/cmd/kube-scheduler",
            "k8s.io/kubernetes/cmd/kubectl",
        ),
        ldflags_x=_k8s_version_ldflags(KUBERNETES_VERSION),
        staging_version="v0." + KUBERNETES_VERSION.split(".", 1)[1],
    ),
    GoComponent(
        name="etcd",
        version=ETCD_VERSION,
        module="go.etcd.io/etcd/server/v3",
        module_version=f"v{ETCD_VERSION}",
        packages=("go.etcd.io/etcd/server/v3",),
        binary_names=("etcd",),
    ),
    GoComponent(
        name="kwok",
        version=KWOK_VERSION,
        module="sigs.k8s.io/kwok",
        module_version=f"v{KWOK_VERSION}",
        packages=("sigs.k8s.io/kwok/cmd/kwok",),
        ldflags_x={"sigs.k8s.io/kwok/pkg/consts.Version": f"v{KWOK_VERSION}"},
    ),
    GoComponent(
        name="helm",
        version=HELM_VERSION,
        module="helm.sh/helm/v3",
        module_version=f"v{HELM_VERSION}",
        packages=("helm.sh/helm/v3/cmd/helm",),
        ldflags_x={
            "helm.sh/helm/v3/internal/version.version": f"v{HELM_VERSION}",
            "helm.sh/helm/v3/internal/version.gitTreeState": "clean",
        },
    ),
)

# Debian packages: binary name -> package. Installed with apt when the binary is not on the machine.
APT_PACKAGES = {"prometheus": "prometheus"}


class BinariesMissing(RuntimeError):
    """Raised when a cluster test needs binaries that `make cluster-bins` has not built yet."""


def cache_root() -> Path:
    """`$MOEFLEET_CACHE/bin`, default `~/.cache/moefleet/bin`."""
    base = os.environ.get("MOEFLEET_CACHE") or str(Path.home() / ".cache" / "moefleet")
    return Path(base) / "bin"


def component_dir(component: GoComponent) -> Path:
    return cache_root() / component.dirname


def bin_dirs() -> list[Path]:
    """Directories holding the pinned binaries, in PATH order (apt binaries live in /usr/bin already)."""
    return [component_dir(c) for c in COMPONENTS]


def missing() -> list[str]:
    """Names of binaries that are not built/installed yet (empty when everything is ready)."""
    out = [
        f"{c.name}/{b}"
        for c in COMPONENTS
        for b in c.binaries
        if not os.access(component_dir(c) / b, os.X_OK)
    ]
    out += [b for b in APT_PACKAGES if shutil.which(b) is None]
    return out


def require() -> dict[str, Path]:
    """Absolute paths of every binary by name; raises BinariesMissing naming what is missing."""
    gone = missing()
    if gone:
        raise BinariesMissing(
            f"Kubernetes test binaries missing ({', '.join(gone)}) under {cache_root()}: "
            "run `make cluster-bins` first."
        )
    paths = {b: component_dir(c) / b for c in COMPONENTS for b in c.binaries}
    for b in APT_PACKAGES:
        paths[b] = Path(shutil.which(b) or b)
    return paths


def path_env(base: str | None = None) -> str:
    """A PATH value with the binaries' directories in front of `base` (default: the current PATH)."""
    rest = os.environ.get("PATH", "") if base is None else base
    return os.pathsep.join([str(d) for d in bin_dirs()] + ([rest] if rest else []))


# ------------------------------------------------------------------------------------------------ build


def _log(msg: str) -> None:
    print(f"[cluster-bins] {msg}", flush=True)


def _run_go(args: list[str], cwd: Path, what: str, heartbeat_s: float = 60.0) -> str:
    env = {**os.environ, **_GO_FLAGS}
    start = time.monotonic()
    proc = subprocess.Popen(
        ["go", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=heartbeat_s)
            break
        except subprocess.TimeoutExpired:
            # A cold Kubernetes build takes tens of minutes on 2 cores: show it is alive.
            _log(f"{what}: still running `go {args[0]}` ({time.monotonic() - start:.0f}s)")
    if proc.returncode != 0:
        tail = "\n".join((stdout + stderr).strip().splitlines()[-40:])
        raise RuntimeError(
            f"building {what} failed: `go {' '.join(args[:2])} ...` exited {proc.returncode}:\n{tail}"
        )
    return stdout


def _staging_modules(component: GoComponent, workdir: Path) -> list[str]:
    """The module paths the required module replaces with ./staging/... (read from its own go.mod)."""
    out = _run_go(
        ["mod", "download", "-json", f"{component.module}@{component.module_version}"],
        workdir,
        component.name,
    )
    import json

    gomod = Path(json.loads(out)["GoMod"]).read_text()
    mods = []
    for line in gomod.splitlines():
        parts = line.split()
        if "=>" in parts and parts[parts.index("=>") + 1].startswith("./staging/"):
            mods.append(parts[parts.index("=>") - 1])
    if not mods:
        raise RuntimeError(f"building {component.name}: no ./staging replace directives found in its go.mod")
    return mods


def _write_main_module(component: GoComponent, workdir: Path) -> None:
    # Replace directives only apply in the main module, so a module that replaces its own dependencies
    # (k8s.io/kubernetes -> ./staging, etcd server -> ../api) cannot be `go install`ed; a generated main
    # module that requires it (plus the published staging modules) can build its commands.
    lines = [
        "module moefleet.local/clusterbins",
        "",
        "go 1.24.0",
        "",
        f"require {component.module} {component.module_version}",
    ]
    if component.staging_version:
        lines += ["", "replace ("]
        lines += [f"\t{m} => {m} {component.staging_version}" for m in _staging_modules(component, workdir)]
        lines += [")"]
    (workdir / "go.mod").write_text("\n".join(lines) + "\n")
    (workdir / "main.go").write_text("package main\n\nfunc main() {}\n")


def build_component(component: GoComponent) -> Path:
    """Build one component into the cache (no-op when its pinned directory exists); returns the directory."""
    final = component_dir(component)
    if all(os.access(final / b, os.X_OK) for b in component.binaries):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    _log(f"{component.name} {component.version}: building {', '.join(component.binaries)} ...")
    with tempfile.TemporaryDirectory(prefix=f".{component.dirname}.", dir=final.parent) as tmp:
        tmpdir = Path(tmp)
        workdir, outdir = tmpdir / "module", tmpdir / "out"
        workdir.mkdir()
        outdir.mkdir()
        _write_main_module(component, workdir)
        ldflags = " ".join(["-s", "-w", *(f"-X {k}={v}" for k, v in component.ldflags_x.items())])
        pkgs = list(component.packages)
        if component.binary_names:  # a single package whose binary name differs from its path
            args = ["build", f"-ldflags={ldflags}", "-o", str(outdir / component.binary_names[0]), *pkgs]
        else:
            args = ["build", f"-ldflags={ldflags}", "-o", str(outdir) + "/", *pkgs]
        _run_go(args, workdir, component.name)
        for b in component.binaries:
            if not os.access(outdir / b, os.X_OK):
                raise RuntimeError(f"building {component.name}: `go build` succeeded but produced no {b}")
        if final.exists():  # a stale partial directory from an older recipe of the same name
            shutil.rmtree(final)
        os.rename(outdir, final)  # atomic: the directory appears complete or not at all
    _log(f"{component.name} {component.version}: done in {time.monotonic() - start:.0f}s -> {final}")
    return final


def _apt_install(packages: list[str]) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(
            f"apt packages {packages} are missing and this user is not root: install them first."
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, capture_output=True, text=True).returncode != 0:
        # Only refresh the package lists when the install failed (e.g. on a fresh machine).
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"], env=env, check=False)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
            raise RuntimeError(f"apt-get install {' '.join(packages)} failed:\n{tail}")


def install_apt() -> None:
    want = sorted({pkg for binary, pkg in APT_PACKAGES.items() if shutil.which(binary) is None})
    if not want:
        return
    start = time.monotonic()
    _log(f"apt: installing {', '.join(want)} ...")
    _apt_install(want)
    _log(f"apt: done in {time.monotonic() - start:.0f}s")


@contextmanager
def _build_lock() -> Iterator[None]:
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log("another build holds the cache lock; waiting for it ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def build_all() -> None:
    """Build/install every missing component, one progress line per component."""
    if shutil.which("go") is None:
        raise RuntimeError(
            "`go` is not on PATH: the cluster test binaries are built with the machine's Go toolchain."
        )
    start = time.monotonic()
    with _build_lock():
        install_apt()
        for component in COMPONENTS:
            if all(os.access(component_dir(component) / b, os.X_OK) for b in component.binaries):
                _log(f"{component.name} {component.version}: cached")
                continue
            build_component(component)
    _log(f"all binaries ready in {time.monotonic() - start:.0f}s under {cache_root()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["build", "path", "check"])
    args = parser.parse_args(argv)
    if args.command == "path":
        print(path_env(""))
        return 0
    if args.command == "check":
        gone = missing()
        print("missing: " + ", ".join(gone) if gone else "all binaries present")
        return 1 if gone else 0
    try:
        build_all()
    except RuntimeError as exc:
        print(f"[cluster-bins] ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
